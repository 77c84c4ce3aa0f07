"""Thin typer CLI: parse flags, build a config, call one package function. No logic lives here."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from prodcat.config import DemoConfig, EvalConfig, ExtractConfig, IngestConfig, ServeConfig, TrainConfig
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


Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Working directory holding catalog, features, runs.")]
Run = Annotated[Path, typer.Option(help="Run directory (W/runs/NAME).")]
Seed = Annotated[int, typer.Option(help="Random seed (same seed, same result).")]
BatchSize = Annotated[int, typer.Option(help="Examples per batch.")]
Epochs = Annotated[float, typer.Option(help="Passes over the train split (fractions allowed).")]
Features = Annotated[str, typer.Option(help="Feature store name under W/features (what `prodcat extract` wrote).")]
HEAD_HELP = (
    "linear | mlp | conv | hier (an mlp trunk with one output per taxonomy level, decoded consistently) | "
    "gated_product (attention over a product's 1-4 pictures, trained on products)."
)
LOSS_HELP = (
    "softmax (full) | sampled (sampled softmax: K negatives per step) | adaptive (adaptive softmax) | "
    "balanced_softmax (softmax on logits + log prior: long-tail training)."
)
NUM_SAMPLED_HELP = "Negatives K per step for --loss sampled."
OPTIMIZER_HELP = (
    "adamw | sgd | rowwise_adamw | rowwise_sgd, for every loss and head. rowwise_*: row-wise updates of the output "
    "layers (sparse rows with the sampled loss: what makes 1 M classes fit), AdamW / SGD elsewhere."
)
SEEDS_HELP = "Seeds 0..N-1 per arm (default 3; one seed shows no spread)."


def _csv(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write train.bson, test.bson, category_names.csv into.")],
    products: Annotated[int, typer.Option(help="Labelled products (train.bson).")] = DemoConfig.products,
    test_products: Annotated[int, typer.Option(help="Unlabelled products (test.bson; 0 writes none).")] = (
        DemoConfig.test_products
    ),
    categories: Annotated[int, typer.Option(help="Leaf categories, drawn from the real taxonomy's names.")] = (
        DemoConfig.categories
    ),
    seed: Seed = DemoConfig.seed,
    stock_share: Annotated[
        float, typer.Option(help="Share of products showing stock photos shared with others (byte-identical).")
    ] = DemoConfig.stock_share,
    placeholder_share: Annotated[
        float, typer.Option(help="Share of products showing only a placeholder picture shared by all categories.")
    ] = DemoConfig.placeholder_share,
    text_leaves: Annotated[
        int | None, typer.Option(help="Book/music/film/game cover leaves (default: min(8, categories // 5)).")
    ] = DemoConfig.text_leaves,
) -> None:
    """Write a synthetic data set in Kaggle's Cdiscount formats (the embedded default)."""
    from prodcat.data.synthetic.demo import generate_demo

    config = DemoConfig(
        products=products,
        test_products=test_products,
        categories=categories,
        seed=seed,
        stock_share=stock_share,
        placeholder_share=placeholder_share,
        text_leaves=text_leaves,
    )
    summary = generate_demo(out, config)
    typer.echo(
        f"wrote {summary['train_products']} train / {summary['test_products']} test products to {out} "
        f"({summary['train_duplicate_share']:.1%} of train pictures are copies of another)"
    )


@app.command()
def ingest(
    data_dir: Annotated[Path, typer.Argument(help="Folder with train.bson and/or test.bson and category_names.csv.")],
    workdir: Workdir,
    val_fraction: Annotated[
        float, typer.Option(help="Share of train.bson products for selection (checkpoints, thresholds).")
    ] = IngestConfig.val_fraction,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of train.bson products for reporting only (never tuned on).")
    ] = IngestConfig.holdout_fraction,
    seed: Annotated[int, typer.Option(help="Seed of the split (same seed, same split).")] = IngestConfig.seed,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad document instead of skipping it.")] = False,
) -> None:
    """Index BSON files (no picture decoding) and the taxonomy into Parquet catalogs."""
    from prodcat.data.catalog import ingest as run_ingest

    report = run_ingest(
        IngestConfig(
            data_dir=str(data_dir),
            workdir=str(workdir),
            val_fraction=val_fraction,
            holdout_fraction=holdout_fraction,
            seed=seed,
            strict=strict,
        )
    )
    for name, part in report["files"].items():
        typer.echo(f"{name}: {part['products']} products, {part['images']} images, {part['problems']} problems")
        duplicates = report["duplicates"][name]
        line = f"  {duplicates['duplicate_share']:.1%} of the pictures not unique by content"
        if "groups" in duplicates:
            splits = " / ".join(f"{part[f'{split}_products']} {split}" for split in ("train", "val", "holdout"))
            line += f", {duplicates['groups']} duplicate groups; split {splits} (groups kept whole)"
        typer.echo(line)


