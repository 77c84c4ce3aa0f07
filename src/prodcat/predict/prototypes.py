"""New categories without retraining: nearest-class-mean prototypes on the frozen backbone features.

A prototype is the mean, over a category's example products, of each product's mean picture embedding, where a
picture's embedding is its (pooled) stored feature, centred on the train split's mean feature and L2-normalised
(SimpleShot's "CL2N", Wang et al. 2019: centring removes the direction every post-ReLU feature shares). A picture
scores `scale * cos(embedding, prototype) + bias` for each prototype; these scores join the head's log-probabilities
as extra logits and one log-softmax renormalises them all, so a prototype's probability is
exp(s) / (1 + sum exp(s)) against the head's (already normalised) categories.

Scale and bias are chosen on val by a documented rule (`fit_scale_bias`): leave-one-leaf-out episodes over known
leaves. Each episode hides one leaf from the head (its column removed), adds it back as a prototype from `shots`
train products, and scores the val pictures; (scale, bias) minimise, on a grid, the NLL of the val pictures in their
natural mix (the re-added leaf as rare as it is in traffic), averaged over episodes. (A first rule weighed the re-added
leaf's pictures and the others 50/50; on the demo it made 5 added leaves take a third of the other leaves' holdout
products, so the natural mix replaced it; `balanced=True` keeps the old rule.) The head was trained on those leaves,
so its other columns are lower on their pictures than they would be for a truly new leaf: the episodes are optimistic
for the new leaf's recall; `benchmarks/bench_new_categories.py` measures truly held-out leaves.

Files in the run folder: prototypes.safetensors (vectors (M, D), center (D,)) and prototypes.json (one entry per
category: id, names, output label, example counts; scale, bias and how they were chosen).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.utils import atomic_write_bytes, get_logger, read_json, write_json

__all__ = [
    "Prototypes",
    "embed",
    "class_mean",
    "fit_scale_bias",
    "PROTOTYPE_TENSORS",
    "PROTOTYPE_META",
    "DEFAULT_SCALE",
    "DEFAULT_BIAS",
]

PROTOTYPE_TENSORS = "prototypes.safetensors"
PROTOTYPE_META = "prototypes.json"
DEFAULT_SCALE, DEFAULT_BIAS = 10.0, -5.0  # fallback without a val split: a prototype wins near cos 0.5 + log p / 10
SCALES = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
log = get_logger("prodcat.predict.prototypes")


def embed(features: np.ndarray, center: np.ndarray) -> np.ndarray:
    """(N, D) centred, L2-normalised embeddings of (N, D) pooled or (N, h, w, C) spatial stored features."""
    pooled = np.asarray(features, dtype=np.float32)
    pooled = pooled.mean(axis=(1, 2)) if pooled.ndim == 4 else pooled
    centred = pooled - np.asarray(center, dtype=np.float32)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def class_mean(product_features: Sequence[np.ndarray], center: np.ndarray) -> np.ndarray:
    """Unit prototype of a category from its example products (each an (n_i, ...) array of its pictures): every
    product weighs the same, whatever its number of pictures."""
    if not product_features or any(len(p) == 0 for p in product_features):
        raise ValueError("a prototype needs at least one example product, each with at least one picture")
    mean = np.mean([embed(p, center).mean(axis=0) for p in product_features], axis=0)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)


@dataclasses.dataclass
class Prototypes:
    """The added categories of a run; `labels[m]` is prototype m's column in the combined output (>= C: new)."""

    vectors: np.ndarray  # (M, D) unit
    center: np.ndarray  # (D,)
    categories: list[dict[str, Any]]  # {"category_id", "names": [l1, l2, l3], "label", "products", "pictures"}
    scale: float = DEFAULT_SCALE
    bias: float = DEFAULT_BIAS
    chosen_by: str = "default rule (no val episodes run)"

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([c["label"] for c in self.categories], dtype=np.int64)

    def output_size(self, num_classes: int) -> int:
        return max([num_classes, *(int(label) + 1 for label in self.labels)])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, M) prototype logits of stored picture features."""
        return self.scale * embed(features, self.center) @ self.vectors.T + self.bias

    def combine(self, log_probs: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Head log-probs (N, C) + prototype logits (N, M) -> (N, C + new) log-probs; a prototype of a category the
        taxonomy has replaces the head's column for it."""
        out = np.full((len(log_probs), self.output_size(log_probs.shape[1])), -np.inf, dtype=np.float64)
        out[:, : log_probs.shape[1]] = log_probs
        out[:, self.labels] = scores
        out -= out.max(axis=1, keepdims=True)
        return (out - np.log(np.exp(out).sum(axis=1, keepdims=True))).astype(np.float32)

    def add(self, vector: np.ndarray, entry: dict[str, Any]) -> Prototypes:
        """A copy with one more category (an id already added is replaced)."""
        kept = [i for i, c in enumerate(self.categories) if c["category_id"] != entry["category_id"]]
        vectors = np.concatenate([self.vectors[kept], vector[None].astype(np.float32)])
        return dataclasses.replace(self, vectors=vectors, categories=[self.categories[i] for i in kept] + [entry])

    # -- files ------------------------------------------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        """Tensors first, then the JSON (the file the Predictor watches), each written atomically."""
        import safetensors.numpy

        run_dir = Path(run_dir)
        tensors = {"vectors": np.ascontiguousarray(self.vectors, np.float32), "center": self.center.astype(np.float32)}
        atomic_write_bytes(run_dir / PROTOTYPE_TENSORS, safetensors.numpy.save(tensors))
        meta = {"scale": self.scale, "bias": self.bias, "chosen_by": self.chosen_by, "categories": self.categories}
        write_json(run_dir / PROTOTYPE_META, {"format": 1, **meta, "dim": int(self.vectors.shape[1])})

    @classmethod
    def load(cls, run_dir: str | Path) -> Prototypes | None:
        """The run's prototypes, None when it has none."""
        import safetensors.numpy

        run_dir = Path(run_dir)
        if not (run_dir / PROTOTYPE_META).is_file():
            return None
        meta = read_json(run_dir / PROTOTYPE_META)
        try:
            tensors = safetensors.numpy.load_file(str(run_dir / PROTOTYPE_TENSORS))
        except Exception as error:  # noqa: BLE001 - any unreadable file: say which and what to do
            raise ValueError(
                f"{run_dir / PROTOTYPE_TENSORS}: unreadable ({error}); delete prototypes.json and "
                "prototypes.safetensors and add the categories again"
            ) from None
        if tensors["vectors"].shape[0] != len(meta["categories"]):
            raise ValueError(f"{run_dir / PROTOTYPE_META}: {len(meta['categories'])} categories but "
                             f"{tensors['vectors'].shape[0]} vectors; add the categories again")  # fmt: skip
        return cls(
            tensors["vectors"], tensors["center"], meta["categories"], meta["scale"], meta["bias"], meta["chosen_by"]
        )

    @staticmethod
    def signature(run_dir: str | Path) -> tuple[int, int] | None:
        """(mtime_ns, size) of prototypes.json: the Predictor reloads when it changes."""
        try:
            stat = os.stat(Path(run_dir) / PROTOTYPE_META)
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size


