"""`prodcat evaluate`: every metric against a brute-force numpy computation on a tiny trained run; files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prodcat.config import EvalConfig, TrainConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.evaluate.evaluation import (
    SplitError,
    _require_split,
    bootstrap_ci,
    choose_threshold,
    confidence_curve,
    confusions,
    evaluate,
    frequency_groups,
    frequency_thresholds,
    macro_accuracy,
    product_hits,
    proportion_ci,
    summary_lines,
    top_k,
)
from prodcat.features.store import FeatureStore
from prodcat.paths import WorkPaths
from prodcat.predict.predictor import AGGREGATIONS, Predictor
from prodcat.report.runs import EVAL_FIGURES, LEVERS_FILE, draw_evaluation
from store_fixtures import write_labelled_store

ROWS = [
    (10, "MAISON & <JARDIN>", "ABRI", "ABRI DE JARDIN"),
    (11, "MAISON & <JARDIN>", "ABRI", "CARTE PRÉPAYÉE "),
    (12, "MAISON & <JARDIN>", "OUTIL", "GROS ŒUVRE"),
    (13, "SPORT", "CYCLES", "VÉLO"),
    (14, "SPORT", "CYCLES", "CASQUE"),
    (15, "SPORT", "ABRI", "ABRI DE JARDIN"),  # same level-2 name under another level 1: another group
    (16, "LIBRAIRIE", "LIVRE", "ROMAN"),
    (17, "LIBRAIRIE", "PAPETERIE", "CAHIER"),
]
COUNTS = {10: 40, 11: 30, 12: 25, 13: 20, 14: 12, 15: 8, 16: 5, 17: 3}
DIM = 8
STORE = "toy"


def build_workdir(
    root: Path, seed: int = 0, permute_holdout: bool = False, splits: tuple[str, ...] = ("train", "val", "holdout")
) -> tuple[Taxonomy, FeatureStore]:
    """Taxonomy + a feature store of products with 1-4 images whose features are noisy class centres.

    Leaves are drawn by COUNTS (a long tail). `permute_holdout` shuffles the labels of the holdout products (the
    features stay): nothing chosen on val may change.
    """
    rng = np.random.default_rng(seed)
    taxonomy = Taxonomy.from_rows(ROWS, COUNTS)
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    centres = rng.normal(size=(taxonomy.num_classes, DIM)) * 1.2
    weights = np.array([COUNTS[row[0]] for row in ROWS], float)
    weights = weights[np.argsort(taxonomy.labels_of(np.array([row[0] for row in ROWS])))]
    features, product_id, image_index, label, split = [], [], [], [], []
    next_id = 5000
    for name in splits:
        for i in range({"train": 120}.get(name, 64)):
            leaf = int(rng.choice(taxonomy.num_classes, p=weights / weights.sum()))
            for j in range(i % 4 + 1):
                features.append(centres[leaf] + rng.normal(size=DIM) * 1.4)
                product_id.append(next_id)
                image_index.append(j)
                label.append(leaf)
                split.append(name)
            next_id -= 7  # ids decrease in store order: evaluate must not assume sorted ids
    label_array = np.array(label)
    if permute_holdout:
        label_array = _permute_products(label_array, np.array(product_id), np.array(split) == "holdout", rng)
    store = write_labelled_store(root, taxonomy, np.array(features), product_id=np.array(product_id),
                                 image_index=np.array(image_index), label=label_array, split=np.array(split),
                                 shard_size=50)  # fmt: skip
    return taxonomy, store


def _permute_products(label: np.ndarray, product_id: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """Shuffle whole products' labels among the masked rows (every image of a product keeps one label)."""
    ids, first, inverse = np.unique(product_id[mask], return_index=True, return_inverse=True)
    shuffled = rng.permutation(label[mask][first])
    assert (shuffled != label[mask][first]).mean() > 0.5  # the labels really change
    result = label.copy()
    result[mask] = shuffled[inverse]
    return result