@app.command()
def explore(
    workdir: Workdir,
    top_k: Annotated[int, typer.Option(help="Largest and smallest categories listed per level.")] = 5,
) -> None:
    """Counts per level, log histograms, head and tail categories -> W/reports/explore/."""
    from prodcat.report.explore import explore as run_explore

    summary = run_explore(workdir, top_k=top_k)
    typer.echo(f"{summary['products']} products, {summary['images']} images -> {workdir / 'reports' / 'explore'}")


@app.command()
def extract(
    workdir: Workdir,
    backbone: Annotated[
        str, typer.Option(help="efficientnet_lite0 (packaged weights) | legacy_xception | any timm model name.")
    ] = ExtractConfig.backbone,
    weights: Annotated[Path | None, typer.Option(help="Local weights: .safetensors or a torch state dict.")] = None,
    random_init: Annotated[bool, typer.Option(help="Random weights (tests and speed runs only).")] = False,
    features: Annotated[str, typer.Option(help="pooled | spatial")] = ExtractConfig.features,
    spatial_channels: Annotated[
        int | None, typer.Option(help="With --features spatial: keep the first N channels (smaller store).")
    ] = None,
    split: Annotated[
        str, typer.Option(help="Comma-separated splits; those the catalog lacks (e.g. no test.bson) are skipped.")
    ] = ",".join(ExtractConfig.splits),
    batch_size: BatchSize = ExtractConfig.batch_size,
    workers: Annotated[int | None, typer.Option(help="Decode worker processes (default: auto).")] = None,
    shard_size: Annotated[int, typer.Option(help="Images per shard (the unit a re-run resumes from).")] = (
        ExtractConfig.shard_size
    ),
    limit: Annotated[int | None, typer.Option(help="At most this many products per split.")] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="auto (bf16 only where it keeps features within cosine 0.9995 of float32, else float32; "
            "ONNX Runtime on the CPU) | float32 | bfloat16"
        ),
    ] = ExtractConfig.precision,
    distributed: Annotated[bool, typer.Option(help="Split shards across torchrun ranks.")] = False,
    name: Annotated[str | None, typer.Option(help="Store name (default <backbone>-<features>).")] = None,
    dedupe: Annotated[
        bool, typer.Option(help="Run each distinct picture once (catalog/pictures.parquet); copies share it.")
    ] = ExtractConfig.dedupe,
    tta: Annotated[
        str, typer.Option(help="none | flip_mean (mean of the picture's and its mirror's features; 2x backbone time).")
    ] = ExtractConfig.tta,
) -> None:
    """Run a frozen pretrained backbone over the catalog into a resumable feature store."""
    require_catalog(workdir)  # before torch loads: an empty workdir fails at once, pointing at ingest
    from prodcat.features.extract import extract as run_extract

    config = ExtractConfig(
        workdir=str(workdir),
        backbone=backbone,
        weights=str(weights) if weights else None,
        random_init=random_init,
        features=features,
        spatial_channels=spatial_channels,
        splits=_csv(split) or (),
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        limit=limit,
        precision=precision,
        distributed=distributed,
        name=name,
        dedupe=dedupe,
        tta=tta,
    )
    store = run_extract(config)
    typer.echo(f"features -> {store}")


