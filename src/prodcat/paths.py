"""Where each stage reads and writes inside a working directory (one place, so stages never disagree)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["WorkPaths", "TAXONOMY_FILE"]

TAXONOMY_FILE = "taxonomy.parquet"  # W/taxonomy.parquet, and its copy in every run folder


@dataclasses.dataclass(frozen=True)
class WorkPaths:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    def catalog_table(self, name: str) -> Path:
        """`train` (train+val rows, with a `split` column) or `test`."""
        return self.catalog / f"{name}.parquet"

    @property
    def ingest_report(self) -> Path:
        return self.catalog / "ingest_report.json"

    @property
    def taxonomy(self) -> Path:
        return self.root / TAXONOMY_FILE

    @property
    def ingest_outputs(self) -> tuple[Path, ...]:
        """Everything `prodcat ingest` writes, replaced together on re-ingest (data/staging.py)."""
        return (self.taxonomy, self.catalog)

    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_store(self, name: str) -> Path:
        return self.features / name

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, name: str) -> Path:
        return self.runs / name

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def report(self, name: str) -> Path:
        return self.reports / name
