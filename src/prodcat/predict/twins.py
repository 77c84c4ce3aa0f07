"""Training twins (issue 10): a picture byte-identical to a training picture is evidence for its product's label.

`TwinIndex` maps a picture hash (xxh3_128 of the raw bytes, as in `W/catalog/pictures.parquet`) to the labels of the
training products holding it. The Predictor built for predict and serve indexes products of the `train` split only.
How the evidence is used is a `TwinChoice`: `none`, `override` (the twins' majority label, the model breaking ties)
or `blend` (add `weight * log` of the twins' smoothed label distribution to the model's product log-probabilities).
It is chosen on val (`choose_twins`, written to `RUN/eval/twins.json`, which the Predictor reads) and its effect is
reported on holdout (`twin_effect`). The deployed index goes into the run with the choice (`RUN/twins.parquet`: hash,
product id and label of every train-split picture), so a copied run finds the same twins without its workdir.

Evidence on val and holdout: the split keeps products that share a picture on one side (duplicate groups), so a
val product never has a twin in train. Evaluation therefore also draws twins from the *other* products of the split
being evaluated (leave-one-out: never the product's own label); a group is whole inside its split, so a product sees
the twins it would see if its group were in train, the situation of a test product whose twins are training products.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prodcat.features.extract import hash_words, join_pictures, picture_table
from prodcat.features.loaders import product_sorted_rows
from prodcat.predict.aggregation import log_normalise
from prodcat.predict.run import TWIN_TABLE, TWINS_FILE, read_twins
from prodcat.utils import get_logger, progress, write_json, write_parquet

if TYPE_CHECKING:
    from prodcat.features.store import FeatureStore

__all__ = [
    "TwinChoice",
    "TwinIndex",
    "TwinMatch",
    "TwinResults",
    "Votes",
    "apply_twins",
    "candidates",
    "choose_twins",
    "digest_words",
    "load_twin_choice",
    "load_twin_table",
    "row_words",
    "save_twin_table",
    "training_pictures",
    "twin_effect",
    "twin_predictions",
]

BLEND_WEIGHTS = (0.1, 0.25, 0.5, 1.0)
SMOOTHING = 1.0  # pseudo-votes spread evenly over the classes: a label no twin holds is unlikely, not impossible
log = get_logger("prodcat.predict.twins")


@dataclasses.dataclass(frozen=True)
class TwinChoice:
    """How twin evidence changes a product's log-probabilities."""

    mode: str = "none"  # none | override | blend
    weight: float | None = None  # blend only

    def __post_init__(self) -> None:
        if self.mode not in ("none", "override", "blend"):
            raise ValueError(f"twin mode must be none, override or blend, got {self.mode!r}")
        if (self.mode == "blend") != (self.weight is not None and self.weight > 0):
            raise ValueError("blend needs a weight > 0, and only blend takes one")

    @property
    def name(self) -> str:
        return f"blend:{self.weight:g}" if self.mode == "blend" else self.mode

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TwinChoice:
        """The choice RUN/eval/twins.json holds."""
        return cls(data["mode"], data.get("weight"))


def candidates() -> list[TwinChoice]:
    """What `choose_twins` compares on val, simplest first (a tie keeps the simpler one)."""
    return [TwinChoice(), TwinChoice("override"), *(TwinChoice("blend", w) for w in BLEND_WEIGHTS)]


@dataclasses.dataclass
class Votes:
    """Twin evidence of a batch of products, one entry per (product, label): matched (picture, training product)
    pairs, a training product counted once per picture it shares."""

    product: np.ndarray  # (V,) index of the query product
    label: np.ndarray  # (V,)
    count: np.ndarray  # (V,) > 0


