"""Thin typer CLI: parse flags, build a config, call one package function. No logic lives here."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from prodcat.cli_options import from_configs
from prodcat.config import (
    RUN_HELP,
    WORKDIR_HELP,
    CompareConfig,
    DemoConfig,
    EvalConfig,
    ExploreConfig,
    ExportConfig,
    ExtractConfig,
    FullRehearsalConfig,
    FusionConfig,
    IngestConfig,
    OcrConfig,
    PredictConfig,
    RehearsalConfig,
    ServeConfig,
    SweepConfig,
    TrainConfig,
)
from prodcat.errors import UserError, describe, require_catalog, require_file, require_run

# One paragraph per string: rich keeps a single newline as a line break.
HELP = "\n\n".join(
    (
        "prodcat sorts e-commerce products into thousands of categories from their photos.",
        "Steps, in order, each reading what the one before wrote into the working directory W: demo-data (or "
        "Kaggle's files) -> ingest -> explore -> extract -> train / compare / sweep -> evaluate -> predict -> report "
        "-> serve.",
        "`prodcat demo --workdir W` runs them all on synthetic demo data (rendered objects standing in for product "
        "photos).",
        "Run `prodcat COMMAND --help` for the options of one step. Commands with a working directory also log to "
        "W/logs/prodcat.log. Expected failures end with one line `error: ...` saying what to run next (exit code 2).",
    )
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"prodcat {version('prodcat')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """prodcat: product photos -> categories."""


# Options of a config come from its fields (prodcat.cli_options); these few belong to no config.
Workdir = Annotated[Path, typer.Option("--workdir", "-w", help=WORKDIR_HELP)]
Run = Annotated[Path, typer.Option(help=RUN_HELP)]


@app.command("demo-data")
@from_configs
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write train.bson, test.bson, category_names.csv into.")],
    config: DemoConfig,
) -> None:
    """Write a synthetic data set in Kaggle's Cdiscount formats (the embedded default)."""
    from prodcat.data.synthetic.demo import generate_demo

    summary = generate_demo(out, config)
    typer.echo(
        f"wrote {summary['train_products']} train / {summary['test_products']} test products to {out} "
        f"({summary['train_duplicate_share']:.1%} of train pictures are copies of another)"
    )


@app.command()
@from_configs
def ingest(config: IngestConfig) -> None:
    """Index BSON files (no picture decoding) and the taxonomy into Parquet catalogs."""
    from prodcat.data.catalog import ingest as run_ingest

    report = run_ingest(config)
    for name, part in report["files"].items():
        typer.echo(f"{name}: {part['products']} products, {part['images']} images, {part['problems']} problems")
        duplicates = report["duplicates"][name]
        line = f"  {duplicates['duplicate_share']:.1%} of the pictures not unique by content"
        if "groups" in duplicates:
            splits = " / ".join(f"{part[f'{split}_products']} {split}" for split in ("train", "val", "holdout"))
            line += f", {duplicates['groups']} duplicate groups; split {splits} (groups kept whole)"
        typer.echo(line)


@app.command()
@from_configs
def explore(config: ExploreConfig) -> None:
    """Counts per level, log histograms, head and tail categories -> W/reports/explore/."""
    from prodcat.report.explore import explore as run_explore

    workdir = Path(config.workdir)
    summary = run_explore(workdir, top_k=config.top_k)
    typer.echo(f"{summary['products']} products, {summary['images']} images -> {workdir / 'reports' / 'explore'}")


@app.command()
@from_configs
def extract(config: ExtractConfig) -> None:
    """Run a frozen pretrained backbone over the catalog into a resumable feature store."""
    require_catalog(Path(config.workdir))  # before torch loads: an empty workdir fails at once, pointing at ingest
    from prodcat.features.extract import extract as run_extract

    typer.echo(f"features -> {run_extract(config)}")


@app.command()
@from_configs
def train(config: TrainConfig) -> None:
    """Train a head on cached features with full, sampled or adaptive softmax."""
    # The config was checked before prodcat.train.loop (and torch) is imported: a misspelt --loss fails at once.
    from prodcat.distributed import is_main_process
    from prodcat.report.runs import draw_run
    from prodcat.train.loop import train as run_train

    run_dir = run_train(config)
    if is_main_process():
        draw_run(run_dir)  # training writes numbers; its curves are drawn here
    typer.echo(f"run -> {run_dir}")


@app.command()
@from_configs
def compare(config: CompareConfig) -> None:
    """Same head, budget, seeds and optimizer: softmax vs sampled vs adaptive (x optimizers) -> W/reports/compare/."""
    from prodcat.train.experiments import compare as run_compare

    result = run_compare(config)
    from prodcat.report.experiments import render_experiment

    render_experiment(result.report)  # compare writes numbers; its figure and tables are drawn here
    typer.echo(f"comparison of {len(result.runs)} runs -> {result.report}")


