"""Product-level data for heads that read a whole product: store rows grouped by product, padded to K with a mask.

A product's pictures are its valid rows of one split, in `image_index` order (the order does not matter to a product
head, which is permutation-invariant; a fixed one keeps batches reproducible). Padded slots point at a zero row and
are masked out.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from prodcat.features.loaders import FeatureLoader, gather_rows, row_products, sort_by_product
from prodcat.features.store import FeatureStore, StoreError

__all__ = ["ProductGroups", "group_products", "group_index", "ProductLoader", "PAD"]

PAD = -1  # slot index of a padded (absent) picture


@dataclasses.dataclass
class ProductGroups:
    """Products of a set of store rows: `slots[p, k]` is the store row of picture k of product p (PAD when absent)."""

    product_id: np.ndarray  # (P,) sorted
    slots: np.ndarray  # (P, K) int64 store rows, PAD where absent
    label: np.ndarray  # (P,) leaf label of the product's first picture

    @property
    def mask(self) -> np.ndarray:
        return self.slots != PAD

    def __len__(self) -> int:
        return len(self.product_id)


def group_index(product_index: np.ndarray, num_products: int | None = None) -> np.ndarray:
    """(P, K) positions into `product_index` of each product's items, in their order, PAD-padded to the largest
    product (K >= 1). Products without items get an all-PAD row."""
    product_index = np.asarray(product_index, dtype=np.int64)
    num_products = int(product_index.max()) + 1 if num_products is None and len(product_index) else num_products or 0
    counts = np.bincount(product_index, minlength=num_products)
    slots = np.full((num_products, max(1, int(counts.max()) if len(counts) else 1)), PAD, dtype=np.int64)
    order = np.argsort(product_index, kind="stable")
    sorted_index = product_index[order]
    starts = np.r_[0, np.cumsum(counts)[:-1]] if num_products else np.zeros(0, np.int64)
    rank = np.arange(len(order)) - starts[sorted_index]
    slots[sorted_index, rank] = order
    return slots


def group_products(store: FeatureStore, rows: np.ndarray) -> ProductGroups:
    """Group store `rows` (e.g. a split's valid rows) by product_id, pictures in image_index order."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        raise StoreError(f"{store.path}: no rows to group into products")
    rows, product_id, starts = sort_by_product(store, rows)
    positions = group_index(row_products(starts, len(rows)), len(starts))
    slots = np.where(positions == PAD, PAD, rows[np.maximum(positions, 0)])
    label = store.column("label")[slots[:, 0]].astype(np.int64)
    return ProductGroups(product_id[starts], slots, label)


class ProductLoader(FeatureLoader):
    """FeatureLoader's interface over PRODUCTS: positions index products; a batch is ((B, K, *row) float16 features,
    targets with "leaf"/"level1"/"level2" (B,) and "mask" (B, K)). Splits under the memory limit are read once."""

    def _default_workers(self) -> int:
        return 2

    def _load(self, rows: np.ndarray, memory_limit_bytes: float) -> None:
        """Group `rows` into products; their pictures' features (plus a zero padding row) on the device if they fit."""
        store, device = self.store, self.device
        self.groups = group_products(store, rows)
        self.rows = np.unique(self.groups.slots[self.groups.mask])
        self.labels = self._targets(self.groups.slots[:, 0])  # a product's labels are its first picture's
        self.labels["mask"] = self.groups.mask
        if self._fits(len(self.rows) + 1, memory_limit_bytes):  # + the zero row padded slots point at
            features = np.zeros((len(self.rows) + 1, *store.feature_shape), dtype=np.float16)  # last row: padding
            features[:-1] = store.read(self.rows, dtype=np.float16)
            self.resident = torch.from_numpy(features).to(device)
            local = np.searchsorted(self.rows, np.maximum(self.groups.slots, 0))
            self._resident_slots = torch.from_numpy(np.where(self.groups.mask, local, len(self.rows))).to(device)
            self._hold_labels()

    def __len__(self) -> int:
        return len(self.groups)

    def _resident_features(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K, *row) features of the products at `index`; padded slots read the zero row."""
        slots = self._resident_slots.index_select(0, index)
        return self.resident.index_select(0, slots.reshape(-1)).reshape(*slots.shape, *self.resident.shape[1:])

    def _read(self, where: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        slots = self.groups.slots[where]
        present = slots != PAD
        features = torch.zeros((*slots.shape, *self.store.feature_shape), dtype=torch.float16, pin_memory=self.pin)
        wanted = slots[present]
        order = np.argsort(wanted, kind="stable")
        picked = np.empty((len(wanted), *self.store.feature_shape), dtype=np.float16)
        picked[order] = gather_rows(self.store, wanted[order], np.empty_like(picked))
        features.numpy()[present] = picked
        targets = {key: torch.from_numpy(np.ascontiguousarray(values[where])) for key, values in self.labels.items()}
        if self.pin:
            targets = {key: value.pin_memory() for key, value in targets.items()}
        return features, targets