@dataclasses.dataclass
class TwinMatch:
    """What the HTTP answer says about one product's photos."""

    pictures_matched: int  # uploaded photos byte-identical to a training picture
    products: int  # distinct training products holding one of them
    images: list[int]  # indices of the matched photos
    applied: str  # the choice that changed the answer ("none": reported only)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def digest_words(digests: list[bytes]) -> np.ndarray:
    """16-byte digests -> (N, 2) uint64 words, the layout `hash_words` gives the picture table."""
    if not digests:
        return np.zeros((0, 2), dtype=np.uint64)
    return np.frombuffer(b"".join(digests), dtype="<u8").reshape(-1, 2).astype(np.uint64)


class TwinIndex:
    """Sorted picture hashes -> the labels (and ids) of the products holding them, as two CSR tables."""

    def __init__(self, words: np.ndarray, product_id: np.ndarray, label: np.ndarray) -> None:
        words, product_id, label = np.asarray(words, np.uint64), np.asarray(product_id), np.asarray(label, np.int64)
        order = np.lexsort((product_id, words[:, 1], words[:, 0]))
        words, product_id, label = words[order], product_id[order], label[order]
        changed = np.r_[True, (np.diff(words, axis=0) != 0).any(axis=1)] if len(words) else np.zeros(0, bool)
        fresh = changed | np.r_[True, product_id[1:] != product_id[:-1]] if len(words) else changed
        words, product_id, label, changed = words[fresh], product_id[fresh], label[fresh], changed[fresh]
        starts = np.flatnonzero(changed)
        self.keys = words[starts]  # (H, 2)
        self.product_start = np.r_[starts, len(words)]
        self.product_id = product_id
        group = np.cumsum(changed) - 1
        pairs = np.lexsort((label, group))
        group, label = group[pairs], label[pairs]
        run = np.r_[True, (group[1:] != group[:-1]) | (label[1:] != label[:-1])] if len(group) else changed
        run_start = np.flatnonzero(run)
        self.label = label[run_start]
        self.count = np.diff(np.r_[run_start, len(label)]).astype(np.float64)
        self.label_start = np.searchsorted(group[run_start], np.arange(len(starts) + 1))

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_table(cls, table: pa.Table) -> TwinIndex:
        """The index of a (hash, product_id, label) table: `training_pictures`, or a run's twins.parquet."""
        return cls(hash_words(table["hash"]), table["product_id"].to_numpy(), table["label"].to_numpy())

    @classmethod
    def from_workdir(cls, workdir: str | Path, splits: tuple[str, ...] = ("train",)) -> TwinIndex | None:
        """Pictures of the train.bson products in `splits` with their catalog labels; None without the table."""
        table = training_pictures(workdir, splits)
        return None if table is None else cls.from_table(table)

    def find(self, words: np.ndarray) -> np.ndarray:
        """Position of each hash in the index, -1 when absent."""
        words = np.asarray(words, np.uint64).reshape(-1, 2)
        first = np.searchsorted(self.keys[:, 0], words[:, 0], side="left")
        last = np.searchsorted(self.keys[:, 0], words[:, 0], side="right")
        found = np.full(len(words), -1, dtype=np.int64)
        single = np.flatnonzero(last - first == 1)  # the first word alone nearly always decides
        hit = self.keys[first[single], 1] == words[single, 1]
        found[single[hit]] = first[single[hit]]
        for i in np.flatnonzero(last - first > 1):  # shared first word: compare the second
            hits = first[i] + np.flatnonzero(self.keys[first[i] : last[i], 1] == words[i, 1])
            found[i] = hits[0] if len(hits) else -1
        return found

    def votes(self, query_product: np.ndarray, words: np.ndarray, own_label: np.ndarray | None = None) -> Votes:
        """Label votes per query product. `own_label` (per query picture): the query products are in the index
        themselves, so each takes its own vote back out (leave-one-out)."""
        query_product = np.asarray(query_product, np.int64)
        words = np.asarray(words, np.uint64).reshape(-1, 2)
        pairs = np.unique(np.column_stack([query_product.astype(np.uint64), words]), axis=0, return_index=True)[1]
        position = self.find(words[pairs])
        hit = pairs[position >= 0]
        position = position[position >= 0]
        start, stop = self.label_start[position], self.label_start[position + 1]
        length = stop - start
        flat = np.repeat(start - np.cumsum(length) + length, length) + np.arange(length.sum())
        product = np.repeat(query_product[hit], length)
        label, count = self.label[flat], self.count[flat]
        if own_label is not None:
            product = np.r_[product, query_product[hit]]
            label = np.r_[label, np.asarray(own_label, np.int64)[hit]]
            count = np.r_[count, -np.ones(len(hit))]
        return _sum_votes(product, label, count)

    def match(self, words: np.ndarray, applied: str) -> TwinMatch | None:
        """The training products behind one product's photos; None when no photo matches."""
        position = self.find(words)
        images = np.flatnonzero(position >= 0)
        if not len(images):
            return None
        ids = [self.product_id[self.product_start[p] : self.product_start[p + 1]] for p in position[images]]
        return TwinMatch(len(images), int(len(np.unique(np.concatenate(ids)))), images.tolist(), applied)