@app.command()
def train(
    workdir: Workdir,
    features: Features = TrainConfig.features,
    head: Annotated[str, typer.Option(help=HEAD_HELP)] = TrainConfig.head,
    loss: Annotated[str, typer.Option(help=LOSS_HELP)] = TrainConfig.loss,
    run_name: Annotated[
        str | None, typer.Option(help="Run folder name under W/runs (default HEAD-LOSS-sSEED).")
    ] = None,
    num_sampled: Annotated[int, typer.Option(help=NUM_SAMPLED_HELP)] = TrainConfig.num_sampled,
    sampler: Annotated[
        str, typer.Option(help="How --loss sampled draws negatives: uniform | log_uniform | unigram.")
    ] = TrainConfig.sampler,
    with_replacement: Annotated[bool, typer.Option(help="Sampled negatives may repeat within one draw.")] = False,
    optimizer: Annotated[str, typer.Option(help=OPTIMIZER_HELP)] = TrainConfig.optimizer,
    lr: Annotated[float, typer.Option(help="Peak learning rate (after warm-up, then cosine decay).")] = TrainConfig.lr,
    weight_decay: Annotated[float, typer.Option(help="Decoupled weight decay.")] = TrainConfig.weight_decay,
    epochs: Epochs = TrainConfig.epochs,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (overrides --epochs).")] = None,
    batch_size: BatchSize = TrainConfig.batch_size,
    hidden_dim: Annotated[int, typer.Option(help="Width of the mlp / conv / hier trunk.")] = TrainConfig.hidden_dim,
    dropout: Annotated[float, typer.Option(help="Dropout before the output layer.")] = TrainConfig.dropout,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the full softmax (0: none).")] = (
        TrainConfig.label_smoothing
    ),
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")] = TrainConfig.warmup_steps,
    eval_every: Annotated[int, typer.Option(help="Validate (and checkpoint) every N steps.")] = TrainConfig.eval_every,
    seed: Seed = TrainConfig.seed,
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete the run's earlier checkpoints, metrics and evaluation, and start over.")
    ] = False,
    distributed: Annotated[bool, typer.Option(help="DistributedDataParallel under torchrun.")] = False,
) -> None:
    """Train a head on cached features with full, sampled or adaptive softmax."""
    # The config is checked before prodcat.train.loop (and torch) is imported: a misspelt --loss fails at once.
    config = TrainConfig(
        workdir=str(workdir),
        features=features,
        head=head,
        loss=loss,
        run_name=run_name,
        num_sampled=num_sampled,
        sampler=sampler,
        sample_with_replacement=with_replacement,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        hidden_dim=hidden_dim,
        dropout=dropout,
        label_smoothing=label_smoothing,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        distributed=distributed,
    )
    from prodcat.distributed import is_main_process
    from prodcat.report.runs import draw_run
    from prodcat.train.loop import train as run_train

    run_dir = run_train(config)
    if is_main_process():
        draw_run(run_dir)  # training writes numbers; its curves are drawn here
    typer.echo(f"run -> {run_dir}")


@app.command()
def compare(
    workdir: Workdir,
    features: Features = TrainConfig.features,
    head: Annotated[str, typer.Option(help=HEAD_HELP)] = TrainConfig.head,
    losses: Annotated[str, typer.Option(help=f"Comma-separated losses compared. {LOSS_HELP}")] = (
        "softmax,sampled,adaptive"
    ),
    seeds: Annotated[int | None, typer.Option(help=SEEDS_HELP)] = None,
    epochs: Epochs = 5.0,
    num_sampled: Annotated[int, typer.Option(help=NUM_SAMPLED_HELP)] = 64,
    batch_size: BatchSize = TrainConfig.batch_size,
    optimizer: Annotated[
        str | None, typer.Option(help=f"Held fixed across arms (default {TrainConfig.optimizer}). {OPTIMIZER_HELP}")
    ] = None,
    optimizers: Annotated[
        str | None, typer.Option(help="Comma-separated: the optimizer as a second factor (loss x optimizer).")
    ] = None,
) -> None:
    """Same head, budget, seeds and optimizer: softmax vs sampled vs adaptive (x optimizers) -> W/reports/compare/."""
    from prodcat.train.experiments import compare as run_compare

    result = run_compare(
        workdir,
        features=features,
        head=head,
        losses=_csv(losses) or (),
        epochs=epochs,
        num_sampled=num_sampled,
        batch_size=batch_size,
        optimizer=optimizer,
        optimizers=_csv(optimizers),
        **({} if seeds is None else {"seeds": seeds}),
    )
    from prodcat.report.experiments import render_experiment

    render_experiment(result.report)  # compare writes numbers; its figure and tables are drawn here
    typer.echo(f"comparison of {len(result.runs)} runs -> {result.report}")


