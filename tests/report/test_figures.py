"""Shared figure helpers: PNGs written whole or not at all, log bins that cover the data, readable numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prodcat.report import figures


def test_png_figure_writes_a_styled_png(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "plot.png"
    with figures.png_figure(path, 1, 2, figsize=(6, 3)) as (figure, axes):
        bars = axes[0].bar([1, 2, 3], [10, 200, 3000])
        figures.label_bars(axes[0], bars, ["10", "200", "3k"])
        axes[1].loglog([1, 10, 100], [100, 10, 1])
        figures.log_count_axis(axes[1].yaxis)
        axes[1].set_title("Œuvre – élève <&>")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (6 * figures.DPI, 3 * figures.DPI)
        low, high = image.convert("L").getextrema()
        assert high - low > 100
    assert [p.name for p in path.parent.iterdir()] == ["plot.png"]


def test_png_figure_writes_nothing_when_the_body_fails(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    with pytest.raises(RuntimeError, match="boom"), figures.png_figure(path):
        raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())


def test_save_png_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"old")
    with figures.styled():
        figure, ax = figures.new_figure()
        ax.plot([0, 1], [0, 1])
        figures.save_png(figure, path, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("values", [[1, 5, 12, 80_000], [8, 9], [3], [250, 7_000_000]])
def test_log_bins_cover_the_data_on_decades(values: list[int]) -> None:
    edges = figures.log_bins(values)
    assert edges[0] <= min(values) and edges[-1] > max(values)
    assert np.all(np.diff(edges) > 0)
    assert np.allclose(np.log10(edges[[0, -1]]), np.round(np.log10(edges[[0, -1]])))
    counts, _ = np.histogram(values, bins=edges)
    assert counts.sum() == len(values)


def test_log_bins_without_positive_values() -> None:
    assert figures.log_bins([0, 0]).tolist() == [1.0, 10.0]


def test_number_formats() -> None:
    assert [figures.format_count(v) for v in (7, 950, 12_400, 7_069_896, 123_456_789)] == [
        "7",
        "950",
        "12.4k",
        "7.07M",
        "123M",
    ]
    assert figures.format_share(0.0991) == "9.9%"
    assert figures.format_share(0.0) == "0.0%"
    assert figures.format_share(0.0000226) == "0.0023%"