@app.command()
@from_configs
def sweep(config: SweepConfig) -> None:
    """Accuracy and step time against the number of sampled negatives, one optimizer -> W/reports/sweep/."""
    from prodcat.train.experiments import sweep as run_sweep

    result = run_sweep(config)
    from prodcat.report.experiments import render_experiment

    render_experiment(result.report)
    typer.echo(f"sweep of {len(result.runs)} runs -> {result.report}")


@app.command()
@from_configs
def evaluate(config: EvalConfig) -> None:
    """Choose on val, report on the holdout: metrics with n and 95% intervals -> RUN/eval/metrics.json, figures."""
    from prodcat.evaluate.evaluation import evaluate as run_evaluate
    from prodcat.evaluate.evaluation import summary_lines
    from prodcat.report.runs import draw_run

    metrics = run_evaluate(config)
    draw_run(config.run)  # evaluation writes numbers; its figures and levers.md are drawn here
    typer.echo("\n".join(summary_lines(metrics)))


@app.command()
@from_configs
def predict(config: PredictConfig) -> None:
    """Predict every product of a BSON file into a Kaggle submission, in input order."""
    require_file(Path(config.bson), "BSON")
    from prodcat.predict.submission import predict_bson

    summary = predict_bson(config.run, config.bson, config.out, batch_size=config.batch_size)
    typer.echo(f"{summary['products']} products -> {config.out} ({summary['fallback_products']} without decodable "
               "images)")  # fmt: skip
    if summary.get("twin_matched_products"):
        typer.echo(f"{summary['twin_matched_products']} products share a picture with training products (twins: "
                   f"{summary['twins']}, chosen on val)")  # fmt: skip


@app.command()
@from_configs
def export(config: ExportConfig) -> None:
    """One ONNX graph of the run: a product's uint8 pictures -> its top-k leaves and calibrated probabilities."""
    from prodcat.predict.export import export_onnx, sidecar_path

    sidecar = export_onnx(config)
    check = sidecar["self_check"]
    typer.echo(
        f"{config.out} + {sidecar_path(config.out).name}: aggregation {sidecar['aggregation']['name']}, "
        f"top-{sidecar['top_k']}; "
        f"ONNX Runtime = PyTorch on {check['top1_agree']}/{check['products']} rendered products "
        f"(probabilities within {check['max_probability_difference']:.1g})"
    )


@app.command()
def report(workdir: Workdir) -> None:
    """One self-contained HTML page: exploration, training, comparison, sweep, evaluation, gallery."""
    from prodcat.report.html import build_report

    typer.echo(f"report -> {build_report(workdir)}")


@app.command()
@from_configs
def serve(config: ServeConfig) -> None:
    """HTTP API (POST /v1/classify) and a web page to categorise a product's photos."""
    from prodcat.serve.app import serve as run_serve

    run_serve(config)


@app.command()
def demo(
    workdir: Workdir = Path("demo_work"),
    quick: Annotated[bool, typer.Option(help="Tiny settings (under 2 minutes), what the tests run.")] = False,
) -> None:
    """The whole pipeline on the embedded default, offline: data -> ... -> report."""
    from prodcat.pipeline import run_demo

    run_demo(workdir, quick=quick)


@app.command()
@from_configs
def ocr(config: OcrConfig) -> None:
    """Read the words on the pictures (covers) into W/ocr/words.parquet; resumable."""
    from prodcat.ocr.stage import run_ocr
    from prodcat.report.ocr_examples import draw_ocr_examples

    summary = run_ocr(config)
    draw_ocr_examples(config.workdir)  # the stage writes tables; its examples.png is drawn here
    typer.echo(f"ocr -> {Path(config.workdir) / 'ocr'}: {summary['ok']} of {summary['pictures']} pictures with text")


@app.command("add-category")
def add_category(
    run: Run,
    category_id: Annotated[int, typer.Option(help="The new leaf's category id.")],
    names: Annotated[str, typer.Option(help="Its three names, 'level 1|level 2|leaf'.")],
    pictures: Annotated[
        Path | None, typer.Option(help="Folder of examples: each picture file one product, each sub-folder one.")
    ] = None,
    bson: Annotated[Path | None, typer.Option(help="A BSON file of example products.")] = None,
    replace: Annotated[bool, typer.Option(help="Score a leaf the taxonomy has by its prototype instead.")] = False,
) -> None:
    """Add a leaf to a trained run from a few example products (a prototype on the frozen features, no
    retraining); predict and serve know it at once."""
    from prodcat.predict.predictor import Predictor
    from prodcat.predict.prototypes import add_category as run_add
    from prodcat.predict.prototypes import read_example_products

    try:
        products = read_example_products(pictures=pictures, bson=bson)
        predictor = Predictor.load(run)
        entry = run_add(run, category_id, names.split("|"), products, predictor=predictor, replace=replace)
    except (ValueError, FileNotFoundError) as error:  # bad examples or names: one line, exit code 2
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"category {entry['category_id']} ({' > '.join(entry['names'])}) -> {run} as label {entry['label']}, "
               f"from {entry['products']} products / {entry['pictures']} pictures; scale {entry['scale']:g}, bias "
               f"{entry['bias']:.3f} ({entry['chosen_by']})")  # fmt: skip


