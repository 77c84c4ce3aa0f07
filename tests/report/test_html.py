"""`prodcat report`: the page builds with all or some sections, escapes names, links only files that exist."""

from __future__ import annotations

import csv
import io
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import bson
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prodcat.config import CompareConfig, EvalConfig, IngestConfig, SweepConfig, TrainConfig
from prodcat.data.catalog import ingest, load_catalog
from prodcat.data.taxonomy import Taxonomy
from prodcat.paths import WorkPaths
from prodcat.report.html import GALLERY_RIGHT, GALLERY_WRONG, build_report
from store_fixtures import write_labelled_store

ROWS = [
    (10, "MAISON & <JARDIN>", "ABRI", "ABRI DE JARDIN"),
    (11, "MAISON & <JARDIN>", "ABRI", "CARTE PRÉPAYÉE "),
    (12, "MAISON & <JARDIN>", "OUTIL", "GROS ŒUVRE (MURET - PILIER)"),
    (13, "SPORT", "CYCLES", 'VELO ENFANT (10" - 12")'),
    (14, "SPORT", "CYCLES", "CASQUE"),
    (15, "LIBRAIRIE", "LIVRE", "ROMAN"),
]
SECTIONS = ("answer", "explore", "training", "compare", "sweep", "evaluation", "gallery", "ocr", "scale")
STORE = "toy"


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_data(data_dir: Path, rng: np.random.Generator, products: int = 120) -> None:
    """category_names.csv + a Kaggle-format train.bson of products with 1-4 small JPEGs."""
    data_dir.mkdir(parents=True)
    with open(data_dir / "category_names.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("category_id", "category_level1", "category_level2", "category_level3"))
        writer.writerows(ROWS)
    with open(data_dir / "train.bson", "wb") as out:
        for product in range(products):
            category = ROWS[int(rng.integers(len(ROWS)))][0]
            # Bytes after the JPEG end marker keep each product's pictures distinct: ingest groups byte-identical
            # pictures and keeps a group on one side of the split.
            tag = product.to_bytes(2, "little")
            pictures = [{"picture": _jpeg((40 * (category - 10), 30 * k, 200)) + tag} for k in range(product % 4 + 1)]
            out.write(bson.encode({"_id": 100 + product, "imgs": pictures, "category_id": category}))


def _write_store(root: Path, rng: np.random.Generator) -> None:
    """Synthetic features for the catalog's products (noisy class centres), as extraction would lay them out."""
    paths = WorkPaths(root)
    taxonomy = Taxonomy.load(paths.taxonomy)
    catalog = load_catalog(root, "train").to_pandas()
    centres = rng.normal(size=(taxonomy.num_classes, 8)) * 1.2
    repeat = catalog["num_images"].to_numpy().astype(int)
    split = catalog["split"].astype(str).to_numpy()
    if "holdout" not in split:  # a catalog from before ingest wrote a holdout: carve one out of val
        val = np.flatnonzero(split == "val")
        split[val[::2]] = "holdout"
    label = np.repeat(catalog["label"].to_numpy(), repeat)
    features = centres[label] + rng.normal(size=(len(label), 8)) * 1.4
    write_labelled_store(root, taxonomy, features, product_id=np.repeat(catalog["product_id"].to_numpy(), repeat),
                         image_index=np.concatenate([np.arange(n) for n in repeat]), label=label,
                         split=np.repeat(split, repeat))  # fmt: skip


@pytest.fixture(scope="module")
def full_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from prodcat.evaluate.evaluation import evaluate
    from prodcat.report.explore import explore
    from prodcat.train.experiments import compare, sweep
    from prodcat.train.loop import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("reportwork")
    rng = np.random.default_rng(0)
    _write_data(root / "data", rng)
    ingest(IngestConfig(data_dir=str(root / "data"), workdir=str(root), val_fraction=0.4, seed=0))
    explore(root)
    _write_store(root, rng)
    common = dict(
        workdir=str(root),
        store=STORE,
        lr=0.05,
        warmup_steps=0,
        epochs=6,
        batch_size=32,
        eval_every=20,
        device="cpu",
        hidden_dim=16,
        dropout=0.0,
    )
    for head in ("linear", "hier"):
        run = train(TrainConfig(head=head, loss="softmax", run_name=f"{head}-run", **common))
        evaluate(EvalConfig(run=str(run)))
    # The real experiment writers, in-process and tiny: the report reads exactly what they write.
    settings = dict(store=STORE, head="linear", epochs=2, batch_size=32, seeds=1)
    compare(CompareConfig(workdir=str(root), losses=("softmax", "sampled"), num_sampled=2, isolate=False, **settings))
    sweep(SweepConfig(workdir=str(root), num_sampled=(2,), sampler="uniform", **settings))
    return root


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r'<section id="([a-z]+)">', page)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def _local_links(page: str) -> list[str]:
    return [link for link in re.findall(r'(?:src|href)="([^"]+)"', page) if not link.startswith(("data:", "#"))]