@app.command()
def sweep(
    workdir: Workdir,
    features: Features = TrainConfig.features,
    head: Annotated[str, typer.Option(help=HEAD_HELP)] = TrainConfig.head,
    num_sampled: Annotated[str, typer.Option(help="Comma-separated sampled negatives.")] = "8,32,128,512,2048",
    sampler: Annotated[str, typer.Option(help="uniform | log_uniform | unigram.")] = TrainConfig.sampler,
    epochs: Epochs = 5.0,
    seeds: Annotated[int | None, typer.Option(help=SEEDS_HELP)] = None,
    batch_size: BatchSize = TrainConfig.batch_size,
    optimizer: Annotated[
        str | None,
        typer.Option(help=f"Every K and the full-softmax line (default {TrainConfig.optimizer}). {OPTIMIZER_HELP}"),
    ] = None,
) -> None:
    """Accuracy and step time against the number of sampled negatives, one optimizer -> W/reports/sweep/."""
    from prodcat.train.experiments import sweep as run_sweep

    values = tuple(int(v) for v in _csv(num_sampled) or ())
    result = run_sweep(
        workdir,
        features=features,
        head=head,
        num_sampled=values,
        sampler=sampler,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        **({} if seeds is None else {"seeds": seeds}),
    )
    from prodcat.report.experiments import render_experiment

    render_experiment(result.report)
    typer.echo(f"sweep of {len(result.runs)} runs -> {result.report}")


@app.command()
def evaluate(
    run: Run,
    split: Annotated[
        str, typer.Option(help="Split reported on: holdout (default) or val (the selection split: optimistic).")
    ] = EvalConfig.split,
    aggregation: Annotated[
        str, typer.Option(help="auto (best product top-1 on val) | mean_prob | mean_logprob | vote")
    ] = EvalConfig.aggregation,
    target_accuracy: Annotated[
        float, typer.Option(help="Auto-accept threshold: the lowest reaching this product accuracy on val.")
    ] = EvalConfig.target_accuracy,
    objective: Annotated[
        str,
        typer.Option(
            help="What the logit adjustment's tau maximises on val: top1 (test drawn like train, as "
            "Kaggle's) | macro (every leaf alike). Top-1 can drop while macro rises."
        ),
    ] = EvalConfig.objective,
    compare_runs: Annotated[
        str,
        typer.Option(
            help="Comma-separated evaluated runs one change apart (e.g. a balanced_softmax run): "
            "each becomes a row of the levers table."
        ),
    ] = "",
) -> None:
    """Choose on val, report on the holdout: metrics with n and 95% intervals -> RUN/eval/metrics.json, figures."""
    config = EvalConfig(
        run=str(run), split=split, aggregation=aggregation, target_accuracy=target_accuracy, objective=objective,
        compare_runs=tuple(_csv(compare_runs) or ()),
    )  # fmt: skip
    from prodcat.evaluate.evaluation import evaluate as run_evaluate
    from prodcat.evaluate.evaluation import summary_lines
    from prodcat.report.runs import draw_run

    metrics = run_evaluate(config)
    draw_run(run)  # evaluation writes numbers; its figures and levers.md are drawn here
    typer.echo("\n".join(summary_lines(metrics)))