@app.command("text-head")
@from_configs
def text_head(config: FusionConfig) -> None:
    """Fuse the words `prodcat ocr` read with the run's pictures (late and concat fusion; keeps the better on val)."""
    from prodcat.train.text_fusion import train_text_model

    summary = train_text_model(config)
    held = summary["holdout"]
    typer.echo(
        f"text model ({summary['kept']}, chosen on val) -> {Path(config.run) / 'text'}; holdout product top-1 (n = "
        f"{held['picture']['all']['n']}): picture {held['picture']['all']['top1']:.3f}, late "
        f"{held['late']['all']['top1']:.3f}, concat {held['concat']['all']['top1']:.3f}"
    )
    calibration = summary["calibration"]
    ece = calibration["holdout"]
    typer.echo(
        f"fused scores calibrated on val (n = {calibration['n']}): holdout ECE (n = {ece['n']}) "
        f"{ece['before']['ece']:.4f} with the picture calibration ({ece['before']['calibration']}) -> "
        f"{ece['after']['ece']:.4f} with this one"
    )


MAKES_WORKDIR = ("ingest", "demo")  # the others log to W/logs only where W already exists (no folder for a typo)


def _log_file(command: str, arguments: dict[str, object]) -> None:
    """W/logs/prodcat.log for commands with a workdir (or a run inside W/runs/NAME)."""
    from prodcat.utils import log_to_file

    workdir = arguments.get("workdir")
    run = arguments.get("run")
    if isinstance(run, Path) and run.parent.name == "runs" and (run / "checkpoints").is_dir():
        workdir = run.parent.parent
    if isinstance(workdir, Path) and (workdir.is_dir() or command in MAKES_WORKDIR):
        with contextlib.suppress(OSError):  # a read-only W fails where the stage writes, with its own message
            log_to_file(workdir / "logs" / "prodcat.log")


InProcess = Annotated[bool, typer.Option(help="Run stages in this process (peak RSS not per stage).")]
Resume = Annotated[
    bool,
    typer.Option(help="Go on from W/reports/rehearsal.json: stages an earlier run of the same sizes finished are "
                 "reused, not run again (--seeds may differ)."),
]  # fmt: skip


@app.command()
@from_configs
def rehearsal(
    *,
    workdir: Workdir = Path("rehearsal_work"),
    plan: RehearsalConfig,
    in_process: InProcess = False,
    resume: Resume = False,
) -> None:
    """Scale rehearsal on pictures: 5,270 leaves of the real shape end to end, every stage recorded."""
    from prodcat.rehearsal import RehearsalPlan, run_rehearsal

    try:
        payload = run_rehearsal(workdir, RehearsalPlan(**dataclasses.asdict(plan)), not in_process, resume)
    except ValueError as error:  # a --resume over another plan's records
        raise UserError(str(error)) from error
    typer.echo(f"rehearsal -> {workdir / 'reports' / 'rehearsal.json'} ({len(payload['stages'])} stages)")


@app.command("rehearsal-full")
@from_configs
def rehearsal_full(
    *,
    workdir: Workdir = Path("rehearsal_full_work"),
    plan: FullRehearsalConfig,
    in_process: InProcess = False,
    resume: Resume = False,
) -> None:
    """Full row counts without pictures: a synthetic 12.37 M-row store, train, evaluate, predict, all recorded."""
    from prodcat.rehearsal import FullPlan, run_rehearsal_full

    try:
        payload = run_rehearsal_full(workdir, FullPlan(**dataclasses.asdict(plan)), not in_process, resume)
    except ValueError as error:  # the run's own checks (an OSError is described by main(): full disk, ...)
        raise UserError(str(error)) from error
    typer.echo(f"rehearsal-full -> {workdir / 'reports' / 'rehearsal.json'} ({len(payload['stages'])} stages)")


def _one_line_errors(command: str, callback: Callable[..., None]) -> Callable[..., None]:
    """Each command's expected failures end as one line `error: ...` and exit code 2 (bugs keep the traceback)."""

    @functools.wraps(callback)
    def wrapper(**arguments: object) -> None:
        try:
            if isinstance(arguments.get("run"), Path):
                require_run(arguments["run"])  # type: ignore[arg-type]
            _log_file(command, arguments)
            callback(**arguments)
        except Exception as error:
            message = describe(error)
            if message is None:
                raise
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# One place for every command (including any added above): typer reads the callbacks when the app runs.
for _info in app.registered_commands:
    _info.callback = _one_line_errors(_info.name or _info.callback.__name__.replace("_", "-"), _info.callback)


def main() -> None:
    """Console entry point; the commands' own errors are handled by `_one_line_errors`, this catches the rest."""
    try:
        app()
    except Exception as error:
        message = describe(error)
        if message is None:
            raise
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