COMMON = dict(
    store=STORE,
    lr=0.05,
    warmup_steps=0,
    epochs=12,
    batch_size=32,
    eval_every=40,
    device="cpu",
    hidden_dim=16,
    dropout=0.0,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from prodcat.train.loop import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("evalwork")
    taxonomy, store = build_workdir(root)
    common = dict(workdir=str(root), **COMMON)
    runs = {
        "flat": train(TrainConfig(head="linear", loss="softmax", run_name="flat", **common)),
        "hier": train(TrainConfig(head="hier", loss="softmax", run_name="hier", **common)),
    }
    return {"root": root, "taxonomy": taxonomy, "store": store, "runs": runs}


def _split_log_probs(
    run: Path, store: FeatureStore, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Predictor]:
    predictor = Predictor.load(run)
    rows = store.split_indices(split)
    log_probs = predictor.log_probs_from_features(store.read(rows))
    return log_probs, store.column("label")[rows].astype(np.int64), store.column("product_id")[rows], predictor


def _brute_products(log_probs: np.ndarray, product_ids: np.ndarray) -> dict:
    """Per product and aggregation: (top-1 label, top-5 labels, log-prob of every class), by loops."""
    result: dict = {method: {} for method in AGGREGATIONS}
    for pid in np.unique(product_ids):
        lp = log_probs[product_ids == pid].astype(np.float64)
        probs = np.exp(lp)
        mean_prob = probs.mean(axis=0)
        mean_log = lp.mean(axis=0)
        votes = np.bincount(lp.argmax(axis=1), minlength=lp.shape[1])
        vote_order = sorted(range(lp.shape[1]), key=lambda c: (-votes[c], -mean_prob[c]))
        normalised_log = mean_log - np.log(np.exp(mean_log).sum())
        result["mean_prob"][int(pid)] = (np.argsort(-mean_prob)[:5], np.log(mean_prob))
        result["mean_logprob"][int(pid)] = (np.argsort(-mean_log)[:5], normalised_log)
        result["vote"][int(pid)] = (np.array(vote_order[:5]), None)
    return result


def _brute_choice(run: Path, store: FeatureStore) -> str:
    """The aggregation with the best product (top-1, top-5) on val, by loops."""
    log_probs, labels, product_ids, _ = _split_log_probs(run, store, "val")
    brute = _brute_products(log_probs, product_ids)
    pids = np.unique(product_ids)
    truth = np.array([labels[product_ids == p][0] for p in pids])
    scores = {}
    for method in AGGREGATIONS:
        tops = np.array([brute[method][int(p)][0] for p in pids])
        scores[method] = (np.mean(tops[:, 0] == truth), np.mean((tops == truth[:, None]).any(axis=1)))
    return max(AGGREGATIONS, key=lambda m: (*scores[m], -AGGREGATIONS.index(m)))


def _brute_macro(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean([np.mean(pred[label == leaf] == leaf) for leaf in np.unique(label)]))


def test_metrics_match_brute_force(workdir: dict) -> None:
    taxonomy, store = workdir["taxonomy"], workdir["store"]
    # Levers off (tau fixed at 0, no temperature): the plain per-picture head and aggregation, against loops.
    config = EvalConfig(run=str(workdir["runs"]["flat"]), target_accuracy=0.9, tau_grid=(0.0,), calibrate=False)
    metrics = evaluate(config)
    assert metrics["split"] == "holdout" and metrics["selection_split"] == "val" and not metrics["optimistic"]
    assert metrics["logit_adjustment"]["tau"] == 0.0 and metrics["calibration"]["temperature"] == 1.0
    log_probs, labels, product_ids, _ = _split_log_probs(workdir["runs"]["flat"], store, "holdout")
    pred = log_probs.argmax(axis=1)
    assert metrics["images"] == len(labels) and metrics["products"] == len(np.unique(product_ids)) == 64
    assert metrics["protocol"] == f"selected on val, reported on holdout, n = 64 products ({len(labels)} images)"
    assert metrics["image"]["top1"] == pytest.approx(np.mean(pred == labels))
    assert metrics["image"]["n"] == len(labels) and metrics["product"]["n"] == 64
    assert metrics["image"]["macro"] == pytest.approx(_brute_macro(pred, labels))
    top5 = np.argsort(-log_probs, axis=1)[:, :5]
    assert metrics["image"]["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(axis=1)))
    assert metrics["image"]["loss"] == pytest.approx(-np.mean(log_probs[np.arange(len(labels)), labels]), rel=1e-5)
    assert 0.3 < metrics["image"]["top1"] < 1.0  # learned something, still makes errors to analyse
    lo, hi = metrics["image"]["top1_ci95"]
    assert lo < metrics["image"]["top1"] < hi and hi - lo > 0.05  # 64 products: a wide interval

    brute = _brute_products(log_probs, product_ids)
    pids = np.unique(product_ids)
    product_label = np.array([labels[product_ids == p][0] for p in pids])
    num_images = np.array([(product_ids == p).sum() for p in pids])
    assert sorted(num_images.tolist()) == sorted([i % 4 + 1 for i in range(64)])
    for method in AGGREGATIONS:
        tops = np.array([brute[method][int(p)][0] for p in pids])
        block = metrics["product"]["methods"][method]
        assert block["top1"] == pytest.approx(np.mean(tops[:, 0] == product_label)), method
        assert block["top5"] == pytest.approx(np.mean((tops == product_label[:, None]).any(axis=1))), method
        if method == "vote":
            assert block["loss"] is None
        else:
            loss = -np.mean([brute[method][int(p)][1][y] for p, y in zip(pids, product_label, strict=True)])
            assert block["loss"] == pytest.approx(loss, rel=1e-5), method
        for k in (1, 2, 3, 4):
            entry = metrics["product"]["by_num_images"][method][str(k)]
            assert entry["products"] == int((num_images == k).sum()) == 16
            assert entry["top1"] == pytest.approx(np.mean((tops[:, 0] == product_label)[num_images == k]))
    chosen = _brute_choice(workdir["runs"]["flat"], store)  # chosen on val, whatever the holdout says
    assert metrics["product"]["aggregation"] == chosen and metrics["product"]["chosen_on"] == "val"
    chosen_top1 = np.array([brute[chosen][int(p)][0][0] for p in pids])
    hits = int((chosen_top1 == product_label).sum())
    assert metrics["product"]["top1"] == pytest.approx(hits / 64)
    assert metrics["product"]["top1_ci95"] == pytest.approx(proportion_ci(hits, 64))
    assert metrics["product"]["macro"] == pytest.approx(_brute_macro(chosen_top1, product_label))
    lo, hi = metrics["product"]["macro_ci95"]
    assert lo <= metrics["product"]["macro"] <= hi
    _check_taxonomy(metrics["taxonomy"], taxonomy, pred, labels, chosen_top1, product_label)
    _check_frequency(metrics["taxonomy"]["frequency"], store, chosen_top1, product_label)


def _check_frequency(frequency: dict, store: FeatureStore, product_pred: np.ndarray, product_label: np.ndarray) -> None:
    """Groups by train-split pictures per leaf (not taxonomy counts), thresholds scaled and stated."""
    train = store.column("split") == "train"
    pictures = np.bincount(store.column("label")[train].astype(np.int64), minlength=len(ROWS))
    scale = pictures[pictures > 0].mean() / (12_371_293 / 5_270)
    thresholds = frequency["thresholds"]
    assert thresholds["head_above"] == pytest.approx(1000 * scale)
    assert thresholds["tail_below"] == pytest.approx(100 * scale)
    assert f"{1000 * scale:,.1f}" in thresholds["rule"]
    group = np.where(pictures > 1000 * scale, "head", np.where(pictures < 100 * scale, "tail", "medium"))
    for name in ("head", "medium", "tail"):
        leaves = np.flatnonzero(group == name)
        assert frequency[name]["categories"] == len(leaves), name
        mine = np.isin(product_label, leaves)
        assert frequency[name]["products"] == int(mine.sum()), name
        if mine.any():
            correct = product_pred[mine] == product_label[mine]
            assert frequency[name]["product_top1"] == pytest.approx(correct.mean()), name
            assert frequency[name]["train_pictures_max"] == pictures[leaves].max()
    assert sum(frequency[g]["products"] for g in ("head", "medium", "tail")) == len(product_label)


def _check_taxonomy(
    block: dict,
    taxonomy: Taxonomy,
    image_pred: np.ndarray,
    image_label: np.ndarray,
    product_pred: np.ndarray,
    product_label: np.ndarray,
) -> None:
    names = {label: taxonomy.names(label) for label in range(taxonomy.num_classes)}
    for unit, pred, truth in (("image", image_pred, image_label), ("product", product_pred, product_label)):
        same1 = np.array([names[p][0] == names[t][0] for p, t in zip(pred, truth, strict=True)])
        same2 = np.array([names[p][:2] == names[t][:2] for p, t in zip(pred, truth, strict=True)])
        wrong = pred != truth
        assert block[unit]["level1"] == pytest.approx(same1.mean())
        assert block[unit]["level2"] == pytest.approx(same2.mean())
        assert block[unit]["leaf"] == pytest.approx(1 - wrong.mean())
        severity = block[unit]["severity"]
        assert severity["errors"] == int(wrong.sum()) > 0
        assert severity["same_level2"] == pytest.approx(same2[wrong].mean())
        assert severity["same_level1"] == pytest.approx(same1[wrong].mean())
        assert severity["other_level1"] == pytest.approx(1 - same1[wrong].mean())
    pairs: dict = {}
    for p, t in zip(product_pred, product_label, strict=True):
        if p != t:
            pairs[(int(t), int(p))] = pairs.get((int(t), int(p)), 0) + 1
    expected = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:10]
    got = [((c["true"]["label"], c["predicted"]["label"]), c["count"]) for c in block["confusions"]]
    assert got == expected
    first = block["confusions"][0]
    assert (first["true"]["level1"], first["true"]["level2"], first["true"]["level3"]) == names[expected[0][0][0]]


def _check_threshold_semantics(table, confidence: dict, target: float) -> None:
    """Accept prob >= t. Reached at t; no lower score reaches it with more coverage (brute force on the table)."""
    prob, correct = table["top1_prob"].to_numpy(), table["correct"].to_numpy()
    for score in np.unique(prob):
        accepted = prob >= score
        if confidence["threshold"] is not None and score < confidence["threshold"]:
            assert correct[accepted].mean() < target
    if confidence["threshold"] is not None:
        accepted = prob >= confidence["threshold"] - 1e-7  # float32 storage of the float64 score
        assert correct[accepted].mean() >= target
        assert confidence["coverage"] == pytest.approx(accepted.mean())
    else:
        assert all(correct[prob >= score].mean() < target for score in np.unique(prob))


def test_threshold_and_files(workdir: dict) -> None:
    run = workdir["runs"]["flat"]
    target = 0.9
    out = run / "eval"
    # On val (selected and reported on val, labelled optimistic) the threshold is the brute-force choice.
    on_val = evaluate(EvalConfig(run=str(run), split="val", target_accuracy=target))
    assert on_val["optimistic"] and on_val["protocol"].startswith("selected on val, reported on val: optimistic")
    _check_threshold_semantics(pq.read_table(out / "predictions.parquet").to_pandas(), on_val["confidence"], target)

    metrics = evaluate(EvalConfig(run=str(run), target_accuracy=target))
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["product"]["top1"] == metrics["product"]["top1"] and saved["split"] == "holdout"
    # Evaluation writes numbers only; the report draws its figures (and the levers table) from them.
    assert not list(out.glob("*.png")) and not (out / LEVERS_FILE).exists()
    curve = json.loads((out / "curves.json").read_text(encoding="utf-8"))["confidence"]
    assert len(curve["coverage"]) == len(curve["accuracy"]) == len(curve["threshold"]) > 1
    drawn = draw_evaluation(run)
    assert {path.name for path in drawn} == {*EVAL_FIGURES.values(), LEVERS_FILE}
    for name in EVAL_FIGURES.values():
        assert (out / name).stat().st_size > 1000, name
    assert draw_evaluation(run) == []  # up to date: nothing redrawn
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(table) == metrics["products"]
    assert {"product_id", "num_images", "label", "top1_label", "top1_prob", "top3_label", "top3_prob"} <= set(table)
    assert (table["top1_prob"] >= table["top2_prob"]).all() and (table["top2_prob"] >= table["top3_prob"]).all()
    assert table["correct"].mean() == pytest.approx(metrics["product"]["top1"])
    # The holdout applies val's threshold and reports what it really accepts there.
    confidence = metrics["confidence"]
    assert confidence["threshold"] == on_val["confidence"]["threshold"] and confidence["chosen_on"] == "val"
    assert confidence["selection"]["coverage"] == on_val["confidence"]["coverage"]
    if confidence["threshold"] is not None:
        accepted = table["top1_prob"].to_numpy() >= confidence["threshold"] - 1e-7
        assert confidence["coverage"] == pytest.approx(accepted.mean())
        assert confidence["accepted"] == int(accepted.sum())
        if accepted.any():
            hits = int(table["correct"].to_numpy()[accepted].sum())
            assert confidence["accuracy"] == pytest.approx(hits / accepted.sum())
            assert confidence["accuracy_ci95"] == pytest.approx(proportion_ci(hits, int(accepted.sum())))
    predictor = Predictor.load(run)
    assert predictor.aggregation == metrics["product"]["aggregation"]
    assert predictor.accept_threshold == confidence["threshold"]
    lines = summary_lines(metrics)
    assert lines[0] == metrics["protocol"] and "[" in lines[1] and "chosen on val" in lines[1]


def test_unreachable_target_and_fixed_aggregation(workdir: dict) -> None:
    metrics = evaluate(EvalConfig(run=str(workdir["runs"]["flat"]), aggregation="vote", target_accuracy=1.0))
    assert metrics["product"]["aggregation"] == "vote"
    assert metrics["product"]["top1"] == metrics["product"]["methods"]["vote"]["top1"]
    table = pq.read_table(workdir["runs"]["flat"] / "eval" / "predictions.parquet").to_pandas()
    correct = table.sort_values("top1_prob", ascending=False)["correct"].to_numpy()
    if not correct[0]:  # the most confident product is wrong: 100 % is out of reach at every threshold
        assert metrics["confidence"]["threshold"] is None and metrics["confidence"]["note"]
    assert "hier" not in metrics


def test_hier_heads(workdir: dict) -> None:
    run, store, taxonomy = workdir["runs"]["hier"], workdir["store"], workdir["taxonomy"]
    metrics = evaluate(EvalConfig(run=str(run)))
    assert metrics["head"] == "hier"
    predictor = Predictor.load(run)
    rows = store.split_indices("holdout")
    with torch.no_grad():
        own = predictor.model.head_log_probs(torch.from_numpy(store.read(rows)))
    labels = store.column("label")[rows].astype(np.int64)
    level1 = own["level1"].argmax(dim=1).numpy()
    level2 = own["level2"].argmax(dim=1).numpy()
    assert metrics["hier"]["level1_head"]["image"] == pytest.approx(np.mean(level1 == taxonomy.leaf_level1[labels]))
    assert metrics["hier"]["level2_head"]["image"] == pytest.approx(np.mean(level2 == taxonomy.leaf_level2[labels]))
    assert 0.0 <= metrics["hier"]["level1_head"]["product"] <= 1.0


def test_product_hits_are_evaluate_s_product_top1(workdir: dict) -> None:
    """What compare and sweep score: the same products and hits as `evaluate` reports, choices on val, no files."""

    def files(run: Path) -> list[tuple[str, int]]:
        return sorted((path.name, path.stat().st_mtime_ns) for path in (run / "eval").glob("*"))

    for run in workdir["runs"].values():
        before = files(run)
        hits = product_hits(run)
        assert files(run) == before  # nothing written
        metrics = evaluate(EvalConfig(run=str(run)))
        table = pq.read_table(run / "eval" / "predictions.parquet").to_pandas()
        assert hits.split == "holdout" and hits.aggregation == metrics["product"]["aggregation"]
        assert hits.product_id.tolist() == table["product_id"].tolist() == sorted(hits.product_id.tolist())
        assert hits.correct.tolist() == table["correct"].tolist()
        assert hits.top1 == pytest.approx(metrics["product"]["top1"])
        assert hits.checkpoint_step == metrics["checkpoint_step"]
    assert product_hits(workdir["runs"]["flat"], aggregation="vote").aggregation == "vote"


def test_missing_split_is_a_clear_error(workdir: dict) -> None:
    with pytest.raises(SplitError, match="no valid 'test' images"):
        evaluate(EvalConfig(run=str(workdir["runs"]["flat"]), split="test"))


def test_no_holdout_says_what_to_rerun(tmp_path: Path) -> None:
    """An old workdir (train / val only): one line naming the store and what to re-run, no silent fallback."""
    _, store = build_workdir(tmp_path, splits=("train", "val"))
    with pytest.raises(
        SplitError, match=r"no 'holdout' rows.*re-run `prodcat ingest` then `prodcat extract`.*--split val"
    ):
        _require_split(store, str(tmp_path), "holdout")
    catalog = WorkPaths(tmp_path).catalog_table("train")
    catalog.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"product_id": [1, 2], "split": ["train", "holdout"]}), catalog)
    with pytest.raises(SplitError, match="the catalog has it: re-run `prodcat extract"):
        _require_split(store, str(tmp_path), "holdout")
    _require_split(store, str(tmp_path), "val")  # present: no error


