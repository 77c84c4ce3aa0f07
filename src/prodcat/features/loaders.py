"""Batches of cached features for training: rows of the feature store, resident on the device when the split fits
the memory limit, else streamed from the memory-mapped shards by reader threads
(`prodcat.features.products` groups them by product for product heads)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from prodcat.features.store import FeatureStore

__all__ = ["FeatureLoader", "gather_rows", "product_sorted_rows", "row_products", "sort_by_product"]


class FeatureLoader:
    """Features and targets of one split's rows, batch by batch, as tensors on `device`.

    Host-to-device copies go through pinned memory with `non_blocking`, so the step loop never waits for the GPU to
    drain before the next batch is on its way.
    """

    def __init__(
        self,
        store: FeatureStore,
        rows: np.ndarray,
        device: torch.device,
        memory_limit_bytes: float,
        workers: int | None = None,
        prefetch: int = 8,
    ) -> None:
        self.store, self.device = store, device
        self.workers = workers or self._default_workers()
        self.prefetch = max(prefetch, 2 * self.workers)
        self.pin = device.type == "cuda"
        self.resident: torch.Tensor | None = None
        self.resident_labels: dict[str, torch.Tensor] = {}
        self._load(np.asarray(rows, dtype=np.int64), memory_limit_bytes)

    def _default_workers(self) -> int:
        return max(1, min(8, (os.cpu_count() or 2) // 2))

    def _load(self, rows: np.ndarray, memory_limit_bytes: float) -> None:
        """The items (here: store rows) and their targets; features on the device too when they fit the limit."""
        self.rows = rows
        self.labels = self._targets(rows)
        if self._fits(len(rows), memory_limit_bytes):
            self.resident = torch.from_numpy(self.store.read(rows, dtype=np.float16)).to(self.device)
            self._hold_labels()

    def _targets(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Leaf, level-1 and level-2 labels of store `rows`, as int64."""
        columns = {"leaf": "label", "level1": "level1", "level2": "level2"}
        return {key: self.store.column(column)[rows].astype(np.int64) for key, column in columns.items()}

    def _fits(self, num_rows: int, memory_limit_bytes: float) -> bool:
        """Whether `num_rows` feature rows fit the limit (the store keeps float16)."""
        return num_rows * int(np.prod(self.store.feature_shape)) * 2 <= memory_limit_bytes

    def _hold_labels(self) -> None:
        """Put every target on the device beside resident features (batches then index them there)."""
        self.resident_labels = {key: torch.from_numpy(values).to(self.device) for key, values in self.labels.items()}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def in_memory(self) -> bool:
        return self.resident is not None

    def batches(self, positions: Iterable[np.ndarray]) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(features float16, targets) for each array of positions into this split."""
        if self.resident is None:
            yield from self._streamed(positions)
            return
        for where in positions:
            index = self._to_device(torch.from_numpy(np.ascontiguousarray(where, dtype=np.int64)))
            targets = {key: values.index_select(0, index) for key, values in self.resident_labels.items()}
            yield self._resident_features(index), targets

    def _resident_features(self, index: torch.Tensor) -> torch.Tensor:
        """The resident features of the items at `index` (a tensor on the device)."""
        return self.resident.index_select(0, index)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return tensor
        return (tensor.pin_memory() if self.pin and not tensor.is_pinned() else tensor).to(
            self.device, non_blocking=True
        )

    def _read(self, where: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch on the host (pinned for CUDA): features gathered straight into the output, one copy."""
        rows = self.rows[where]
        features = torch.empty((len(rows), *self.store.feature_shape), dtype=torch.float16, pin_memory=self.pin)
        gather_rows(self.store, rows, features.numpy())
        targets = {}
        for key, values in self.labels.items():
            target = torch.empty(len(rows), dtype=torch.int64, pin_memory=self.pin)
            np.take(values, where, out=target.numpy(), mode="clip")
            targets[key] = target
        return features, targets

    def _streamed(self, positions: Iterable[np.ndarray]) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        # Reads run `prefetch` batches ahead in a thread pool (numpy's take releases the GIL), yielded in order.
        source = iter(positions)
        pending: deque[Any] = deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="prodcat-loader") as pool:

            def submit() -> None:
                where = next(source, None)
                if where is not None:
                    pending.append(pool.submit(self._read, np.asarray(where, dtype=np.int64)))

            for _ in range(self.prefetch):
                submit()
            while pending:
                features, targets = pending.popleft().result()
                submit()
                yield self._to_device(features), {key: self._to_device(value) for key, value in targets.items()}


def gather_rows(store: FeatureStore, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`store` rows into `out` (float16, preallocated). Rows in increasing order (as StepPlan batches are) are
    copied shard by shard straight into their place in `out`; any other order goes through `store.read`."""
    if len(rows) > 1 and bool(np.any(rows[1:] < rows[:-1])):
        out[...] = store.read(rows, dtype=out.dtype)
        return out
    shard_of = rows // store.shard_size
    bounds = np.flatnonzero(np.diff(shard_of)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(rows)], strict=True):
        if stop > start:
            shard = int(shard_of[start])
            local = rows[start:stop] - shard * store.shard_size
            np.take(store.shard(shard), local, axis=0, out=out[start:stop], mode="clip")  # "raise" would buffer
    return out


def product_sorted_rows(store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid rows of `split` sorted by product then image, each row's product id, and where each product starts in
    them: the order every per-product pass (evaluation, twins, text fusion) walks. An empty split gives empty
    arrays."""
    return sort_by_product(store, store.split_indices(split))


def sort_by_product(store: FeatureStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`product_sorted_rows` for any store rows (product heads group their training rows this way)."""
    rows = np.asarray(rows, dtype=np.int64)
    product_id = store.column("product_id")[rows]
    order = np.lexsort((store.column("image_index")[rows], product_id))
    rows, product_id = rows[order], product_id[order]
    starts = np.flatnonzero(np.r_[True, product_id[1:] != product_id[:-1]]) if len(rows) else np.zeros(0, np.int64)
    return rows, product_id, starts


def row_products(starts: np.ndarray, num_rows: int) -> np.ndarray:
    """Position of each row's product, from where each product starts in `num_rows` product-sorted rows."""
    return np.repeat(np.arange(len(starts), dtype=np.int64), np.diff(np.r_[starts, num_rows]))
