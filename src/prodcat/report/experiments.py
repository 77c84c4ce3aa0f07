"""Compare and sweep, drawn: the figure, the table (Markdown and a one-file HTML page) and the report's section body,
all from the plain numbers `prodcat.train.experiments` wrote (`W/reports/<name>/<name>.json`).

`render_experiment(folder)` writes `<name>.png`, `<name>.md` and `<name>.html` beside the JSON (and the training
curves of the runs it lists) where they are missing or older than the JSON; the CLI calls it after `compare` and
`sweep`, `prodcat report` before it reads the folder. The main report's section and the standalone page share the
rows below, so the two can never disagree.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prodcat.report import conclusions, figures
from prodcat.report.markup import esc, markdown_table, num, page, spread, table
from prodcat.report.markup import figure as embedded_figure
from prodcat.report.runs import draw_run
from prodcat.utils import atomic_write_text, read_json

__all__ = [
    "render_experiment",
    "compare_table",
    "sweep_table",
    "compare_body",
    "sweep_body",
    "plot_compare",
    "plot_sweep",
    "EXPERIMENTS",
]

EXPERIMENTS = ("compare", "sweep")
TIME_KEY = "train_seconds"  # the curves' time axis: training seconds, validation and checkpoints left out
TIME_LABEL = "training seconds (excl. validation, checkpoints)"


# -- rows shared by the Markdown, the standalone page and the report ---------------------------------------------------
def _ms(seconds: Any) -> str:
    return "–" if seconds is None else f"{1000 * float(seconds):.2f}"


def _aggregations(block: dict[str, Any]) -> str:
    """The aggregation each seed's run kept on val: 'mean_prob' or 'mean_prob (2), vote (1)'."""
    counts = collections.Counter(block.get("holdout_aggregations") or [])
    if len(counts) <= 1:
        return next(iter(counts), "–")
    return ", ".join(f"{name} ({count})" for name, count in counts.most_common())


def _holdout_cells(block: dict[str, Any]) -> list[str]:
    """Holdout product top-1 (mean ± seed std [95% interval over products]), n and the aggregation kept."""
    if block.get("holdout_top1_mean") is None:  # a file from before holdout evaluation
        return ["n/a", "–", "–"]
    return [spread(block, "holdout_top1"), num(block.get("holdout_products")), _aggregations(block)]


HOLDOUT_HEADERS = (
    "holdout product top-1: mean ± seed std [95% CI over products]",
    "n (holdout products)",
    "aggregation (chosen on val)",
)


def compare_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and plain-text rows of compare.json, full softmax (the reference) first as trained."""
    arms = conclusions.compare_arms(data)
    gpu = any(a.get("peak_cuda_mb_max") is not None for a in arms)  # peak RSS left out: one process's high-water mark
    headers = ["loss", "optimizer", "seeds", *HOLDOUT_HEADERS, "val image top-1, last step", "val loss"]
    headers += ["s / epoch", "ms / step", *(["peak GPU (MB)"] if gpu else [])]
    rows = [
        [
            str(a["loss"]),
            str(a["optimizer"]),
            num(a.get("seeds")),
            *_holdout_cells(a),
            spread(a, "val_top1"),
            num(a.get("val_loss_mean")),
            num(a.get("seconds_per_epoch_mean")),
            _ms(a.get("step_seconds_mean")),
            *([num(a.get("peak_cuda_mb_max"), 4)] if gpu else []),
        ]
        for a in arms
    ]
    return headers, rows


def _versus_reference(point: dict[str, Any]) -> str:
    """'-1.2 pts [-3.0, +0.4]': a point's holdout difference to the full softmax, paired over products."""
    paired = point.get("vs_reference")
    if not isinstance(paired, dict):
        return "n/a"
    low, high = paired["ci95"]
    return f"{100 * paired['change']:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]"


