"""The on-disk feature store: float16 shards that memory-map, a row table and a manifest.

Layout of `W/features/<name>/`:
  manifest.json        backbone, weights id, preprocessing, feature shape, dtype, rows, shard size, completed shards,
                       tta (test-time augmentation baked into the vectors: none | flip_mean; absent means none)
  rows.parquet         one row per image: row, product_id, image_index, label, level1, level2, split, valid
  shards/00000.npy     float16 array (rows_in_shard, *feature_shape), rows [k*S, (k+1)*S) of rows.parquet
  shards/00000.json    written after the .npy: its presence marks the shard complete; lists undecodable images
  shards/00000.part.json  (dedupe, torchrun) the .npy holds the shard's own pictures, copies from other shards
                       are still pending; replaced by 00000.json once they are filled
  errors.json          (product_id, image_index, reason) of every masked image, written by `finalize`

The row plan is fixed before any shard is computed, so a killed run restarts by computing only the shards whose
marker is missing, and the result is byte-identical to an uninterrupted run. Shards are independent, which is also
how ranks of a distributed run split the work.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prodcat.utils import atomic_open, read_json, write_json, write_parquet

__all__ = ["FeatureStore", "ShardResult", "StoreError", "ROW_COLUMNS", "make_rows", "write_store"]

ROW_COLUMNS = ("row", "product_id", "image_index", "label", "level1", "level2", "split", "valid")
FORMAT_VERSION = 1


class StoreError(RuntimeError):
    """A feature store is missing, incomplete or does not match what was asked."""


@dataclasses.dataclass
class ShardResult:
    features: np.ndarray  # (rows, *feature_shape) float16
    invalid: list[tuple[int, str]]  # (row within shard, reason)


class FeatureStore:
    """Read side (and the low-level write side used by extraction) of one store directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._shards: dict[int, np.ndarray] = {}
        self._rows: pa.Table | None = None
        self._manifest: dict[str, Any] | None = None

    # -- creation ------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, rows: pa.Table, feature_shape: tuple[int, ...], shard_size: int, meta: dict[str, Any]
    ) -> FeatureStore:
        """Write the row plan and manifest of a new (empty) store; an existing store must match exactly."""
        store = cls(path)
        manifest = {
            "format": FORMAT_VERSION,
            "feature_shape": list(feature_shape),
            "dtype": "float16",
            "rows": rows.num_rows,
            "shard_size": shard_size,
            "num_shards": max(1, -(-rows.num_rows // shard_size)),
            "complete": False,
            **meta,
        }
        if store.manifest_path.is_file():
            store._check_matches(manifest, rows)
            return store
        (store.path / "shards").mkdir(parents=True, exist_ok=True)
        write_parquet(store.rows_path, rows)
        write_json(store.manifest_path, manifest)
        return store

    def _check_matches(self, manifest: dict[str, Any], rows: pa.Table) -> None:
        existing = self.manifest
        keys = ("feature_shape", "rows", "shard_size", "backbone", "weights_id", "kind", "preprocessing")
        differing = [k for k in keys if existing.get(k) != manifest.get(k)]
        if existing.get("tta", "none") != manifest.get("tta", "none"):  # absent: a store from before TTA, plain
            differing.append("tta")
        wanted = rows.select(["product_id", "image_index"])
        existing_rows = pq.read_table(self.rows_path, columns=["product_id", "image_index"])
        if not existing_rows.cast(wanted.schema).equals(wanted):  # stores written before int16 held int8
            differing.append("rows")
        if differing:
            raise StoreError(
                f"{self.path} already holds a different store (differs in {', '.join(differing)}); "
                "choose another --name or delete it"
            )

    # -- paths and metadata ----------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def rows_path(self) -> Path:
        return self.path / "rows.parquet"

    def shard_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}.npy"

    def marker_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}.json"

    def partial_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:05d}.part.json"

    def is_partial(self, shard: int) -> bool:
        return not self.marker_path(shard).is_file() and self.partial_path(shard).is_file()

    def has_own_pictures(self, shard: int) -> bool:
        """Whether the .npy holds the vectors this shard computes itself (complete or partial)."""
        return self.marker_path(shard).is_file() or self.partial_path(shard).is_file()

    def shard_invalid(self, shard: int) -> list[tuple[int, str]]:
        """(row within shard, reason) of the masked images recorded so far (complete or partial marker)."""
        path = self.marker_path(shard) if self.marker_path(shard).is_file() else self.partial_path(shard)
        return [(int(row), str(reason)) for row, reason in read_json(path)["invalid"]]

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if not self.manifest_path.is_file():
                raise StoreError(f"{self.path}: no feature store here (manifest.json missing); run `prodcat extract`")
            self._manifest = read_json(self.manifest_path)
        return self._manifest

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["feature_shape"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, len(self))

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.marker_path(k).is_file()]

    # -- writing ----------------------------------------------------------------------------------------------------
    def write_shard(self, shard: int, result: ShardResult, partial: bool = False) -> None:
        """Features first, marker second: a marker always means the features beside it are whole (a partial
        marker: whole except the copies still to fill)."""
        start, stop = self.shard_rows(shard)
        expected = (stop - start, *self.feature_shape)
        if result.features.shape != expected:
            raise StoreError(f"shard {shard}: features {result.features.shape}, expected {expected}")
        with atomic_open(self.shard_path(shard)) as handle:
            np.save(handle, np.ascontiguousarray(result.features, dtype=np.float16))
        marker = {"rows": stop - start, "invalid": sorted(result.invalid)}
        write_json(self.partial_path(shard) if partial else self.marker_path(shard), marker)
        if not partial:
            self.partial_path(shard).unlink(missing_ok=True)

    def finalize(self) -> None:
        """Fold the per-shard invalid lists into rows.parquet and mark the store complete (idempotent)."""
        missing = self.missing_shards()
        if missing:
            raise StoreError(f"{self.path}: shards {missing[:10]} are not computed yet")
        rows = pq.read_table(self.rows_path)
        valid = np.ones(rows.num_rows, dtype=bool)
        errors = []
        product_ids = rows["product_id"].to_numpy()
        image_index = rows["image_index"].to_numpy()
        for shard in range(self.num_shards):
            start, _ = self.shard_rows(shard)
            for row_in_shard, reason in read_json(self.marker_path(shard))["invalid"]:
                row = start + int(row_in_shard)
                valid[row] = False
                errors.append(
                    {
                        "row": row,
                        "product_id": int(product_ids[row]),
                        "image_index": int(image_index[row]),
                        "reason": reason,
                    }
                )
        rows = rows.set_column(rows.column_names.index("valid"), "valid", pa.array(valid))
        write_parquet(self.rows_path, rows)
        write_json(self.path / "errors.json", errors)
        manifest = dict(self.manifest, complete=True, invalid_rows=len(errors))
        write_json(self.manifest_path, manifest)
        self._manifest, self._rows = manifest, None

    # -- reading ------------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        store = cls(path)
        if not store.manifest.get("complete"):
            missing = store.missing_shards()
            raise StoreError(
                f"{path}: store is incomplete ({len(missing)} of {store.num_shards} shards missing); "
                "re-run the same `prodcat extract` command to finish it"
            )
        return store

    @property
    def rows(self) -> pa.Table:
        if self._rows is None:
            self._rows = pq.read_table(self.rows_path)
        return self._rows

    def column(self, name: str) -> np.ndarray:
        return self.rows[name].to_numpy(zero_copy_only=False)

    def split_indices(self, split: str, valid_only: bool = True) -> np.ndarray:
        """Row indices of a split (train / val / test), masked images left out unless asked."""
        mask = self.column("split") == split
        if valid_only:
            mask &= self.column("valid")
        return np.flatnonzero(mask)

    def shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            self._shards[shard] = np.load(self.shard_path(shard), mmap_mode="r")
        return self._shards[shard]

    def read(self, indices: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Features of arbitrary rows, in the order given; one fancy-index per touched shard."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.feature_shape), dtype=dtype)
        shard_of = indices // self.shard_size
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            local = indices[where] - shard * self.shard_size
            order = np.argsort(local, kind="stable")  # sorted gathers read pages sequentially
            out[where[order]] = self.shard(int(shard))[local[order]]
        return out

    def read_all(self, indices: np.ndarray | None = None, dtype: np.dtype | type = np.float32) -> np.ndarray:
        return self.read(np.arange(len(self)) if indices is None else indices, dtype=dtype)


def make_rows(
    product_id: np.ndarray,
    image_index: np.ndarray,
    label: np.ndarray,
    level1: np.ndarray,
    level2: np.ndarray,
    split: np.ndarray,
) -> pa.Table:
    """The row table in the store's schema (valid is filled in by `finalize`)."""
    n = len(product_id)
    return pa.table(
        {
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "product_id": pa.array(np.asarray(product_id, dtype=np.int64)),
            "image_index": pa.array(np.asarray(image_index, dtype=np.int16)),  # products can have 128+ pictures
            "label": pa.array(np.asarray(label, dtype=np.int32)),
            "level1": pa.array(np.asarray(level1, dtype=np.int32)),
            "level2": pa.array(np.asarray(level2, dtype=np.int32)),
            "split": pa.array(np.asarray(split, dtype=object), pa.string()),
            "valid": pa.array(np.ones(n, dtype=bool)),
        }
    )


def write_store(
    path: str | Path,
    features: np.ndarray,
    *,
    product_id: np.ndarray,
    image_index: np.ndarray,
    label: np.ndarray,
    level1: np.ndarray,
    level2: np.ndarray,
    split: np.ndarray,
    shard_size: int = 4096,
    meta: dict[str, Any] | None = None,
) -> FeatureStore:
    """Write a complete store from in-memory arrays (tests, synthetic benchmarks, imports)."""
    rows = make_rows(product_id, image_index, label, level1, level2, split)
    meta = {
        "backbone": "arrays",
        "weights_id": "none",
        "kind": "pooled" if features.ndim == 2 else "spatial",
        "preprocessing": None,
        **(meta or {}),
    }
    store = FeatureStore.create(path, rows, tuple(features.shape[1:]), shard_size, meta)
    for shard in store.missing_shards():
        start, stop = store.shard_rows(shard)
        store.write_shard(shard, ShardResult(features[start:stop].astype(np.float16), []))
    store.finalize()
    return FeatureStore.open(path)
