"""`prodcat extract`: run a frozen pretrained backbone over catalog images into a resumable feature store.

Work unit = one shard of the row plan. Shards are computed in batches aligned to shard boundaries, so a resumed or
distributed run feeds the network exactly the same batches as an uninterrupted single-process run. Rank r of a
torchrun job takes the missing shards k with k % world_size == r; rank 0 writes the plan and finalises.
Reading + decoding + packing happen in DataLoader workers (or, with 0 workers, on one thread a batch ahead) while the
main process runs the forward pass. Pictures become features through one `FeatureExtractor` (features/extractor.py),
the object the Predictor uses too, so stored and served features cannot disagree; config.json records its engine.

TTA (issue 14): with `tta="flip_mean"` every computed row is the mean of the picture's features and its mirror's
(the runner runs both in one batch), so the store layout, dedupe copies and every reader stay as they are; the
manifest and config.json record the mode, and the Predictor applies the same one.

Dedupe (issue 10): with `catalog/pictures.parquet` (one xxh3_128 hash per picture, written by ingest), each distinct
picture is decoded and run once, by the row that holds it first in the plan (its owner); every other row holding it
gets a copy of that vector, so the store layout and every reader stay unchanged. Owner rows are fixed by the plan,
hence a shard computes the same batches whatever ran before. A copy whose owner sits in another shard is filled as
soon as that shard is written; in a torchrun job the owner may belong to a rank that has not got there yet, so the
shard is kept as "partial" (features of its own pictures written, copies pending) and completed after a barrier.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from prodcat.config import ExtractConfig, save_config
from prodcat.data.bson_index import BsonReader
from prodcat.data.catalog import catalog_source, load_catalog
from prodcat.data.images import DEFAULT_MAX_PIXELS
from prodcat.distributed import DistInfo, barrier, cleanup, init_distributed
from prodcat.errors import UserError, require_catalog
from prodcat.features.store import FeatureStore, ShardResult, StoreError, make_rows
from prodcat.paths import WorkPaths
from prodcat.utils import get_logger, progress, read_json

if TYPE_CHECKING:
    from prodcat.features.backbones import Preprocessor
    from prodcat.features.extractor import FeatureExtractor

__all__ = [
    "extract",
    "RowPlan",
    "auto_workers",
    "plan_rows",
    "hash_words",
    "picture_table",
    "picture_digest",
    "join_pictures",
]

log = get_logger("prodcat.extract")
# Test hook: pause after each shard so a kill -9 test can land mid-run deterministically.
_SLOW_SHARDS = float(os.environ.get("PRODCAT_SLOW_SHARDS", "0"))


@dataclasses.dataclass
class RowPlan:
    """One entry per image to extract, in store order, plus where to read it and which row computes it."""

    rows: pa.Table  # the store's row table
    sources: list[str]  # BSON paths
    source: np.ndarray  # (N,) index into sources
    offset: np.ndarray  # (N,) product document offset
    length: np.ndarray  # (N,) product document length
    image_index: np.ndarray  # (N,) picture within the product
    owner: np.ndarray | None = None  # (N,) the row whose forward this row's vector is (itself unless a copy)
    picture_offset: np.ndarray | None = None  # (N,) absolute byte offset of the picture, -1 when unknown
    picture_length: np.ndarray | None = None  # (N,)
    hashes: np.ndarray | None = None  # (N, 2) uint64 words of the xxh3_128 digest (zeros when unknown)
    dedupe: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the manifest records

    def __post_init__(self) -> None:
        if self.owner is None:
            self.owner = np.arange(self.rows.num_rows, dtype=np.int64)


def plan_rows(workdir: str | Path, splits: tuple[str, ...], limit: int | None = None, dedupe: bool = True) -> RowPlan:
    """Expand catalog products into one row per image: train/val/holdout from train.bson, test from test.bson."""
    parts: list[dict[str, np.ndarray]] = []
    sources: list[str] = []
    for split in splits:
        name = "test" if split == "test" else "train"
        table = load_catalog(workdir, name, split=None if name == "test" else split)
        if limit is not None:
            table = table.slice(0, limit)
        sources.append(str(catalog_source(workdir, name)))
        parts.append(_expand(table, split, len(sources) - 1))
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]} if parts else {}
    rows = make_rows(
        merged["product_id"],
        merged["image_index"],
        merged["label"],
        merged["level1"],
        merged["level2"],
        merged["split"],
    )
    plan = RowPlan(rows, sources, merged["source"], merged["offset"], merged["length"], merged["image_index"])
    _plan_dedupe(plan, workdir, dedupe)
    return plan


def _catalog_name(split: np.ndarray) -> np.ndarray:
    """The `source` of pictures.parquet for store splits: test rows come from test.bson, all others from train."""
    return np.where(np.asarray(split, dtype=object) == "test", "test", "train").astype(object)


def picture_table(workdir: str | Path) -> pa.Table | None:
    """`W/catalog/pictures.parquet` (source, product_id, image_index, hash, offset, length), None when absent."""
    from prodcat.data.dedupe import load_pictures, pictures_path

    return load_pictures(workdir) if pictures_path(workdir).is_file() else None


def hash_words(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_binary(16) digests -> (N, 2) little-endian uint64 words (nulls -> zeros), for numpy sorting."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    array = array.fill_null(b"\0" * 16) if array.null_count else array
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)[array.offset * 16 : (array.offset + len(array)) * 16]
    return data.view("<u8").reshape(-1, 2).copy()


def picture_digest(data: bytes) -> bytes:
    """The picture hash of the per-picture table: xxh3_128 of the raw bytes (the server hashes uploads alike)."""
    import xxhash

    return xxhash.xxh3_128_digest(data)


def join_pictures(
    pictures: pa.Table, product_id: pa.ChunkedArray, image_index: pa.ChunkedArray, split: pa.ChunkedArray
) -> pa.Table:
    """The picture table's row (hash, offset, length; nulls where it has none) for each store row, in row order."""
    left = pa.table(
        {
            "source": pa.array(_catalog_name(split.to_numpy(zero_copy_only=False)), pa.string()),
            "product_id": product_id.cast(pa.int64()),
            "image_index": image_index.cast(pa.int16()),
            "row": pa.array(np.arange(len(product_id), dtype=np.int64)),
        }
    )
    joined = left.join(pictures, keys=["source", "product_id", "image_index"], join_type="left outer")
    return joined.sort_by("row")