def sweep_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and plain-text rows of sweep.json: a row per K (ascending), then the full-softmax reference."""
    optimizer = str(data.get("settings", {}).get("optimizer", "?"))
    headers = ["negatives K", "optimizer", "seeds", *HOLDOUT_HEADERS, "vs full softmax [paired 95% CI]"]
    headers += ["val image top-1, last step", "val loss", "ms / step", "s / epoch"]

    def row(label: str, block: dict[str, Any], versus: str) -> list[str]:
        return [
            label,
            optimizer,
            num(block.get("seeds")),
            *_holdout_cells(block),
            versus,
            spread(block, "val_top1"),
            num(block.get("val_loss_mean")),
            _ms(block.get("step_seconds_mean")),
            num(block.get("seconds_per_epoch_mean")),
        ]

    points = sorted(data.get("points", []), key=lambda point: point.get("num_sampled", 0))
    rows = [row(str(p.get("num_sampled")), p, _versus_reference(p)) for p in points]
    if isinstance(data.get("reference"), dict):
        rows.append(row("full softmax", data["reference"], "(reference)"))
    return headers, rows


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return table(headers, [[esc(cell) for cell in row] for row in rows], "numbers")


def _notes(data: dict[str, Any]) -> str:
    notes = "".join(f"<li>{esc(note)}</li>" for note in data.get("notes", []) if "Peak RSS" not in str(note))
    return f"<ul>{notes}</ul>" if notes else ""


def _settings_text(settings: dict[str, Any]) -> str:
    keys = ("head", "store", "features", "epochs", "batch_size", "seeds", "num_sampled", "sampler", "optimizer")
    return ", ".join(f"{key.replace('_', ' ')} {esc(settings[key])}" for key in keys if key in settings)


def _conclusions(sentences: list[str]) -> str:
    """Sentences are plain text with `code` spans in backticks."""
    if not sentences:
        return ""
    items = "".join(
        "<li>" + "".join(f"<code>{esc(p)}</code>" if i % 2 else esc(p) for i, p in enumerate(s.split("`"))) + "</li>"
        for s in sentences
    )
    return f'<div class="conclusions"><h3>Conclusions</h3><ul>{items}</ul></div>'


def compare_body(data: dict[str, Any], num_classes: int | None) -> str:
    """The report's compare section (conclusions, loss x optimizer grid, the table, notes), without the figure."""
    return (
        _conclusions(conclusions.compare_conclusions(data, num_classes))
        + f"<h3>Loss x optimizer ({esc(conclusions.headline_name(data))}, mean ± seed std in points)</h3>"
        + conclusions.loss_optimizer_table(data)
        + f"<p>The same head trained with each output loss, same budget and seeds "
        f"({_settings_text(data.get('settings', {}))}). Selected on val, reported on the holdout: each run's best "
        "checkpoint by val top-1, aggregation, tau and T chosen on val, as <code>prodcat evaluate</code> does.</p>"
        + _html_table(*compare_table(data))
        + _notes(data)
    )


def sweep_body(data: dict[str, Any]) -> str:
    """The report's sweep section (conclusions, the table, notes), without the figure."""
    return (
        _conclusions(conclusions.sweep_conclusions(data))
        + f"<p>Sampled softmax against the number of sampled negatives K, the full softmax as reference "
        f"({_settings_text(data.get('settings', {}))}). Selected on val, reported on the holdout.</p>"
        + _html_table(*sweep_table(data))
        + _notes(data)
    )


# -- figures -----------------------------------------------------------------------------------------------------------
def _band(ax: Any, x: Sequence[float], mean: Sequence[float], std: Sequence[float] | None, label: str) -> None:
    (line,) = ax.plot(x, mean, marker=".", label=label)
    if std is not None:
        low, high = np.asarray(mean) - np.asarray(std), np.asarray(mean) + np.asarray(std)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_compare(path: str | Path, data: dict[str, Any]) -> Path:
    """Val top-1 (mean over seeds, ± seed std as a band) against step and training seconds, one line per arm."""
    seeds = {label: block.get("seeds", 1) for label, block in data.get("losses", {}).items()}
    with figures.png_figure(path, 1, 2, figsize=(11, 4.2)) as (figure, axes):
        for label, curves in data.get("curves", {}).items():
            count = int(seeds.get(label, 1))
            for ax, key in zip(axes, ("step", TIME_KEY), strict=True):
                _band(ax, *curves[key], f"{label} ({count} seed{'s' if count > 1 else ''})")
        for ax, label in zip(axes, ("step", TIME_LABEL), strict=True):
            ax.set(xlabel=label, ylabel="val top-1 (images, full softmax)", title=f"accuracy vs {label.split(' (')[0]}")
            ax.legend(fontsize="small")
        figure.suptitle(_title(data, "compare"))
    return Path(path)