@app.command()
def predict(
    run: Run,
    bson: Annotated[Path, typer.Option(help="A Kaggle BSON file (test.bson).")],
    out: Annotated[Path, typer.Option(help="Submission CSV: _id,category_id.")] = Path("submission.csv"),
    batch_size: Annotated[int, typer.Option(help="Products per forward.")] = 64,
) -> None:
    """Predict every product of a BSON file into a Kaggle submission, in input order."""
    require_file(bson, "BSON")
    from prodcat.predict.submission import predict_bson

    summary = predict_bson(run, bson, out, batch_size=batch_size)
    typer.echo(f"{summary['products']} products -> {out} ({summary['fallback_products']} without decodable images)")
    if summary.get("twin_matched_products"):
        typer.echo(f"{summary['twin_matched_products']} products share a picture with training products (twins: "
                   f"{summary['twins']}, chosen on val)")  # fmt: skip


@app.command()
def report(workdir: Workdir) -> None:
    """One self-contained HTML page: exploration, training, comparison, sweep, evaluation, gallery."""
    from prodcat.report.html import build_report

    typer.echo(f"report -> {build_report(workdir)}")


@app.command()
def serve(
    run: Run,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 for every one).")] = (
        ServeConfig.host
    ),
    port: Annotated[int, typer.Option(help="TCP port (checked before the model loads).")] = ServeConfig.port,
    top_k: Annotated[int, typer.Option(help="Categories returned per product.")] = ServeConfig.top_k,
    micro_batching: Annotated[
        bool, typer.Option(help="Batch concurrent requests into one forward (off: one forward per request).")
    ] = True,
) -> None:
    """HTTP API (POST /v1/classify) and a web page to categorise a product's photos."""
    from prodcat.serve.app import serve as run_serve

    run_serve(ServeConfig(run=str(run), host=host, port=port, top_k=top_k, micro_batching=micro_batching))


@app.command()
def demo(
    workdir: Workdir = Path("demo_work"),
    quick: Annotated[bool, typer.Option(help="Tiny settings (under 2 minutes), what the tests run.")] = False,
) -> None:
    """The whole pipeline on the embedded default, offline: data -> ... -> report."""
    from prodcat.pipeline import run_demo

    run_demo(workdir, quick=quick)


@app.command()
def ocr(
    workdir: Workdir,
    split: Annotated[
        str, typer.Option(help="Comma-separated splits: train,val,holdout,test.")
    ] = "train,val,holdout,test",
    workers: Annotated[int | None, typer.Option(help="OCR worker processes (default: one per core).")] = None,
    select: Annotated[str, typer.Option(help="all | text_likely (a cheap text-presence test first).")] = "all",
    engine: Annotated[str, typer.Option(help="tesseract | rapidocr")] = "tesseract",
    limit: Annotated[int | None, typer.Option(help="At most this many products per split.")] = None,
    shard_size: Annotated[int, typer.Option(help="Pictures per shard (the resume unit).")] = 256,
) -> None:
    """Read the words on the pictures (covers) into W/ocr/words.parquet; resumable."""
    from prodcat.ocr.stage import OcrConfig, run_ocr

    config = OcrConfig(
        workdir=str(workdir),
        splits=_csv(split) or (),
        workers=workers,
        select=select,
        engine=engine,
        limit=limit,
        shard_size=shard_size,
    )
    from prodcat.report.ocr_examples import draw_ocr_examples

    summary = run_ocr(config)
    draw_ocr_examples(workdir)  # the stage writes tables; its examples.png is drawn here
    typer.echo(f"ocr -> {workdir / 'ocr'}: {summary['ok']} of {summary['pictures']} pictures with text")


