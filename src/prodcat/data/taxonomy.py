"""The 3-level category taxonomy and label encoding.

Leaves get class indices ("labels") ordered by decreasing training frequency, ties by category_id: the Zipfian
(log-uniform) negative sampler assumes index 0 is the most frequent class. Level-2 groups are keyed by the
(level1, level2) pair because the same level-2 name occurs under several level-1s.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Taxonomy", "TaxonomyError", "read_category_csv", "CSV_COLUMNS"]

CSV_COLUMNS = ("category_id", "category_level1", "category_level2", "category_level3")
_INTEGER = re.compile(r"[+-]?[0-9]+")  # int() alone would also take "1_000", " 7 " and non-ASCII digits


class TaxonomyError(ValueError):
    """The category CSV is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """Arrays indexed by leaf label (0 = most frequent), plus level-1/level-2 name tables."""

    category_ids: np.ndarray  # (C,) int64
    leaf_names: tuple[str, ...]  # level-3 names
    leaf_level1: np.ndarray  # (C,) int32 index into level1_names
    leaf_level2: np.ndarray  # (C,) int32 index into level2_names
    level1_names: tuple[str, ...]
    level2_names: tuple[str, ...]  # one per (level1, level2) pair
    level2_level1: np.ndarray  # (L2,) int32 parent of each level-2 group
    train_counts: np.ndarray  # (C,) int64 training products per leaf

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_level1(self) -> int:
        return len(self.level1_names)

    @property
    def num_level2(self) -> int:
        return len(self.level2_names)

    def labels_of(self, category_ids: np.ndarray) -> np.ndarray:
        """Map category ids to leaf labels; -1 where an id is not in the taxonomy."""
        ids = np.asarray(category_ids, dtype=np.int64)
        if self.num_classes == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        order = np.argsort(self.category_ids, kind="stable")
        sorted_ids = self.category_ids[order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        found = sorted_ids[pos] == ids
        return np.where(found, order[pos], -1).astype(np.int64)

    def names(self, label: int) -> tuple[str, str, str]:
        """(level1, level2, level3) names of a leaf label."""
        return (
            self.level1_names[self.leaf_level1[label]],
            self.level2_names[self.leaf_level2[label]],
            self.leaf_names[label],
        )

    def describe(self, label: int) -> dict[str, object]:
        level1, level2, level3 = self.names(label)
        return {
            "label": int(label),
            "category_id": int(self.category_ids[label]),
            "level1": level1,
            "level2": level2,
            "level3": level3,
        }

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: list[tuple[int, str, str, str]], counts: Mapping[int, int] | None = None) -> Taxonomy:
        """Build from CSV rows; `counts` (category_id -> training products) sets the label order."""
        counts = counts or {}
        ordered = sorted(rows, key=lambda row: (-int(counts.get(row[0], 0)), row[0]))
        level1_names = tuple(sorted({row[1] for row in rows}))
        level2_pairs = sorted({(row[1], row[2]) for row in rows})
        level1_index = {name: i for i, name in enumerate(level1_names)}
        level2_index = {pair: i for i, pair in enumerate(level2_pairs)}
        return cls(
            category_ids=np.array([row[0] for row in ordered], dtype=np.int64),
            leaf_names=tuple(row[3] for row in ordered),
            leaf_level1=np.array([level1_index[row[1]] for row in ordered], dtype=np.int32),
            leaf_level2=np.array([level2_index[(row[1], row[2])] for row in ordered], dtype=np.int32),
            level1_names=level1_names,
            level2_names=tuple(pair[1] for pair in level2_pairs),
            level2_level1=np.array([level1_index[pair[0]] for pair in level2_pairs], dtype=np.int32),
            train_counts=np.array([int(counts.get(row[0], 0)) for row in ordered], dtype=np.int64),
        )

    @classmethod
    def from_csv(cls, path: str | Path, counts: Mapping[int, int] | None = None) -> Taxonomy:
        return cls.from_rows(read_category_csv(path), counts)

    # -- persistence ----------------------------------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        return pa.table(
            {
                "label": pa.array(np.arange(self.num_classes, dtype=np.int32)),
                "category_id": pa.array(self.category_ids),
                "category_level1": pa.array([self.level1_names[i] for i in self.leaf_level1], pa.string()),
                "category_level2": pa.array([self.level2_names[i] for i in self.leaf_level2], pa.string()),
                "category_level3": pa.array(list(self.leaf_names), pa.string()),
                "level1": pa.array(self.leaf_level1),
                "level2": pa.array(self.leaf_level2),
                "train_count": pa.array(self.train_counts),
            }
        )

    def save(self, path: str | Path) -> Path:
        from prodcat.utils import write_parquet

        return write_parquet(path, self.to_table())

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        table = pq.read_table(path).sort_by("label")
        columns = table.to_pydict()
        rows = list(
            zip(
                columns["category_id"],
                columns["category_level1"],
                columns["category_level2"],
                columns["category_level3"],
                strict=True,
            )
        )
        counts = dict(zip(columns["category_id"], columns["train_count"], strict=True))
        taxonomy = cls.from_rows(rows, counts)
        if not np.array_equal(taxonomy.category_ids, np.asarray(columns["category_id"], dtype=np.int64)):
            raise TaxonomyError(f"{path}: label order does not match train_count order; file was edited?")
        return taxonomy


def read_category_csv(path: str | Path) -> list[tuple[int, str, str, str]]:
    """Read Kaggle's category_names.csv exactly: names keep accents, ligatures and trailing spaces."""
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"{path}: category file not found (expected Kaggle's category_names.csv)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TaxonomyError(f"{path}: not UTF-8 at byte {error.start}") from error
    # newline="" lets the csv module own line endings: quoted fields may hold newlines, and str.splitlines would
    # also split on \x85, \u2028 and other separators that can sit inside a name.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise TaxonomyError(f"{path}: header must be {','.join(CSV_COLUMNS)}, got {header!r}")
        rows = _read_rows(path, reader)
    except csv.Error as error:
        raise TaxonomyError(f"{path}:{reader.line_num}: malformed CSV: {error}") from error
    if not rows:
        raise TaxonomyError(f"{path}: no categories")
    return rows


def _read_rows(path: Path, reader: Iterator[list[str]]) -> list[tuple[int, str, str, str]]:
    rows: list[tuple[int, str, str, str]] = []
    seen: dict[int, int] = {}
    for fields in reader:
        line = reader.line_num  # type: ignore[attr-defined]
        if not fields:
            continue
        if len(fields) != 4:
            raise TaxonomyError(f"{path}:{line}: expected 4 fields, got {len(fields)}")
        if not _INTEGER.fullmatch(fields[0]):
            raise TaxonomyError(f"{path}:{line}: category_id {fields[0]!r} is not an integer")
        category_id = int(fields[0])
        if category_id in seen:
            raise TaxonomyError(f"{path}:{line}: category_id {category_id} repeats line {seen[category_id]}")
        seen[category_id] = line
        rows.append((category_id, fields[1], fields[2], fields[3]))
    return rows