def _k_ticks(ax: Any, ks: Sequence[int]) -> None:
    """Ticks at the K values tried (2, 4, 8, 16, 32) on the log axis, written as plain numbers."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator(list(ks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def plot_sweep(path: str | Path, data: dict[str, Any]) -> Any:
    """Headline accuracy (holdout product top-1; val image top-1 for older files) and step time against K, the full
    softmax as a dashed line (its 95% interval over products shaded); returns the Figure (saved to `path`)."""
    points = sorted(data.get("points", []), key=lambda point: point["num_sampled"])
    reference, optimizer = data["reference"], data.get("settings", {}).get("optimizer", "?")
    key = conclusions.headline_key(data)
    ks = [p["num_sampled"] for p in points]
    stds = [p.get(f"{key}_std") for p in points]
    with figures.png_figure(path, 1, 2, figsize=(11, 4.2)) as (figure, (acc_axes, time_axes)):
        acc_axes.errorbar(
            ks,
            [p[f"{key}_mean"] for p in points],
            yerr=None if None in stds else stds,  # one seed: no error bars rather than zero-length ones
            marker="o",
            capsize=3,
            label=f"sampled softmax, {optimizer} (± seed std)",
        )
        reference_label = f"full softmax, {optimizer}"
        acc_axes.axhline(reference[f"{key}_mean"], linestyle="--", color="#555555", label=reference_label)
        if reference.get(f"{key}_ci95"):
            low, high = reference[f"{key}_ci95"]
            acc_axes.axhspan(low, high, color="#555555", alpha=0.12, linewidth=0, label="its 95% CI over products")
        acc_axes.set(xscale="log", xlabel="sampled negatives K", ylabel=conclusions.headline_name(data))
        acc_axes.set_title("accuracy vs K")
        step_ms = [1000 * (p.get("step_seconds_mean") or np.nan) for p in points]
        time_axes.plot(ks, step_ms, marker="o", label=f"sampled softmax, {optimizer}")
        if reference.get("step_seconds_mean") is not None:
            reference_ms = 1000 * reference["step_seconds_mean"]
            time_axes.axhline(reference_ms, linestyle="--", color="#555555", label=reference_label)
        time_axes.set(xscale="log", xlabel="sampled negatives K", ylabel="ms per training step", title="step time vs K")
        for ax in (acc_axes, time_axes):
            _k_ticks(ax, ks)
            ax.legend(fontsize="small")
        figure.suptitle(_title(data, "sweep"))
    return figure


# -- files -------------------------------------------------------------------------------------------------------------
def _title(data: dict[str, Any], name: str) -> str:
    settings = data.get("settings", {})
    where = f"{settings.get('head', '?')} head on {settings.get('store', settings.get('features', '?'))}"
    if name == "sweep":
        return f"Sampled-softmax sweep ({settings.get('optimizer', '?')}): {where}"
    optimizers = settings.get("optimizers") or [settings.get("optimizer", "?")]
    factor = "Loss x optimizer" if len(optimizers) > 1 else f"Loss comparison, {optimizers[0]}"
    return f"{factor}: {where}"


def _markdown(data: dict[str, Any], name: str, num_classes: int | None) -> str:
    headers, rows = compare_table(data) if name == "compare" else sweep_table(data)
    sentences = (
        conclusions.compare_conclusions(data, num_classes) if name == "compare" else conclusions.sweep_conclusions(data)
    )
    lines = [f"# {_title(data, name)}", "", *(f"- {s}" for s in sentences), "", markdown_table(headers, rows)]
    return "\n".join(lines) + "".join(f"\n- {note}" for note in data.get("notes", [])) + "\n"


def _page(data: dict[str, Any], name: str, folder: Path, num_classes: int | None) -> str:
    body = compare_body(data, num_classes) if name == "compare" else sweep_body(data)
    picture = embedded_figure(folder / f"{name}.png", _title(data, name))  # embedded: the page stands alone
    return page(_title(data, name), f"<h1>{esc(_title(data, name))}</h1>{picture}{body}")


def _stale(folder: Path, name: str) -> bool:
    source = folder / f"{name}.json"
    targets = [folder / f"{name}.{suffix}" for suffix in ("md", "html")]  # the figure may rightly be absent
    return any(not t.is_file() or t.stat().st_mtime_ns < source.stat().st_mtime_ns for t in targets)


def render_experiment(folder: str | Path, num_classes: int | None = None, force: bool = False) -> list[Path]:
    """Draw `<name>.png` and write `<name>.md` / `<name>.html` from `<name>.json` in a compare or sweep folder (and
    the curves of the runs it lists), where missing or stale; returns what it wrote. Nothing when there is no JSON."""
    folder = Path(folder)
    name = folder.name
    source = folder / f"{name}.json"
    if name not in EXPERIMENTS or not source.is_file():
        return []
    data = read_json(source)
    written = [path for run in data.get("run_dirs", {}).values() for path in draw_run(run, force)]
    if not (force or _stale(folder, name)):
        return written
    drawable = data.get("curves") if name == "compare" else data.get("points") and data.get("reference")
    if drawable:  # a file without curves (or points) gets its tables, no empty figure
        (plot_compare if name == "compare" else plot_sweep)(folder / f"{name}.png", data)
        written.append(folder / f"{name}.png")
    written.append(atomic_write_text(folder / f"{name}.md", _markdown(data, name, num_classes)))
    written.append(atomic_write_text(folder / f"{name}.html", _page(data, name, folder, num_classes)))
    return written