def _image_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


def _assert_links_exist(page: str, reports: Path) -> None:
    for link in _local_links(page):
        assert not link.startswith(("/", "file:", "http")), link  # relative, so the folder can move
        assert (reports / unquote(link)).is_file(), link


def test_full_report(full_workdir: Path) -> None:
    out = build_report(full_workdir)
    reports = WorkPaths(full_workdir).reports
    assert out == reports / "index.html"
    page = out.read_text(encoding="utf-8")
    sections = _sections(page)
    assert list(sections) == list(SECTIONS)
    for name, body in sections.items():
        if name not in ("ocr", "scale"):  # optional: no `prodcat ocr` or rehearsal here, and the sections say how
            assert 'class="missing"' not in body, name
    assert "make rehearsal" in sections["scale"] and "<a " not in sections["scale"]
    assert "prodcat text-head" in sections["ocr"]
    # Names are escaped: the raw "<JARDIN>" never reaches the page as markup; accents and Œ survive as UTF-8.
    assert "<JARDIN>" not in page and "MAISON &amp; &lt;JARDIN&gt;" in page
    assert "GROS ŒUVRE" in page and "PRÉPAYÉE" in page and "VELO ENFANT (10&quot; - 12&quot;)" in page
    _assert_links_exist(page, reports)
    # Self-contained: every picture and figure is embedded, so index.html alone can be copied anywhere.
    sources = _image_sources(page)
    assert sources and all(src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for src in sources)
    assert page.count('alt="linear-run: linear head, softmax, adamw"') == 1  # its training curves
    assert 'alt="hier-run: confidence"' in page and "data:image/png;base64," in sections["compare"]
    assert "data:image/png;base64," in sections["sweep"] and "full softmax" in sections["sweep"]
    assert ">sampled<" in sections["compare"] and ">softmax<" in sections["compare"]
    assert "peak RSS" not in sections["compare"]
    assert "Conclusions" in sections["compare"] and "at equal optimizer (adamw)" in sections["compare"]
    # compare and sweep: holdout product top-1 with n and its interval over products beside the seed spread
    assert (
        "holdout product top-1 (n = " in sections["compare"] and "paired 95% interval over the" in sections["compare"]
    )
    assert re.search(r"\d+\.\d% ± n/a \[\d+\.\d, \d+\.\d\]", sections["compare"])
    assert re.search(r"\d+\.\d% ± n/a \[\d+\.\d, \d+\.\d\]", sections["sweep"]) and "(reference)" in sections["sweep"]
    assert "loss \\ optimizer" in sections["compare"]
    assert "Hierarchical vs flat head" in sections["evaluation"]
    # Headline numbers say where they come from, their n and interval; a one-seed spread is n/a, never ± 0.
    evaluation = sections["evaluation"]
    assert (
        "selected on val, reported on holdout, n = " in evaluation
        and "Best run (by product top-1 on val)" in evaluation
    )
    assert re.search(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", evaluation)
    assert "Head, medium and tail categories" in evaluation and "train pictures per leaf" in evaluation
    assert "Levers: what each one changes" in evaluation  # the table, or a line saying how to get it
    assert "± n/a" in sections["compare"] and "± n/a" in sections["sweep"]
    assert not re.search(r"± 0\.0\b", page)
    assert "Gallery of holdout products" in page
    _assert_headline(sections["answer"], full_workdir)
    assert "Per category (holdout, products)" in evaluation and 'class="numbers sortable"' in evaluation
    assert "Reliability (holdout" in evaluation and 'alt="accuracy against top probability"' in evaluation
    assert "Pictures of the most confused pairs" in evaluation
    gallery = sections["gallery"]
    best = re.search(r"Best run <b>([^<]+)</b>", sections["answer"]).group(1)
    scores = {run: _val_score(WorkPaths(full_workdir).run(run)) for run in ("linear-run", "hier-run")}
    assert scores[best] == max(scores.values()) and f"products of <b>{best}</b>" in gallery
    table = pq.read_table(WorkPaths(full_workdir).run(best) / "eval" / "predictions.parquet").to_pandas()
    right = min(GALLERY_RIGHT, int(table["correct"].sum()))
    wrong = min(GALLERY_WRONG, int((~table["correct"]).sum()))
    assert gallery.count('class="product right"') == right and gallery.count('class="product wrong"') == wrong
    shown = re.findall(r"product (\d+) · (\d) image", gallery)
    assert len(shown) == right + wrong
    # Every picture of every shown product is embedded as a JPEG thumbnail.
    assert gallery.count("data:image/jpeg;base64,") == sum(int(n) for _, n in shown)


def _val_score(run: Path) -> float:
    """Product top-1 on val of the aggregation the run keeps: where the best run is chosen (never the holdout)."""
    import json

    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    return metrics["selection"]["aggregation_top1"][metrics["product"]["aggregation"]]


def _assert_headline(answer: str, workdir: Path) -> None:
    """The answer first: best run, holdout product and picture top-1 with n and interval, macro, baseline, accept."""
    import json

    assert 'id="headline-box"' in answer and "chosen by product top-1 on val" in answer
    best = re.search(r"Best run <b>([^<]+)</b>", answer).group(1)
    run = WorkPaths(workdir).run(best)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    product, image = metrics["product"], metrics["image"]
    lo, hi = product["top1_ci95"]
    shown = f"{100 * product['top1']:.1f}%<small>[{100 * lo:.1f}, {100 * hi:.1f}] · n = {product['n']} products"
    assert shown in answer
    assert f"{100 * image['top1']:.1f}%<small>[" in answer and f"n = {image['n']} pictures" in answer
    assert "product top-1 on holdout" in answer and "picture top-1 on holdout" in answer
    assert f"{100 * product['macro']:.1f}%" in answer and "product macro accuracy" in answer
    table = pq.read_table(run / "eval" / "predictions.parquet").to_pandas()
    majority = int(np.argmax(Taxonomy.load(run / "taxonomy.parquet").train_counts))
    baseline = (table["label"] == majority).mean()
    assert f'{100 * baseline:.1f}%<small>on holdout</small></div><div class="label">majority-class' in answer
    confidence = metrics["confidence"]
    if confidence["threshold"] is not None:
        assert f"top probability is ≥ <b>{confidence['threshold']:.3g}</b>" in answer
        assert f"<b>{100 * confidence['coverage']:.0f}%</b> of products" in answer
        assert "the rest go to a person" in answer


def test_report_on_empty_workdir(tmp_path: Path) -> None:
    page = build_report(tmp_path).read_text(encoding="utf-8")
    sections = _sections(page)
    assert list(sections) == list(SECTIONS)
    assert all('class="missing"' in body for body in sections.values())
    assert "<img" not in page and not _local_links(page)


def test_report_with_some_sections(full_workdir: Path, tmp_path: Path) -> None:
    """Explore and runs without catalog or BSON: training and evaluation show, the gallery has no thumbnails."""
    source, target = WorkPaths(full_workdir), WorkPaths(tmp_path)
    shutil.copytree(source.report("explore"), target.report("explore"))
    shutil.copytree(source.runs, target.runs)
    shutil.rmtree(target.run("linear-run") / "eval")  # trained, not evaluated
    (target.run("hier-run") / "curves.png").unlink()
    (target.run("hier-run") / "metrics.jsonl").unlink()  # nothing to draw the curves from
    page = build_report(tmp_path).read_text(encoding="utf-8")
    sections = _sections(page)
    for name in ("compare", "sweep"):
        assert 'class="missing"' in sections[name]
    for name in ("answer", "explore", "training", "evaluation", "gallery"):
        assert 'class="missing"' not in sections[name], name
    assert "linear-run" in sections["training"] and "linear-run" not in sections["evaluation"]
    assert "Hierarchical vs flat head" not in sections["evaluation"]  # only the hier run is evaluated
    assert 'alt="hier-run: ' not in sections["training"]  # no curves.png, no figure
    assert "no thumbnail" in sections["gallery"] and "data:image/jpeg" not in page
    assert 'id="headline-box"' in sections["answer"] and "hier-run" in sections["answer"]
    _assert_links_exist(page, target.reports)


def test_missing_figures_are_drawn_from_the_numbers(full_workdir: Path, tmp_path: Path) -> None:
    """The stages write numbers; the report draws what is missing (or older than the numbers) before it reads."""
    source, target = WorkPaths(full_workdir), WorkPaths(tmp_path)
    shutil.copytree(source.runs, target.runs)
    shutil.copytree(source.report("compare"), target.report("compare"))
    for path in [*target.runs.glob("*/curves.png"), *target.runs.glob("*/eval/*.png"), *target.reports.rglob("*.png")]:
        path.unlink()
    (target.report("compare") / "compare.md").unlink()
    sections = _sections(build_report(tmp_path).read_text(encoding="utf-8"))
    assert 'alt="hier-run: hier head, softmax, adamw"' in sections["training"]
    assert 'alt="hier-run: confidence"' in sections["evaluation"] and "data:image/png" in sections["compare"]
    assert (target.report("compare") / "compare.md").is_file() and (
        target.run("hier-run") / "eval" / "levers.md"
    ).is_file()


def test_at_scale_page_is_linked_when_present(tmp_path: Path) -> None:
    from prodcat.rehearsal.report import write_at_scale

    stage = {"name": "ingest", "seconds": 1.0, "peak_rss_mb": 10.0, "disk_growth_mb": 0.1, "written_mb": 0.1,
             "items": 5, "unit": "products", "throughput": 5.0}  # fmt: skip
    holdout = {"product_top1": 0.41, "product_top1_ci95": [0.3, 0.5], "products": 38, "frequency": {}}
    train = {
        "run": str(tmp_path / "runs" / "r"),
        "train_seconds": 3.0,
        "epoch_seconds": 1.5,
        "epoch_seconds_basis": "measured",
    }
    runs = {"r": {"head": "linear", "loss": "sampled", "seed": 0, "train": train, "holdout": holdout}}
    payload = {"kind": "pictures", "note": "Synthetic data.", "stages": [stage], "results": {"runs": runs}}
    write_at_scale(tmp_path, payload)
    page = build_report(tmp_path).read_text(encoding="utf-8")
    scale = _sections(page)["scale"]
    assert '<a href="at_scale/index.html">' in scale and 'class="missing"' not in scale
    assert "synthetic" in scale and "41.0%" in scale and "[30.0, 50.0]" in scale and ">38<" in scale
    _assert_links_exist(page, WorkPaths(tmp_path).reports)


def test_partial_and_older_files_cost_their_figures_not_the_page(tmp_path: Path) -> None:
    """A metrics.json with only the headline blocks and a compare.json from before holdout evaluation: the page builds,
    the compare section says its numbers are val image top-1, nothing is drawn from numbers that are not there."""
    import json

    run = WorkPaths(tmp_path).run("old-run")
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"head": "linear", "loss": "softmax", "optimizer": "adamw"}))
    metrics = {
        "split": "holdout",
        "product": {"top1": 0.7, "top1_ci95": [0.6, 0.8], "n": 50, "macro": 0.5},
        "image": {"top1": 0.6, "n": 90},
        "confidence": {"threshold": None, "target_accuracy": 0.95, "note": "no threshold reaches 95%"},
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    arm = {"seeds": 1, "val_top1_mean": 0.61, "val_top1_std": None, "val_loss_mean": 1.2, "step_seconds_mean": 0.01}
    old = {"settings": {"optimizer": "adamw", "num_sampled": 4}, "losses": {"softmax": arm, "sampled": {**arm}}}
    WorkPaths(tmp_path).report("compare").mkdir(parents=True)
    (WorkPaths(tmp_path).report("compare") / "compare.json").write_text(json.dumps(old))
    sections = _sections(build_report(tmp_path).read_text(encoding="utf-8"))
    assert "val image top-1 after the last step" in sections["compare"] and "n/a" in sections["compare"]
    assert not list((run / "eval").glob("*.png"))  # nothing to draw them from
    assert "old-run" in sections["evaluation"]


def test_one_seed_spread_is_na() -> None:
    from prodcat.report.markup import spread as _spread

    assert _spread({"seeds": 1, "top1_mean": 0.5, "top1_std": 0.0}, "top1") == "50.0% ± n/a"
    assert _spread({"seeds": 3, "top1_mean": 0.5, "top1_std": 0.012}, "top1") == "50.0% ± 1.2"
    assert _spread({"seeds": 3, "top1_mean": 0.5, "top1_std": 0.0}, "top1") == "50.0% ± 0.0"  # measured, not unknown
    assert _spread({"top1_mean": 0.5, "top1_std": None}, "top1") == "50.0% ± n/a"
    with_ci = {"seeds": 3, "top1_mean": 0.5, "top1_std": 0.01, "top1_ci95": [0.45, 0.55]}
    assert _spread(with_ci, "top1") == "50.0% ± 1.0 [45.0, 55.0]"