def training_pictures(workdir: str | Path, splits: tuple[str, ...] = ("train",)) -> pa.Table | None:
    """(hash, product_id, label) of every picture of the train.bson products in `splits` (catalog labels); None
    without W/catalog/pictures.parquet."""
    from prodcat.data.catalog import load_catalog

    pictures = picture_table(workdir)
    if pictures is None:
        return None
    catalog = load_catalog(workdir, "train")
    keep = pc.is_in(catalog["split"].cast(pa.string()), pa.array(list(splits), pa.string()))
    catalog = catalog.filter(keep)
    ids = catalog["product_id"].to_numpy()
    order = np.argsort(ids)
    pictures = pictures.filter(pc.equal(pictures["source"], "train"))
    pictures = pictures.filter(pc.is_in(pictures["product_id"], pa.array(ids)))
    picture_ids = pictures["product_id"].to_numpy()
    labels = catalog["label"].to_numpy()[order][np.searchsorted(ids[order], picture_ids)]
    return pa.table({"hash": pictures["hash"], "product_id": pa.array(picture_ids, pa.int64()),
                     "label": pa.array(labels, pa.int32())})  # fmt: skip


def save_twin_table(run_dir: str | Path, workdir: str | Path) -> Path | None:
    """RUN/twins.parquet: the deployed index's pictures (train split), so the run predicts without its workdir;
    None (nothing written) without a picture table."""
    table = training_pictures(workdir, ("train",))
    return None if table is None else write_parquet(Path(run_dir) / TWIN_TABLE, table)


def load_twin_table(run_dir: str | Path) -> TwinIndex | None:
    """The run's own twin index (RUN/twins.parquet), None when the run has none."""
    import pyarrow.parquet as pq

    path = Path(run_dir) / TWIN_TABLE
    if not path.is_file():
        return None
    try:
        return TwinIndex.from_table(pq.read_table(path))
    except (OSError, ValueError, KeyError) as error:  # pyarrow's errors are OSError / ValueError subclasses
        raise ValueError(f"{path}: unreadable twin table ({error}); re-run `prodcat evaluate` to write it") from None


def _sum_votes(product: np.ndarray, label: np.ndarray, count: np.ndarray) -> Votes:
    if not len(product):
        empty = np.zeros(0, np.int64)
        return Votes(empty, empty, np.zeros(0))
    order = np.lexsort((label, product))
    product, label, count = product[order], label[order], count[order]
    run = np.flatnonzero(np.r_[True, (product[1:] != product[:-1]) | (label[1:] != label[:-1])])
    total = np.add.reduceat(count, run)
    keep = total > 0
    return Votes(product[run][keep], label[run][keep], total[keep])