def test_holdout_labels_never_change_a_choice(workdir: dict, tmp_path: Path) -> None:
    """Same data, holdout labels shuffled, trained and evaluated again: checkpoint, aggregation, threshold agree."""
    from prodcat.train.loop import train

    build_workdir(tmp_path, permute_holdout=True)
    shuffled_run = train(TrainConfig(head="linear", loss="softmax", run_name="flat", workdir=str(tmp_path), **COMMON))
    config = dict(target_accuracy=0.8, objective="macro")  # macro: a tau > 0 is likely, so it is tested too
    original = evaluate(EvalConfig(run=str(workdir["runs"]["flat"]), **config))
    shuffled = evaluate(EvalConfig(run=str(shuffled_run), **config))
    for key in ("checkpoint", "aggregation", "aggregation_top1", "threshold", "tau", "temperature", "objective"):
        assert shuffled["selection"][key] == original["selection"][key], key
    assert shuffled["logit_adjustment"]["val"] == original["logit_adjustment"]["val"]
    assert shuffled["calibration"]["val_nll_after"] == original["calibration"]["val_nll_after"]
    assert shuffled["checkpoint_step"] == original["checkpoint_step"]
    assert shuffled["product"]["aggregation"] == original["product"]["aggregation"]
    assert shuffled["confidence"]["threshold"] == original["confidence"]["threshold"]
    # The holdout numbers do move: the labels reached the reported metrics and nothing else.
    assert shuffled["product"]["top1"] < original["product"]["top1"] - 0.1