# -- choosing scale and bias on val --------------------------------------------------------------------------------
def _episode(log_probs: np.ndarray, cos: np.ndarray, labels: np.ndarray, leaf: int) -> dict[str, np.ndarray]:
    """What one hidden-leaf episode needs: log of the head's mass left without the leaf, the true class's
    log-prob, the cosines to the re-added prototype, and which pictures are the leaf's."""
    hidden = log_probs.copy()
    hidden[:, leaf] = -np.inf
    top = hidden.max(axis=1)
    rest = top + np.log(np.exp(hidden - top[:, None]).sum(axis=1))
    return {
        "rest": rest,
        "top": top,
        "true": log_probs[np.arange(len(labels)), labels],
        "known_correct": hidden.argmax(axis=1) == labels,
        "cos": cos,
        "new": labels == leaf,
    }


def _episode_loss(
    episode: dict[str, np.ndarray], scale: float, biases: np.ndarray, balanced: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(NLL, accuracy) for each bias, over the val pictures in their natural mix (the hidden leaf is as rare as in
    traffic), or `balanced`: the mean of the hidden leaf's pictures' and the others'."""
    logit = scale * episode["cos"][None, :] + biases[:, None]  # (B, N)
    log_z = np.logaddexp(episode["rest"][None, :], logit)
    new = episode["new"][None, :]
    loss = np.where(new, log_z - logit, log_z - episode["true"][None, :])
    picked = logit > episode["top"][None, :]
    correct = np.where(new, picked, ~picked & episode["known_correct"][None, :])
    if not balanced:
        return loss.mean(axis=1), correct.mean(axis=1)
    new, other = episode["new"], ~episode["new"]
    return (
        0.5 * (loss[:, new].mean(axis=1) + loss[:, other].mean(axis=1)),
        0.5 * (correct[:, new].mean(axis=1) + correct[:, other].mean(axis=1)),
    )


def fit_scale_bias(
    log_probs: np.ndarray,
    embeddings: np.ndarray,
    labels: np.ndarray,
    prototypes: dict[int, np.ndarray],
    balanced: bool = False,
) -> tuple[float, float, float, float]:
    """(scale, bias, NLL, accuracy) over leave-one-leaf-out episodes (see the module docstring): the grid point of
    least NLL, averaged over episodes (NLL, not accuracy: separable episodes tie on accuracy).

    `log_probs` (N, C) head log-probs, `embeddings` (N, D) CL2N embeddings and `labels` (N,) of val pictures;
    `prototypes`: leaf -> unit prototype from a few train products of that leaf (leaves without val pictures are
    skipped).
    """
    episodes = [
        _episode(log_probs, embeddings @ vector, labels, leaf)
        for leaf, vector in prototypes.items()
        if (labels == leaf).any() and (labels != leaf).any()
    ]
    if not episodes:
        raise ValueError("no episode possible: no val picture of any prototype's leaf")
    best = (np.inf, DEFAULT_SCALE, DEFAULT_BIAS, 0.0)
    for scale in SCALES:
        biases = np.linspace(-scale - 10.0, scale + 2.0, 241)
        losses = [_episode_loss(episode, scale, biases, balanced) for episode in episodes]
        nll, accuracy = (np.mean(parts, axis=0) for parts in zip(*losses, strict=True))
        index = int(np.argmin(nll))
        if nll[index] < best[0] - 1e-12:
            best = (float(nll[index]), scale, float(biases[index]), float(accuracy[index]))
    return best[1], best[2], best[0], best[3]


# -- building them from a run ----------------------------------------------------------------------------------------
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def read_example_products(pictures: str | Path | None = None, bson: str | Path | None = None) -> list[list[Any]]:
    """Decoded example products: each picture file directly in `pictures` is one product, each sub-folder one
    product (its pictures); or every product of a BSON file. An undecodable picture is a one-line error."""
    from prodcat.data.images import decode_image

    if (pictures is None) == (bson is None):
        raise ValueError("give the example products as --pictures FOLDER or --bson FILE (one of them)")
    products: list[list[Any]] = []
    if bson is not None:
        from prodcat.data.bson_index import BsonReader, index_bson

        index = index_bson(bson)
        with BsonReader(bson) as reader:
            for product_id, offset, length in zip(index.product_id, index.offset, index.length, strict=True):
                found = [_decoded(decode_image, data, f"{bson}: product {int(product_id)}")
                         for data in reader.pictures(int(offset), int(length))]  # fmt: skip
                products.append(found)
        return [p for p in products if p]
    folder = Path(pictures)  # type: ignore[arg-type]
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of example pictures")
    for entry in sorted(folder.iterdir()):
        files = sorted(entry.iterdir()) if entry.is_dir() else [entry]
        found = [_decoded(decode_image, f.read_bytes(), str(f)) for f in files if f.suffix.lower() in PICTURE_SUFFIXES]
        if found:
            products.append(found)
    return products


def _decoded(decode: Any, data: bytes, where: str) -> Any:
    try:
        return decode(data)
    except Exception as error:  # noqa: BLE001 - any decode failure: name the file and stop
        raise ValueError(f"{where}: cannot decode the picture ({error}); remove it or replace it") from None


def train_center(store: Any, limit: int = 20_000, seed: int = 0) -> np.ndarray:
    """Mean pooled feature of (a sample of) the store's train pictures: the CL2N centre."""
    rows = store.split_indices("train")
    if not len(rows):
        raise ValueError(f"{store.path}: no train rows to centre the prototypes on")
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    features = store.read(rows)
    return (features.mean(axis=(1, 2)) if features.ndim == 4 else features).mean(axis=0)


def calibrate(
    predictor: Any, store: Any, center: np.ndarray, shots: int = 5, max_leaves: int = 50, max_pictures: int = 5000,
    seed: int = 0,
) -> tuple[float, float, str]:  # fmt: skip
    """(scale, bias, how) by leave-one-leaf-out episodes on the store's val split; the fallback rule without one."""
    from prodcat.features.products import group_products

    rng = np.random.default_rng(seed)
    val = store.split_indices("val")
    train = group_products(store, store.split_indices("train"))
    per_leaf = {int(leaf): np.flatnonzero(train.label == leaf) for leaf in np.unique(train.label)}
    leaves = [leaf for leaf, products in per_leaf.items() if len(products) >= shots]
    if not len(val) or len(leaves) < 2:
        return DEFAULT_SCALE, DEFAULT_BIAS, "default rule (no val split or fewer than 2 leaves with enough products)"
    leaves = sorted(rng.choice(leaves, min(max_leaves, len(leaves)), replace=False).tolist())
    if len(val) > max_pictures:
        val = np.sort(rng.choice(val, max_pictures, replace=False))
    features = store.read(val)
    prototypes = {}
    for leaf in leaves:
        chosen = rng.choice(per_leaf[leaf], shots, replace=False)
        slots = train.slots[chosen]
        prototypes[leaf] = class_mean([store.read(s[s >= 0]) for s in slots], center)
    labels = store.column("label")[val].astype(np.int64)
    scale, bias, nll, accuracy = fit_scale_bias(predictor.head_log_probs(features), embed(features, center), labels,
                                                prototypes)  # fmt: skip
    how = (f"val episodes: {len(leaves)} known leaves each hidden and re-added from {shots} train products, "
           f"{len(val)} val pictures; least NLL {nll:.3f} (accuracy {accuracy:.3f}), val's natural mix")  # fmt: skip
    return scale, bias, how


def add_category(
    run_dir: str | Path,
    category_id: int,
    names: Sequence[str],
    products: Sequence[Sequence[Any]],
    predictor: Any,
    replace: bool = False,
) -> dict[str, Any]:
    """Add (or with `replace`, override) a leaf of a run from a few decoded example products; returns its entry.

    The first category added also fixes the centre (train mean) and the scale/bias (val episodes); later ones reuse
    them, so adding a category never changes how the others score. `predictor` is the run's
    `prodcat.predict.predictor.Predictor` (its feature extractor and taxonomy), passed in so that this module, which the
    Predictor uses, never imports it.
    """
    from prodcat.features.store import FeatureStore
    from prodcat.paths import WorkPaths

    names = [str(n).strip() for n in names]
    if len(names) != 3 or not all(names):
        raise ValueError(f"--names needs three non-empty names 'L1|L2|L3', got {'|'.join(names)!r}")
    if not products:
        raise ValueError("no example products (no decodable pictures found)")
    taxonomy = predictor.taxonomy
    known = np.flatnonzero(np.asarray(taxonomy.category_ids) == int(category_id))
    if len(known) and not replace:
        raise ValueError(f"category {category_id} is already in the run's taxonomy (label {int(known[0])}); "
                         "pass --replace to score it by its prototype instead of the head")  # fmt: skip
    current = Prototypes.load(run_dir)
    if current is None:
        store = FeatureStore.open(WorkPaths(predictor.extract_config.workdir).feature_store(predictor.store_name))
        center = train_center(store)
        scale, bias, how = calibrate(predictor, store, center)
        current = Prototypes(np.zeros((0, len(center)), np.float32), center, [], scale, bias, how)
    others = [c for c in current.categories if c["category_id"] != int(category_id)]
    new_labels = [c["label"] for c in others if c["label"] >= taxonomy.num_classes]
    label = int(known[0]) if len(known) else max([taxonomy.num_classes - 1, *new_labels]) + 1
    same = [c["label"] for c in current.categories if c["category_id"] == int(category_id)]
    label = same[0] if same and not len(known) else label
    features = [predictor.image_features(list(product)) for product in products]
    entry = {
        "category_id": int(category_id),
        "names": names,
        "label": label,
        "products": len(products),
        "pictures": int(sum(len(f) for f in features)),
        "replaces_head": bool(len(known)),
    }
    updated = current.add(class_mean(features, current.center), entry)
    updated.save(run_dir)
    log.info("added category %d (%s) to %s from %d products", category_id, " > ".join(names), run_dir, len(products))
    return {**entry, "scale": updated.scale, "bias": updated.bias, "chosen_by": updated.chosen_by}