def apply_twins(log_probs: np.ndarray, votes: Votes, choice: TwinChoice) -> np.ndarray:
    """Product log-probabilities (P, C) with the twin evidence of `votes` folded in (rows without twins unchanged)."""
    if choice.mode == "none" or not len(votes.product):
        return log_probs
    matched, inverse = np.unique(votes.product, return_inverse=True)
    classes = log_probs.shape[1]
    counts = np.zeros((len(matched), classes))
    np.add.at(counts, (inverse, votes.label), votes.count)
    total = counts.sum(axis=1, keepdims=True)
    base = log_probs[matched].astype(np.float64)
    if choice.mode == "override":
        # The twins' label shares; the model's probabilities (scaled far below one vote) only break ties.
        scores = np.log(counts / total + 1e-6 * np.exp(base))
    else:
        scores = base + float(choice.weight) * np.log((counts + SMOOTHING / classes) / (total + SMOOTHING))
    out = log_probs.astype(np.float64, copy=True)
    out[matched] = log_normalise(scores)
    return out.astype(log_probs.dtype, copy=False)


def load_twin_choice(run_dir: str | Path) -> TwinChoice | None:
    """The choice evaluation made on val (RUN/eval/twins.json), None when none was made yet."""
    data = read_twins(run_dir)
    return None if data is None else TwinChoice.from_json(data)


# -- choosing on val, reporting on holdout ---------------------------------------------------------------------------
@dataclasses.dataclass
class TwinResults:
    """Top-1 product predictions of one split under every candidate choice."""

    split: str
    product_id: np.ndarray  # (P,)
    label: np.ndarray  # (P,) true leaf
    matched: np.ndarray  # (P,) bool: some picture has a twin
    top1: dict[str, np.ndarray]  # candidate name -> (P,) predicted label
    evidence: str  # where twins came from

    def accuracy(self, name: str) -> float:
        return float(np.mean(self.top1[name] == self.label)) if len(self.label) else float("nan")