# -- the small exact pieces -------------------------------------------------------------------------------------------
def test_top_k_orders_and_breaks_ties_by_label() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 2.0, 1.0, 0.0]])
    labels, values = top_k(scores, 3)
    assert labels.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert values.tolist() == [[0.5, 0.5, 0.2], [3.0, 2.0, 1.0]]
    assert top_k(scores, 10)[0].shape == (2, 4)


def test_confidence_curve_ties_and_threshold_choice() -> None:
    score = np.array([0.9, 0.9, 0.8, 0.7, 0.6, 0.6])
    correct = np.array([True, True, False, True, True, False])
    curve = confidence_curve(score, correct)
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.7, 0.6]  # tied scores are accepted together
    assert curve["coverage"].tolist() == pytest.approx([2 / 6, 3 / 6, 4 / 6, 1.0])
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 2 / 3, 3 / 4, 4 / 6])
    picked = choose_threshold(curve, 0.75)  # 0.7 reaches 75 % with more coverage than 0.9
    assert (picked["threshold"], picked["coverage"], picked["accuracy"]) == (0.7, pytest.approx(4 / 6), 0.75)
    assert choose_threshold(curve, 1.0)["threshold"] == 0.9
    missed = choose_threshold(confidence_curve(score, np.zeros(6, bool)), 0.95)
    assert missed["threshold"] is None and missed["coverage"] == 0.0 and "95.0%" in missed["note"]