@app.command("add-category")
def add_category(
    run: Annotated[Path, typer.Option(help="Run directory (W/runs/NAME).")],
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
def text_head(
    run: Annotated[Path, typer.Option(help="The picture run to add a text model to (W/runs/NAME).")],
    fusion: Annotated[str, typer.Option(help="auto (better on val) | late | concat")] = "auto",
    epochs: Annotated[int, typer.Option(help="Epochs over the train products.")] = 40,
    n_features: Annotated[int, typer.Option(help="Hashed text vector size.")] = 2**14,
    overwrite: Annotated[bool, typer.Option(help="Replace the run's text model.")] = False,
) -> None:
    """Fuse the words `prodcat ocr` read with the run's pictures (late and concat fusion; keeps the better on val)."""
    from prodcat.train.text_fusion import FusionConfig, train_text_model

    config = FusionConfig(run=str(run), fusion=fusion, epochs=epochs, n_features=n_features, overwrite=overwrite)
    summary = train_text_model(config)
    held = summary["holdout"]
    typer.echo(
        f"text model ({summary['kept']}, chosen on val) -> {run / 'text'}; holdout product top-1 (n = "
        f"{held['picture']['all']['n']}): picture {held['picture']['all']['top1']:.3f}, late "
        f"{held['late']['all']['top1']:.3f}, concat {held['concat']['all']['top1']:.3f}"
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


@app.command()
def rehearsal(
    workdir: Workdir = Path("rehearsal_work"),
    products: Annotated[int, typer.Option(help="Train products (>= categories).")] = 40_000,
    test_products: int = 4_000,
    categories: Annotated[int, typer.Option(help="Leaves (must match --taxonomy-csv when given).")] = 5270,
    taxonomy_csv: Annotated[str | None, typer.Option(help="Kaggle's category_names.csv as the taxonomy.")] = None,
    counts_json: Annotated[str | None, typer.Option(help="images_per_category.json: the real long tail.")] = None,
    seeds: Annotated[int, typer.Option(help="Training seeds per arm.")] = 3,
    epochs: Annotated[float, typer.Option(help="Epochs of every training run.")] = 5.0,
    num_sampled: Annotated[int, typer.Option(help="Negatives K of the sampled-softmax arm.")] = 1024,
    in_process: Annotated[bool, typer.Option(help="Run stages in this process (peak RSS not per stage).")] = False,
) -> None:
    """Scale rehearsal on pictures: 5,270 leaves of the real shape end to end, every stage recorded."""
    from prodcat.rehearsal import RehearsalPlan, run_rehearsal

    try:
        plan = RehearsalPlan(products=products, test_products=test_products, categories=categories,
                             taxonomy_csv=taxonomy_csv, counts_json=counts_json, seeds=seeds, epochs=epochs,
                             num_sampled=num_sampled)  # fmt: skip
    except ValueError as error:  # the plan's own checks: one line, exit 2
        raise UserError(str(error)) from error
    payload = run_rehearsal(workdir, plan, isolate=not in_process)
    typer.echo(f"rehearsal -> {workdir / 'reports' / 'rehearsal.json'} ({len(payload['stages'])} stages)")


@app.command("rehearsal-full")
def rehearsal_full(
    workdir: Workdir = Path("rehearsal_full_work"),
    products: Annotated[int, typer.Option(help="Train products (default: the real 7,069,896).")] = 7_069_896,
    test_products: Annotated[int, typer.Option(help="Test products (default: the real 1,768,182).")] = 1_768_182,
    dim: Annotated[
        int, typer.Option(help="Feature dimension (1,280 = Xception; smaller only if disk demands).")
    ] = 1280,
    categories: Annotated[int, typer.Option(help="Leaves (must match --taxonomy-csv when given).")] = 5270,
    taxonomy_csv: Annotated[str | None, typer.Option(help="Kaggle's category_names.csv as the taxonomy.")] = None,
    counts_json: Annotated[str | None, typer.Option(help="images_per_category.json: real products per leaf.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per loss (epoch time extrapolated).")] = 300,
    batch_size: Annotated[int, typer.Option(help="Training batch (rows per step).")] = 1024,
    shard_size: Annotated[int, typer.Option(help="Rows per feature-store shard.")] = 65_536,
    in_process: Annotated[bool, typer.Option(help="Run stages in this process (peak RSS not per stage).")] = False,
) -> None:
    """Full row counts without pictures: a synthetic 12.37 M-row store, train, evaluate, predict, all recorded."""
    from prodcat.rehearsal import FullPlan, run_rehearsal_full

    try:
        plan = FullPlan(products=products, test_products=test_products, dim=dim, categories=categories,
                        taxonomy_csv=taxonomy_csv, counts_json=counts_json, train_steps=steps, batch_size=batch_size,
                        shard_size=shard_size)  # fmt: skip
        payload = run_rehearsal_full(workdir, plan, isolate=not in_process)
    except ValueError as error:  # the plan's own checks (an OSError is described by main(): full disk, ...)
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
