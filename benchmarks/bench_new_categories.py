"""Issue 14, lever 5: new categories without retraining. Demo data is synthetic: say so.

Hold `--held-out` leaves out of training (their train and val products are dropped from a copy of the feature
store), train the per-picture linear head on the rest, then add each held-out leaf back as a prototype from 5 of its
dropped train products (`prodcat.predict.prototypes`: CL2N class means; scale and bias fitted by val episodes over
the known leaves, never on the holdout). Reported on the holdout, per seed: the held-out leaves' product top-1
(they score 0 without prototypes: the head never saw them), and the other leaves' product top-1 before and after
adding them (n, 95% Wilson interval; mean_prob aggregation, fixed).
The reference line: the same head trained WITH those leaves.

The example products' features are the store's own (exactly what `Predictor.image_features` gives for their
pictures, which is how `prodcat add-category` computes them).

    python benchmarks/bench_new_categories.py [--quick] [--workdir W] [--seeds 3] [--held-out 5] [--shots 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from _demo_store import FEATURES, SYNTHETIC, demo_store  # noqa: E402
from prodcat.config import TrainConfig  # noqa: E402
from prodcat.evaluate.evaluation import proportion_ci  # noqa: E402
from prodcat.features.products import group_products  # noqa: E402
from prodcat.features.store import FeatureStore, write_store  # noqa: E402
from prodcat.paths import WorkPaths  # noqa: E402
from prodcat.predict.predictor import Predictor  # noqa: E402
from prodcat.predict.prototypes import Prototypes, calibrate, class_mean, train_center  # noqa: E402
from prodcat.train.loop import train  # noqa: E402

HELD_STORE = f"{FEATURES}-heldout"


def _pick_leaves(store: FeatureStore, count: int, shots: int, seed: int) -> list[int]:
    """Leaves with at least `shots` train products and a holdout product, drawn at random (seeded)."""
    train = group_products(store, store.split_indices("train"))
    holdout = group_products(store, store.split_indices("holdout"))
    leaves, counts = np.unique(train.label, return_counts=True)
    eligible = [int(leaf) for leaf, c in zip(leaves, counts, strict=True) if c >= shots and leaf in holdout.label]
    return sorted(np.random.default_rng(seed).choice(eligible, min(count, len(eligible)), replace=False).tolist())


def _held_out_store(workdir: Path, store: FeatureStore, leaves: list[int]) -> FeatureStore:
    """A copy of the store whose train and val rows of `leaves` are moved to split 'excluded'."""
    paths = WorkPaths(workdir)
    target = paths.feature_store(HELD_STORE)
    if target.exists():
        shutil.rmtree(target)
    column = {name: store.column(name) for name in ("product_id", "image_index", "label", "level1", "level2")}
    split = store.column("split").astype(object)
    dropped = np.isin(column["label"], leaves) & np.isin(split, ["train", "val"])
    split[dropped] = "excluded"
    held = write_store(target, store.read_all(dtype=np.float16), split=split, shard_size=store.shard_size, **column)
    valid = store.column("valid")
    if not valid.all():  # keep the original's masked rows masked
        rows = held.rows.set_column(held.rows.column_names.index("valid"), "valid", store.rows["valid"])
        from prodcat.utils import write_parquet

        write_parquet(held.rows_path, rows)
        held = FeatureStore.open(target)
    shutil.copy(store.path / "config.json", target / "config.json")
    return held


def _holdout_top1(predictor: Predictor, store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """(predicted label, true label) per holdout product, mean_prob over its pictures, prototypes included."""
    rows = store.split_indices("holdout")
    ids, product_index = np.unique(store.column("product_id")[rows], return_inverse=True)
    log_probs = predictor.product_log_probs_from_features(store.read(rows), product_index, len(ids), "mean_prob")
    truth = np.zeros(len(ids), np.int64)
    truth[product_index] = store.column("label")[rows]
    return log_probs.argmax(axis=1), truth


def _block(hit: np.ndarray) -> dict[str, Any]:
    n = int(len(hit))
    return {"top1": float(hit.mean()) if n else None, "n": n, "ci95": proportion_ci(int(hit.sum()), n) if n else None}


def _one_seed(workdir: Path, store: FeatureStore, leaves: list[int], shots: int, seed: int, epochs: float) -> dict:
    common = dict(workdir=str(workdir), head="linear", loss="softmax", optimizer="adamw", seed=seed, epochs=epochs,
                  batch_size=128, device="cpu", overwrite=True, eval_every=50)  # fmt: skip
    held = FeatureStore.open(WorkPaths(workdir).feature_store(HELD_STORE))
    run = train(TrainConfig(store=HELD_STORE, run_name=f"bench14-heldout-s{seed}", **common))
    reference = train(TrainConfig(store=FEATURES, run_name=f"bench14-all-s{seed}", **common))
    predictor = Predictor.load(run)
    (run / "prototypes.json").unlink(missing_ok=True)
    before, truth = _holdout_top1(predictor, held)
    new = np.isin(truth, leaves)
    center = train_center(held)
    scale, bias, how = calibrate(predictor, held, center, shots=shots, seed=seed)
    examples = group_products(store, store.split_indices("train"))
    rng = np.random.default_rng(seed)
    vectors, categories = [], []
    taxonomy = predictor.taxonomy
    for leaf in leaves:
        chosen = rng.choice(np.flatnonzero(examples.label == leaf), shots, replace=False)
        vectors.append(class_mean([store.read(s[s >= 0]) for s in examples.slots[chosen]], center))
        categories.append({"category_id": int(taxonomy.category_ids[leaf]), "names": list(taxonomy.names(leaf)),
                           "label": leaf, "products": shots, "replaces_head": True})  # fmt: skip
    Prototypes(np.array(vectors, np.float32), center, categories, scale, bias, how).save(run)
    after, _ = _holdout_top1(predictor, held)  # the predictor reloads prototypes.json on its own
    reference_pred, _ = _holdout_top1(Predictor.load(reference), held)
    return {
        "seed": seed, "held_out_leaves": leaves, "scale": scale, "bias": bias, "chosen_by": how,
        "new_leaves": _block(after[new] == truth[new]),
        "new_leaves_reference_trained": _block(reference_pred[new] == truth[new]),
        "other_leaves_before": _block(before[~new] == truth[~new]),
        "other_leaves_after": _block(after[~new] == truth[~new]),
        "other_leaves_change": float((after[~new] == truth[~new]).mean() - (before[~new] == truth[~new]).mean()),
        "other_products_stolen": int(np.isin(after[~new], leaves).sum()),
    }  # fmt: skip


def _line(name: str, values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    spread = "n/a" if len(values) < 2 else f"{statistics.stdev(values):.4f}"
    return f"{name}: {statistics.mean(values):.4f} ± {spread} (sd over {len(values)} seeds)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--held-out", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench14-"))
    demo_store(workdir, args.quick)
    store = FeatureStore.open(WorkPaths(workdir).feature_store(FEATURES))
    leaves = _pick_leaves(store, args.held_out, args.shots, seed=0)
    _held_out_store(workdir, store, leaves)
    epochs = 4.0 if args.quick else 12.0
    seeds = [_one_seed(workdir, store, leaves, args.shots, seed, epochs) for seed in range(args.seeds)]
    for row in seeds:
        new, before, after = row["new_leaves"], row["other_leaves_before"], row["other_leaves_after"]
        print(f"seed {row['seed']}: held-out leaves {new['top1']:.4f} {new['ci95']} (n = {new['n']}); other leaves "
              f"{before['top1']:.4f} -> {after['top1']:.4f} {after['ci95']} (n = {after['n']}); scale {row['scale']:g} "
              f"bias {row['bias']:.2f}")  # fmt: skip
    print(_line("held-out leaves, prototypes", [r["new_leaves"]["top1"] for r in seeds]))
    print(_line("held-out leaves, head trained on them (reference)",
                [r["new_leaves_reference_trained"]["top1"] for r in seeds]))  # fmt: skip
    print(_line("other leaves, change", [r["other_leaves_change"] for r in seeds]))
    print(f"[holdout products; {SYNTHETIC}]")
    details = {"note": SYNTHETIC, "split": "holdout", "shots": args.shots, "leaves": leaves, "seeds": seeds}
    if not args.quick:
        value = statistics.mean(r["new_leaves"]["top1"] for r in seeds)
        write_result("new_categories_heldout_top1", value, "product top-1", None, ">=", details)


if __name__ == "__main__":
    main()