def _first_rows(hashes: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """For each of the n rows, the first row with the same hash (itself when unique or not in `rows`). Two-word
    lexsort, stable, so the first of each run is the earliest row (np.unique on 16-byte voids is several times
    slower at 12 M rows)."""
    owner = np.arange(n, dtype=np.int64)
    if not len(rows):
        return owner
    words = hashes[rows]
    order = np.lexsort((words[:, 1], words[:, 0]))
    ordered = words[order]
    starts = np.flatnonzero(np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)])
    sizes = np.diff(np.r_[starts, len(order)])
    owner[rows[order]] = rows[np.repeat(order[starts], sizes)]
    return owner


def _plan_dedupe(plan: RowPlan, workdir: str | Path, enabled: bool) -> None:
    """Attach hashes and picture offsets, and point every repeated picture at its first row (its owner)."""
    n = plan.rows.num_rows
    info: dict[str, Any] = {"enabled": False, "hash": "xxh3_128", "rows": n, "computed": n, "copied": 0}
    pictures = picture_table(workdir) if enabled and n else None
    if not enabled or pictures is None:
        info["reason"] = "--no-dedupe" if not enabled else "W/catalog/pictures.parquet not found (re-run ingest)"
        log.info("dedupe off: %s; every row is decoded and run", info["reason"])
        plan.dedupe = info
        return
    table = plan.rows
    joined = join_pictures(pictures, table["product_id"], table["image_index"], table["split"])
    found = joined["hash"].is_valid().to_numpy(zero_copy_only=False)
    plan.hashes = hash_words(joined["hash"])
    plan.picture_offset = joined["offset"].fill_null(-1).to_numpy().astype(np.int64)
    plan.picture_length = joined["length"].fill_null(-1).to_numpy().astype(np.int64)
    rows = np.flatnonzero(found)
    plan.owner = _first_rows(plan.hashes, rows, n)
    computed = int(np.sum(plan.owner == np.arange(n)))
    info.update(enabled=True, reason=None, computed=computed, copied=n - computed, rows_without_hash=int(n - len(rows)))
    log.info("dedupe on: %d rows, %d distinct pictures computed, %d rows copied", n, computed, n - computed)
    plan.dedupe = info