def test_frequency_groups_and_confusions() -> None:
    rows = ROWS + [(18, "VIDE", "RIEN", "JAMAIS VENDU")]
    taxonomy = Taxonomy.from_rows(rows, COUNTS)
    # Thresholds given: head > 1000, tail < 100, medium in between (both ends included); no picture: -1.
    pictures = np.array([5000, 1001, 1000, 500, 100, 99, 12, 1, 0])
    group = frequency_groups(pictures, {"head_above": 1000.0, "tail_below": 100.0})
    assert group.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, -1]
    pred = np.array([1, 1, 2, 0, 0, 3])
    label = np.array([0, 0, 2, 1, 1, 3])
    pairs = confusions(pred, label, taxonomy)
    assert [(p["true"]["label"], p["predicted"]["label"], p["count"]) for p in pairs] == [(0, 1, 2), (1, 0, 2)]
    assert pairs[0]["same_level2"] and pairs[0]["share_of_errors"] == 0.5 and pairs[0]["share_of_true"] == 1.0


def test_frequency_thresholds_scale_with_pictures_per_leaf() -> None:
    full = np.full(5270, 12_371_293 / 5270)  # full scale: Cdiscount's 1,000 / 100
    assert frequency_thresholds(full)["head_above"] == pytest.approx(1000.0)
    assert frequency_thresholds(full)["tail_below"] == pytest.approx(100.0)
    tenth = frequency_thresholds(full / 10)  # a 10% subsample of every leaf: thresholds / 10
    assert (tenth["head_above"], tenth["tail_below"]) == (pytest.approx(100.0), pytest.approx(10.0))
    few = frequency_thresholds(np.array([0, 2347.49, 2347.49]))  # fewer leaves, same mean: same thresholds
    assert few["head_above"] == pytest.approx(1000.0, rel=1e-4)
    assert "head > 1,000.0" in few["rule"] and "tail < 100.0" in few["rule"]


