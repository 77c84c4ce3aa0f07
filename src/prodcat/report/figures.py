"""Shared matplotlib helpers for every report: one style, the Agg canvas, atomic PNG files.

Figures are built with `matplotlib.figure.Figure` on an explicit Agg canvas, never through pyplot, so no GUI
backend is ever touched, no global figure list grows, and code that runs in a server or a worker thread is safe.

    with png_figure(path, ncols=2, figsize=(10, 4)) as (figure, axes):
        axes[0].bar(...)
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from prodcat.utils import atomic_write_bytes

__all__ = [
    "STYLE",
    "PALETTE",
    "DPI",
    "styled",
    "new_figure",
    "save_png",
    "png_figure",
    "log_bins",
    "format_count",
    "format_share",
    "count_formatter",
    "log_count_axis",
    "label_bars",
    "reliability_bins",
    "plot_reliability",
]

# A palette that stays distinguishable for the common colour-vision deficiencies (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
DPI = 110
STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",  # ships with matplotlib and covers French accents and ligatures (é, œ, ç)
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "axes.prop_cycle": matplotlib.cycler(color=list(PALETTE)),
    "grid.color": "#d9d9d9",
    "grid.linewidth": 0.6,
    "grid.alpha": 0.8,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "figure.titlesize": 12,
    "figure.titleweight": "bold",
}


@contextmanager
def styled(overrides: dict[str, Any] | None = None) -> Iterator[None]:
    """Apply the house style (plus `overrides`) while figures are built and drawn."""
    with matplotlib.rc_context({**STYLE, **(overrides or {})}):
        yield


def new_figure(
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] = (6.4, 4.0),
    squeeze: bool = True,
    **subplot_kw: Any,
) -> tuple[Figure, Any]:
    """A constrained-layout figure on an Agg canvas and its axes (as `Figure.subplots` returns them)."""
    figure = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=squeeze, subplot_kw=subplot_kw or None)
    return figure, axes


def save_png(figure: Figure, path: str | Path, *, dpi: int = DPI) -> Path:
    """Render to PNG in memory, then write atomically (a reader never sees half an image)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return atomic_write_bytes(path, buffer.getvalue())


@contextmanager
def png_figure(
    path: str | Path,
    nrows: int = 1,
    ncols: int = 1,
    *,
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = DPI,
    squeeze: bool = True,
    style: dict[str, Any] | None = None,
    **subplot_kw: Any,
) -> Iterator[tuple[Figure, Any]]:
    """Build a styled figure in the `with` body; it is saved to `path` only if the body succeeds."""
    with styled(style):
        figure, axes = new_figure(nrows, ncols, figsize=figsize, squeeze=squeeze, **subplot_kw)
        yield figure, axes
        save_png(figure, path, dpi=dpi)


def log_bins(values: np.ndarray | Sequence[float], per_decade: int = 5) -> np.ndarray:
    """Logarithmically spaced bin edges covering the positive `values`, aligned on powers of ten."""
    positive = np.asarray(values, dtype=np.float64)
    positive = positive[positive > 0]
    if positive.size == 0:
        return np.array([1.0, 10.0])
    low = np.floor(np.log10(positive.min()))
    high = max(np.ceil(np.log10(positive.max()) + 1e-9), low + 1)
    return np.logspace(low, high, int(round((high - low) * per_decade)) + 1)


def format_count(value: float) -> str:
    """Compact human count: 950, 12.4k, 7.07M."""
    value = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.3g}{suffix}" if scaled < 100 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}" if value == int(value) else f"{value:.3g}"


def format_share(share: float) -> str:
    """Percent with one decimal, more digits for tiny shares so they never read as 0.0 %."""
    if share == 0 or share >= 0.001:
        return f"{share:.1%}"
    return f"{100 * share:.2g}%"


def count_formatter() -> FuncFormatter:
    """Tick formatter for count axes (1, 10, 100, 1k, 10k, 1M) instead of 10^k on log scales."""
    return FuncFormatter(lambda value, _position: format_count(value) if value >= 1 else f"{value:g}")


def log_count_axis(axis: Axis, minor_labels: bool | None = None) -> None:
    """Count ticks (1, 10, 1k, 1M) on a log axis; label 2 and 5 too when it spans under ~2.5 decades.

    Call after plotting (the decision reads the axis' current limits).
    """
    low, high = sorted(axis.get_view_interval())
    if minor_labels is None:
        minor_labels = low > 0 and np.log10(high / low) <= 2.5
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(count_formatter())
    if minor_labels:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(count_formatter())
    else:  # matplotlib would label minor ticks as 2x10^0 on short spans
        axis.set_minor_formatter(NullFormatter())


def label_bars(
    axes: Axes,
    bars: Any,
    labels: Sequence[str],
    *,
    horizontal: bool = False,
    fontsize: float = 8.0,
    padding: float = 2.0,
) -> None:
    """Write a text label at the end of each bar (counts, shares)."""
    axes.bar_label(bars, labels=list(labels), padding=padding, fontsize=fontsize, label_type="edge", color="#333333")
    if not horizontal:
        axes.margins(y=0.15)  # room above the tallest bar for its label
    else:
        axes.margins(x=0.18)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Equal-width confidence bins: count, mean confidence and accuracy per bin, and the expected calibration error
    (count-weighted mean |accuracy - confidence|). Empty bins hold NaN."""
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=False), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
    gap = np.where(count > 0, np.abs(accuracy - mean_confidence), 0.0)
    ece = float((gap * count).sum() / max(int(count.sum()), 1))
    return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy, "ece": ece}


def plot_reliability(
    path: str | Path,
    confidence: np.ndarray,
    correct: np.ndarray,
    *,
    label: str = "model",
    others: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    bins: int = 10,
    title: str = "reliability",
) -> dict[str, Any]:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and how many fall in each bin.

    `others` adds curves (e.g. {"calibrated": (probabilities, correct)}) on the same axes. Returns the main bins.
    """
    result = reliability_bins(confidence, correct, bins)
    with png_figure(path, 1, 2, figsize=(10.5, 4.0)) as (figure, (left, right)):
        left.plot([0, 1], [0, 1], linestyle="--", color="#777777", linewidth=1, label="perfectly calibrated")
        curves = {label: (confidence, correct), **(others or {})}
        for name, (probabilities, hits) in curves.items():
            binned = result if name == label else reliability_bins(probabilities, hits, bins)
            shown = binned["count"] > 0
            left.plot(
                binned["confidence"][shown],
                binned["accuracy"][shown],
                marker="o",
                label=f"{name} (ECE {100 * binned['ece']:.1f} points)",
            )
        left.set(xlim=(0, 1), ylim=(0, 1), xlabel="top probability (mean of the bin)", ylabel="accuracy in the bin")
        left.set_title("accuracy against confidence")
        left.legend(loc="upper left")
        widths = np.diff(result["edges"])
        right.bar(result["edges"][:-1], result["count"], width=widths, align="edge", color=PALETTE[0], alpha=0.8)
        right.set(xlim=(0, 1), xlabel="top probability", ylabel="products")
        right.set_title("products per bin")
        figure.suptitle(title)
    return result