def _expand(table: pa.Table, split: str, source: int) -> dict[str, np.ndarray]:
    num_images = table["num_images"].to_numpy().astype(np.int64)
    repeat = np.maximum(num_images, 0)
    image_index = np.arange(repeat.sum()) - np.repeat(np.cumsum(repeat) - repeat, repeat)

    def column(name: str, default: int = -1) -> np.ndarray:
        values = table[name].to_numpy() if name in table.column_names else np.full(table.num_rows, default)
        return np.repeat(values, repeat)

    return {
        "product_id": column("product_id"),
        "image_index": image_index,
        "label": column("label"),
        "level1": column("level1"),
        "level2": column("level2"),
        "split": np.repeat(np.array([split], dtype=object), repeat.sum()),
        "source": np.full(repeat.sum(), source, dtype=np.int64),
        "offset": column("offset"),
        "length": column("length"),
    }


class _BatchDataset(Dataset):
    """Item i = one batch of rows to compute (never crossing a shard): decoded, preprocessed, failures listed."""

    def __init__(self, plan: RowPlan, batches: list[_Batch], preprocess: Preprocessor, max_pixels: int) -> None:
        self.plan, self.batches, self.preprocess, self.max_pixels = plan, batches, preprocess, max_pixels
        self._readers: dict[int, BsonReader] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def _reader(self, source: int) -> BsonReader:
        if source not in self._readers:
            self._readers[source] = BsonReader(self.plan.sources[source])
        return self._readers[source]

    def _direct(self, row: int) -> bytes | None:
        """The picture read straight from its offset in pictures.parquet (no document parse), checked by hash."""
        plan = self.plan
        if plan.picture_offset is None or plan.picture_offset[row] < 0 or plan.hashes is None:
            return None
        offset, length = int(plan.picture_offset[row]), int(plan.picture_length[row])
        mapped = self._reader(int(plan.source[row]))._map
        data = bytes(mapped[offset : offset + length]) if mapped is not None else b""
        if np.frombuffer(picture_digest(data), "<u8").tolist() != plan.hashes[row].tolist():
            raise StoreError(
                f"{plan.sources[int(plan.source[row])]}: the picture of product {int(plan.rows['product_id'][row])} "
                f"at byte {offset} does not match W/catalog/pictures.parquet (the BSON changed since ingest?); "
                "re-run `prodcat ingest`, or extract with --no-dedupe"
            )
        return data

    def __getitem__(self, item: int) -> dict[str, Any]:
        from prodcat.data.images import ImageDecodeError, decode_image

        batch = self.batches[item]
        image_index = self.plan.image_index
        images, good, invalid = [], [], []
        cached: tuple[tuple[int, int], list[bytes]] | None = None
        for row in batch.rows.tolist():
            key = (int(self.plan.source[row]), int(self.plan.offset[row]))
            try:
                picture = self._direct(row)
                if picture is None:
                    if cached is None or cached[0] != key:
                        cached = (key, self._reader(key[0]).pictures(key[1], int(self.plan.length[row])))
                    index = int(image_index[row])
                    if index >= len(cached[1]):
                        raise ImageDecodeError(f"image {index} missing from the product document")
                    picture = cached[1][index]
                images.append(decode_image(picture, max_pixels=self.max_pixels))
                good.append(row)
            except StoreError:
                raise  # a stale picture table is the run's problem, not this picture's
            except Exception as error:  # noqa: BLE001 - a bad image or document is masked, never fatal
                invalid.append((row, f"{type(error).__name__}: {error}"))
        # uint8: the runner normalises on its device (a quarter of the bytes through IPC and host-to-GPU copies).
        packed = self.preprocess.pack(images) if images else None
        return {
            "shard": batch.shard,
            "count": len(batch.rows),
            "final": batch.final,
            "rows": np.asarray(good, dtype=np.int64),
            "batch": packed,
            "invalid": invalid,
        }