def _split_products(store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(valid rows sorted by product then image, product ids, first row of each product, product labels)."""
    rows, product_id, starts = product_sorted_rows(store, split)
    if not len(rows):
        raise ValueError(f"{store.path}: no valid {split!r} images in this feature store")
    labels = store.column("label")[rows].astype(np.int64)[starts]
    return rows, product_id[starts], starts, labels


def row_words(workdir: str | Path, store: FeatureStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash words, found) of store rows, from the picture table."""
    pictures = picture_table(workdir)
    if pictures is None:
        return np.zeros((len(rows), 2), np.uint64), np.zeros(len(rows), bool)
    table = store.rows.take(pa.array(rows))
    joined = join_pictures(pictures, table["product_id"], table["image_index"], table["split"])
    return hash_words(joined["hash"]), joined["hash"].is_valid().to_numpy(zero_copy_only=False)


def twin_predictions(
    predictor: Any,
    split: str,
    store: FeatureStore | None = None,
    choices: list[TwinChoice] | None = None,
    within_split: bool = True,
    batch_size: int = 4096,
) -> TwinResults:
    """Product predictions of `split` from the run's cached features, with and without twins (every choice).

    Twins are products of the train split and, with `within_split`, the other products of `split` itself (see the
    module docstring: the grouped split leaves val and holdout without train twins).
    """
    from prodcat.features.store import FeatureStore
    from prodcat.paths import WorkPaths

    workdir = predictor.extract_config.workdir
    store = store or FeatureStore.open(WorkPaths(workdir).feature_store(predictor.store_name))
    choices = choices or candidates()
    rows, product_id, starts, labels = _split_products(store, split)
    splits = ("train", split) if within_split and split != "train" else ("train",)
    index = TwinIndex.from_workdir(workdir, splits)
    words, found = row_words(workdir, store, rows)
    counts = np.diff(np.r_[starts, len(rows)])
    row_product = np.repeat(np.arange(len(starts)), counts)
    top1: dict[str, list[np.ndarray]] = {choice.name: [] for choice in choices}
    matched = np.zeros(len(starts), dtype=bool)
    bar = progress(total=len(rows), desc=f"twins {split}", unit="image")
    first = 0
    while first < len(starts):
        last = min(len(starts), int(np.searchsorted(starts, starts[first] + batch_size, side="right")))
        last = max(last, first + 1)
        lo, hi = int(starts[first]), int(starts[last]) if last < len(starts) else len(rows)
        product_log_probs = predictor.product_log_probs_from_features(
            store.read(rows[lo:hi]), row_product[lo:hi] - first, last - first
        )
        votes = _chunk_votes(index, row_product[lo:hi] - first, words[lo:hi], found[lo:hi], labels[first:last], splits)
        matched[first + np.unique(votes.product)] = True
        for choice in choices:
            top1[choice.name].append(apply_twins(product_log_probs, votes, choice).argmax(axis=1))
        bar.update(hi - lo)
        first = last
    bar.close()
    evidence = "train split" + (f" + other {split} products (leave-one-out)" if len(splits) > 1 else "")
    joined = {name: np.concatenate(parts) for name, parts in top1.items()}
    return TwinResults(split, product_id, labels, matched, joined, evidence)


def _chunk_votes(
    index: TwinIndex | None,
    product: np.ndarray,
    words: np.ndarray,
    found: np.ndarray,
    labels: np.ndarray,
    splits: tuple[str, ...],
) -> Votes:
    if index is None or not found.any():
        return _sum_votes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    own = labels[product[found]] if len(splits) > 1 else None  # the split's own products are in the index
    return index.votes(product[found], words[found], own_label=own)


def choose_twins(predictor: Any, split: str = "val", store: FeatureStore | None = None) -> dict[str, Any]:
    """Pick none / override / blend(w) by product top-1 on `split` (val); written to RUN/eval/twins.json."""
    results = twin_predictions(predictor, split, store)
    accuracy = {choice.name: results.accuracy(choice.name) for choice in candidates()}
    best = candidates()[0]
    for choice in candidates()[1:]:  # strictly better only: a tie keeps the simpler choice
        if accuracy[choice.name] > accuracy[best.name]:
            best = choice
    payload = {
        "mode": best.mode,
        "weight": best.weight,
        "name": best.name,
        "selected_on": split,
        "hash": "xxh3_128",
        "evidence": results.evidence,
        "products": len(results.label),
        "matched_products": int(results.matched.sum()),
        "top1": accuracy,
    }
    if not results.matched.any():
        log.info("twins: no %s product has a twin, nothing to choose on; kept 'none'", split)
    save_twin_table(predictor.run_dir, predictor.extract_config.workdir)  # before the choice that points to it
    write_json(Path(predictor.run_dir) / "eval" / TWINS_FILE, payload)
    return payload


def twin_effect(predictor: Any, split: str = "holdout", store: FeatureStore | None = None) -> dict[str, Any]:
    """Product top-1 on `split` (holdout) without and with the choice made on val, and the paired gain's 95%
    interval over products (normal approximation of the per-product differences)."""
    choice = load_twin_choice(predictor.run_dir)
    if choice is None:
        raise FileNotFoundError(f"{predictor.run_dir}/eval/{TWINS_FILE}: no twin choice yet; run choose_twins on val")
    results = twin_predictions(predictor, split, store, choices=[TwinChoice(), choice])
    without = results.top1["none"] == results.label
    with_twins = results.top1[choice.name] == results.label
    difference = with_twins.astype(np.float64) - without
    n = len(difference)
    half = 1.96 * float(difference.std(ddof=1)) / np.sqrt(n) if n > 1 else float("nan")
    gain = float(difference.mean()) if n else float("nan")
    return {
        "split": split,
        "choice": choice.name,
        "selected_on": "val",
        "evidence": results.evidence,
        "products": n,
        "matched_products": int(results.matched.sum()),
        "top1_without": float(without.mean()) if n else float("nan"),
        "top1_with": float(with_twins.mean()) if n else float("nan"),
        "gain": gain,
        "gain_ci95": [gain - half, gain + half],
    }