def test_frequency_groups_on_real_cdiscount_counts(shared_data_dir: Path) -> None:
    """Real images per leaf: 1,532 / 2,686 / 1,052 leaves, whole file or its 90% train share."""
    counts = np.array(list(json.loads((shared_data_dir / "images_per_category.json").read_text()).values()))
    assert counts.sum() == 12_371_293
    for share in (1.0, 0.9):
        group = frequency_groups(counts * share)
        assert np.bincount(group, minlength=3).tolist() == [1532, 2686, 1052], share


# -- intervals and macro accuracy -------------------------------------------------------------------------------------
def test_proportion_ci_is_wilson() -> None:
    # Wilson 95% for 50/100: 0.5 -+ 0.0962 (textbook value 0.4038 .. 0.5962).
    assert proportion_ci(50, 100) == pytest.approx([0.40383, 0.59617], abs=1e-5)
    assert proportion_ci(0, 10) == pytest.approx([0.0, 0.27753], abs=1e-5)
    assert proportion_ci(10, 10) == pytest.approx([0.72247, 1.0], abs=1e-5)
    assert proportion_ci(0, 0) == [0.0, 1.0]


def test_bootstrap_ci_of_a_proportion_is_near_wilson() -> None:
    rng = np.random.default_rng(1)
    hit = (rng.random(2000) < 0.3).astype(float)
    interval = bootstrap_ci({"top1": lambda w: float(w @ hit / w.sum())}, len(hit), resamples=400)["top1"]
    assert interval == pytest.approx(proportion_ci(int(hit.sum()), len(hit)), abs=0.006)
    again = bootstrap_ci({"top1": lambda w: float(w @ hit / w.sum())}, len(hit), resamples=400)["top1"]
    assert again == interval  # deterministic