def _ahead(dataset: _BatchDataset) -> Iterator[dict[str, Any]]:
    """In-process decoding one batch ahead, on a thread: JPEG decode and the forward both release the GIL, so the
    next batch is read while the model runs."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prodcat-decode") as pool:
        pending = pool.submit(dataset.__getitem__, 0) if len(dataset) else None
        for item in range(1, len(dataset) + 1):
            current = pending.result()
            pending = pool.submit(dataset.__getitem__, item) if item < len(dataset) else None
            yield current


def auto_workers(device: torch.device) -> int:
    """Decode workers: on a CPU-only host the forward already uses every core, and a worker process only adds
    contention and IPC (measured on 2 cores: in-process decode 1.05x the model-only rate, one worker 0.85x); 0 means
    decoding on a thread one batch ahead. With a GPU doing the forward, the CPU cores are free to decode (14 workers
    on a 16-core H200 host: 9,032 img/s against 6,954 with 8)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 0 if cpus <= 8 else min(4, cpus // 8)
    return max(1, min(16, cpus - 2))


@dataclasses.dataclass(frozen=True)
class _Batch:
    shard: int
    rows: np.ndarray  # store rows to compute (owners only), ascending
    final: bool  # the shard's last batch: its copies are filled and it is written after this one


def _shard_batches(store: FeatureStore, shards: list[int], batch_size: int, owner: np.ndarray) -> list[_Batch]:
    """Batches of the rows each shard computes itself, aligned to shard starts (a resumed or distributed run feeds
    the network the same batches); a shard of copies only gets one empty batch, so it is still written."""
    batches = []
    for shard in shards:
        first, last = store.shard_rows(shard)
        rows = np.arange(first, last, dtype=np.int64)
        computed = rows[owner[first:last] == rows]
        chunks = [computed[s : s + batch_size] for s in range(0, len(computed), batch_size)] or [computed]
        batches += [_Batch(shard, chunk, index == len(chunks) - 1) for index, chunk in enumerate(chunks)]
    return batches


def _fill_copies(store: FeatureStore, shard: int, result: ShardResult, owner: np.ndarray) -> bool:
    """Copy each duplicate row's vector (and mask) from its owner row; False when an owner's shard is not written
    yet (another rank's), leaving those rows to `_complete_partial`."""
    first, last = store.shard_rows(shard)
    rows = np.arange(first, last, dtype=np.int64)
    copies = np.flatnonzero(owner[first:last] != rows)
    source = owner[first:last][copies]
    shard_of = source // store.shard_size
    if not all(s == shard or store.has_own_pictures(int(s)) for s in np.unique(shard_of)):
        inside = shard_of == shard
        copies, source, shard_of = copies[inside], source[inside], shard_of[inside]
        complete = False
    else:
        complete = True
    invalid = dict(result.invalid)
    filled = {row for row, _ in result.invalid}
    for other in np.unique(shard_of).tolist():
        where = np.flatnonzero(shard_of == other)
        start = other * store.shard_size
        if other == shard:
            features, reasons = result.features, invalid
        else:
            features, reasons = np.load(store.shard_path(other), mmap_mode="r"), dict(store.shard_invalid(other))
        result.features[copies[where]] = features[source[where] - start]
        for row, owner_row in zip(copies[where].tolist(), (source[where] - start).tolist(), strict=True):
            if owner_row in reasons and row not in filled:
                result.invalid.append((row, reasons[owner_row]))
    return complete


def _complete_partial(store: FeatureStore, shards: list[int], owner: np.ndarray) -> None:
    """Second pass of a distributed dedupe run: every shard has its own pictures now, fill the pending copies."""
    for shard in shards:
        if not store.is_partial(shard):
            continue
        result = ShardResult(np.load(store.shard_path(shard)), store.shard_invalid(shard))
        if not _fill_copies(store, shard, result, owner):
            raise StoreError(f"{store.path}: shard {shard} still waits for another shard; re-run the same command")
        store.write_shard(shard, result)


def extract(config: ExtractConfig) -> Path:
    """Extract features for `config.splits`; returns the store path. Safe to re-run: finishes what is missing."""
    from prodcat.features.extractor import FeatureExtractor

    config = check_inputs(config)  # before the model loads: a missing catalog fails at once
    info = init_distributed(config.distributed)
    try:
        paths = WorkPaths(config.workdir)
        extractor = FeatureExtractor.from_config(config, device=info.device)
        config = dataclasses.replace(config, engine=extractor.engine)  # config.json says what made the store
        plan = plan_rows(config.workdir, config.splits, config.limit, dedupe=config.dedupe)
        store = _open_store(paths.feature_store(config.name), plan, extractor, config, info)
        mine = [shard for shard in store.missing_shards() if shard % info.world_size == info.rank]
        todo = [shard for shard in mine if not store.is_partial(shard)]
        _run_shards(store, todo, plan, extractor, config, info)
        barrier(info)
        _complete_partial(store, mine, plan.owner)
        barrier(info)
        if info.is_main:
            store.finalize()
            log.info(
                "store %s: %d rows (%d computed, %d copied), %d masked images, mode %s",
                store.path,
                len(store),
                plan.dedupe["computed"],
                plan.dedupe["copied"],
                store.manifest.get("invalid_rows", 0),
                extractor.engine,
            )
        barrier(info)
        return store.path
    finally:
        cleanup(info)


def available_splits(workdir: str | Path) -> set[str]:
    """Splits the catalog has rows for: train/val/holdout from catalog/train.parquet, test when test.bson was
    ingested."""
    paths = WorkPaths(workdir)
    column = pq.read_table(paths.catalog_table("train"), columns=["split"]).column("split")
    found = {str(value) for value in column.cast(pa.string()).unique().to_pylist() if value is not None}
    if paths.catalog_table("test").is_file():
        found.add("test")
    return found


def check_inputs(config: ExtractConfig) -> ExtractConfig:
    """The catalog exists and the backbone name is known; splits the catalog lacks (no test.bson, no holdout) are
    dropped with one log line. Returns the config with the splits that will be extracted."""
    from prodcat.features.backbones import get_spec  # timm: loaded here, not on import

    require_catalog(config.workdir)
    get_spec(config.backbone)
    present = available_splits(config.workdir)
    kept = tuple(split for split in config.splits if split in present)
    skipped = [split for split in config.splits if split not in present]
    if not kept:
        raise UserError(
            f"{WorkPaths(config.workdir).catalog}: none of the splits {', '.join(config.splits)} is in the catalog "
            f"(it has {', '.join(sorted(present)) or 'none'}); pass --split with some of those"
        )
    if skipped:
        log.info("skipping split(s) %s: not in the catalog (test needs test.bson at ingest)", ", ".join(skipped))
    return dataclasses.replace(config, splits=kept)


def _open_store(
    path: Path, plan: RowPlan, extractor: FeatureExtractor, config: ExtractConfig, info: DistInfo
) -> FeatureStore:
    spec = extractor.spec
    meta = {
        "backbone": config.backbone,
        "weights_id": extractor.weights_id,
        "kind": config.features,
        "preprocessing": {
            "input_size": list(spec.input_size),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
        },
        "splits": list(config.splits),
        "limit": config.limit,
        "mode": extractor.engine,  # the engine (config.json's `engine` too, where the Predictor reads it)
        # Why auto chose its precision: bf16 vs float32 cosine on the calibration photos (None when not measured).
        "bf16_calibration_cosine": extractor.calibration_cosine,
        # Rows computed (one per distinct picture) vs copied from an identical picture's row.
        "dedupe": plan.dedupe,
        # Test-time augmentation baked into every vector; the Predictor applies the same (from config.json).
        "tta": config.tta,
    }
    if info.is_main:
        _check_dedupe_matches(path, plan.dedupe)
        _check_tta_matches(path, config.tta)
        FeatureStore.create(path, plan.rows, extractor.feature_shape(), config.shard_size, meta)
        save_config(config, path / "config.json")
    barrier(info)
    return FeatureStore(path)


def _check_dedupe_matches(path: Path, dedupe: dict[str, Any]) -> None:
    """A store is finished the way it was started: copies and computed rows agree to float16 rounding, not bits."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return
    before = bool((read_json(manifest).get("dedupe") or {}).get("enabled", False))
    if before != bool(dedupe.get("enabled")):
        raise StoreError(
            f"{path} was started with dedupe {'on' if before else 'off'} and this run has it "
            f"{'on' if dedupe.get('enabled') else 'off'}; re-run with {'--dedupe' if before else '--no-dedupe'} "
            "or choose another --name"
        )


def _check_tta_matches(path: Path, tta: str) -> None:
    """A store's vectors all have one TTA mode: resuming with another would mix two kinds of feature."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return
    before = read_json(manifest).get("tta", "none")  # stores from before TTA existed are plain
    if before != tta:
        raise StoreError(
            f"{path} was started with --tta {before} and this run asks for --tta {tta}; "
            f"re-run with --tta {before} or choose another --name"
        )


def _run_shards(
    store: FeatureStore,
    shards: list[int],
    plan: RowPlan,
    extractor: FeatureExtractor,
    config: ExtractConfig,
    info: DistInfo,
) -> None:
    batches = _shard_batches(store, shards, config.batch_size, plan.owner)
    if not batches:
        return
    dataset = _BatchDataset(plan, batches, extractor.preprocess, max_pixels=DEFAULT_MAX_PIXELS)
    workers = auto_workers(info.device) if config.workers is None else config.workers
    loader = (
        DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=4,
            persistent_workers=False,
            pin_memory=info.device.type == "cuda",
        )
        if workers
        else _ahead(dataset)
    )
    pending: dict[int, ShardResult] = {}
    total = sum(len(batch.rows) for batch in batches)
    bar = progress(total=total, desc=f"extract[{info.rank}]" if info.enabled else "extract", unit="img")
    # Where the main process spends its time: waiting on decode workers means decode-bound (add --workers),
    # forward means model-bound (the accelerator is the limit), write means disk-bound.
    seconds = {"wait": 0.0, "forward": 0.0, "write": 0.0}
    clock = time.perf_counter()
    for item in loader:
        now = time.perf_counter()
        seconds["wait"] += now - clock
        shard = int(item["shard"])
        first, last = store.shard_rows(shard)
        result = pending.setdefault(shard, ShardResult(np.zeros((last - first, *store.feature_shape), np.float16), []))
        if item["batch"] is not None:
            result.features[np.asarray(item["rows"]) - first] = extractor(item["batch"])
        result.invalid += [(row - first, reason) for row, reason in item["invalid"]]
        bar.update(int(item["count"]))
        clock = time.perf_counter()
        seconds["forward"] += clock - now
        if item["final"]:
            result = pending.pop(shard)
            store.write_shard(shard, result, partial=not _fill_copies(store, shard, result, plan.owner))
            if _SLOW_SHARDS:
                time.sleep(_SLOW_SHARDS)
            now, clock = clock, time.perf_counter()
            seconds["write"] += clock - now
    bar.close()
    busy = sum(seconds.values())
    log.info(
        "rank %d: %d images computed in %.1f s (%s) with %d decode workers",
        info.rank,
        total,
        busy,
        ", ".join(f"{name} {value / max(busy, 1e-9):.0%}" for name, value in seconds.items()),
        workers,
    )