def test_macro_accuracy_is_mean_per_leaf_recall() -> None:
    rng = np.random.default_rng(2)
    label = rng.integers(0, 9, 300)
    label[label == 4] = 5  # a leaf absent from the split does not count
    pred = np.where(rng.random(300) < 0.6, label, rng.integers(0, 9, 300))
    brute = np.mean([np.mean(pred[label == leaf] == leaf) for leaf in np.unique(label)])
    hit = (pred == label).astype(float)
    assert macro_accuracy(hit, np.ones(300), label) == pytest.approx(brute)
    assert macro_accuracy(hit, np.ones(300), label) != pytest.approx(hit.mean(), abs=1e-3)
    # Weights repeat items: a draw that takes item 0 twice equals the data with item 0 duplicated.
    weights = np.ones(300)
    weights[0] = 2
    doubled = np.r_[0, np.arange(300)]
    assert macro_accuracy(hit, np.ones(300), label, weights) == pytest.approx(
        np.mean([np.mean(hit[doubled][label[doubled] == leaf]) for leaf in np.unique(label)])
    )


def test_cli_prints_protocol_and_fails_in_one_line(workdir: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prodcat.cli import app
    from prodcat.train.loop import train

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--run", str(workdir["runs"]["flat"])])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("selected on val, reported on holdout, n = 64 products")
    for name in (*EVAL_FIGURES.values(), LEVERS_FILE):  # the CLI draws what evaluation wrote as numbers
        assert (workdir["runs"]["flat"] / "eval" / name).is_file(), name
    assert "product top-1" in lines[1] and "[" in lines[1] and "n/a" in lines[-1]
    build_workdir(tmp_path, splits=("train", "val"))  # an old workdir: no holdout
    old = train(TrainConfig(head="linear", run_name="old", workdir=str(tmp_path), **{**COMMON, "epochs": 1}))
    result = runner.invoke(app, ["evaluate", "--run", str(old)])
    assert result.exit_code == 2 and result.exception is not None and not isinstance(result.exception, ValueError)
    error = [line for line in result.output.splitlines() if line.strip()]
    assert len(error) == 1 and "no 'holdout' rows" in error[0] and "re-run `prodcat ingest`" in error[0]
