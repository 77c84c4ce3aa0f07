"""Issue 11: `prodcat export` writes one ONNX graph (pictures -> top-k) that answers like the PyTorch Predictor on
every holdout product of a tiny trained demo run (same top-1, probabilities within 1e-4), and the Predictor's
contract (and so `serve`) runs from it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import bson
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF
from typer.testing import CliRunner

from prodcat.cli import app
from prodcat.predict.calibration import save_prior
from prodcat.utils import write_json

TOLERANCE = 1e-4  # the bound on probability differences
BACKBONE = "test_efficientnet"  # timm's tiny test network (random init, a few ms per picture), input 160 x 160


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic demo workdir with a pooled float32 store and a trained linear run; its pictures are at the
    backbone's input size, as Cdiscount's 180 x 180 are at the registered backbones'."""
    from prodcat.config import DemoConfig, ExtractConfig, IngestConfig, TrainConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo
    from prodcat.features.extract import extract
    from prodcat.train.loop import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("export")
    data, workdir = root / "data", root / "W"
    generate_demo(data, DemoConfig(products=60, test_products=0, categories=4, seed=1, image_size=160))
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.2, holdout_fraction=0.2))
    # float32: "auto" may pick bf16 on a CPU with AMX, and the graph is float32 (the sidecar says so).
    extract(ExtractConfig(workdir=str(workdir), backbone=BACKBONE, random_init=True, batch_size=32, workers=0,
                          precision="float32"))  # fmt: skip
    # lr 0.1: a head sure of some products and not of others, so probabilities and the threshold are tested.
    train(TrainConfig(workdir=str(workdir), store=f"{BACKBONE}-pooled", max_steps=60, lr=0.1, batch_size=16,
                      eval_every=20, warmup_steps=1, run_name="linear"))  # fmt: skip
    return root


def _category_ids(run: Path) -> list[int]:
    """The run's leaves in label order (its copy of the taxonomy)."""
    from prodcat.data.taxonomy import Taxonomy

    return [int(c) for c in Taxonomy.load(run / "taxonomy.parquet").category_ids]


def holdout_products(root: Path) -> list[list[torch.Tensor]]:
    """The decoded pictures of every holdout product, in file order."""
    from prodcat.data.catalog import load_catalog
    from prodcat.data.images import decode_image

    holdout = set(load_catalog(root / "W", "train", split="holdout")["product_id"].to_pylist())
    with open(root / "data" / "train.bson", "rb") as source:
        documents = [doc for doc in bson.decode_file_iter(source) if int(doc["_id"]) in holdout]
    return [[decode_image(picture["picture"]) for picture in doc["imgs"]] for doc in documents]


def choose(run: Path, aggregation: str, tau: float, temperature: float, threshold: float) -> None:
    """What `prodcat evaluate` would have chosen on val, written as it writes it (metrics.json + prior.json)."""
    save_prior(run / "eval", np.arange(len(_category_ids(run)), 0, -1) * 10, "pictures")
    write_json(run / "eval" / "metrics.json", {
        "product": {"aggregation": aggregation}, "confidence": {"threshold": threshold},
        "logit_adjustment": {"tau": tau}, "calibration": {"temperature": temperature},
    })  # fmt: skip


def export(run: Path, out: Path, *extra: str) -> None:
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(out), *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "rendered products" in result.output


def assert_same_answers(expected: Sequence, got: Sequence) -> float:
    """Same top-1 for every product, same per-picture ranking, probabilities within TOLERANCE; the largest gap."""
    worst = 0.0
    assert len(expected) == len(got) > 0
    for want, have in zip(expected, got, strict=True):
        assert have.top[0].label == want.top[0].label and have.top[0].category_id == want.top[0].category_id
        assert [s.label for s in have.top] == [s.label for s in want.top]
        gaps = [abs(a.probability - b.probability) for a, b in zip(want.top, have.top, strict=True)]
        for want_image, have_image in zip(want.images, have.images, strict=True):
            assert [s.label for s in have_image] == [s.label for s in want_image]
            gaps += [abs(a.probability - b.probability) for a, b in zip(want_image, have_image, strict=True)]
        assert have.accepted == want.accepted and have.aggregation == want.aggregation
        worst = max(worst, *gaps)
    assert worst <= TOLERANCE
    return worst


def compare(run: Path, onnx: Path, products: list[list[torch.Tensor]]) -> tuple[list, list]:
    from prodcat.predict.onnx_predictor import OnnxPredictor
    from prodcat.predict.predictor import Predictor

    expected = Predictor.load(run).predict_products(products, top_k=3)
    got = OnnxPredictor.load(onnx).predict_products(products, top_k=3)
    assert_same_answers(expected, got)
    return expected, got


def test_every_holdout_product_answers_like_the_predictor(demo: Path, tmp_path: Path) -> None:
    run, onnx = demo / "W" / "runs" / "linear", tmp_path / "model.onnx"
    choose(run, "mean_prob", tau=0.7, temperature=0.8, threshold=0.6)
    export(run, onnx)
    products = holdout_products(demo)
    assert any(len(product) > 1 for product in products)  # the aggregation is at work
    expected, _ = compare(run, onnx, products)
    assert {p.accepted for p in expected} == {True, False}  # the threshold cuts through these products
    # Calibrated in the graph: a one-picture product's probabilities are not its picture's (the head's) any more.
    single = [p for p in expected if len(p.images) == 1]
    assert max(abs(p.top[0].probability - p.images[0][0].probability) for p in single) > 0.01
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    assert sidecar["aggregation"]["name"] == "mean_prob" and sidecar["calibration"]["tau"] == 0.7
    assert sidecar["calibration"]["temperature"] == 0.8 and sidecar["accept_threshold"] == 0.6
    assert sidecar["preprocessing"]["input_size"] == [3, 160, 160] and sidecar["opset"] == 18
    assert sidecar["left_out"]["text"]["in_graph"] is False and sidecar["source_run"]["name"] == "linear"
    assert [row[0] for row in sidecar["taxonomy"]["rows"]] == _category_ids(run)
    assert sidecar["self_check"]["top1_agree"] == sidecar["self_check"]["products"] == 4
    choose(run, "vote", tau=0.0, temperature=1.0, threshold=0.6)
    export(run, tmp_path / "vote.onnx")
    compare(run, tmp_path / "vote.onnx", products)
    # Pictures of another size: OnnxPredictor resizes them with the Predictor's own resize first.
    odd = [[TF.resize(image, [97, 211], antialias=True) for image in product] for product in products]
    compare(run, tmp_path / "vote.onnx", odd)


def test_the_raw_graph_takes_one_products_pictures(demo: Path, tmp_path: Path) -> None:
    """Without prodcat: onnxruntime alone, uint8 NHWC pictures in, top-k out; any picture size."""
    import onnxruntime

    run, onnx = demo / "W" / "runs" / "linear", tmp_path / "model.onnx"
    choose(run, "mean_prob", tau=0.0, temperature=1.0, threshold=0.5)
    export(run, onnx, "--top-k", "2")
    session = onnxruntime.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    for shape in ((1, 64, 64, 3), (3, 180, 180, 3), (2, 97, 211, 3)):
        pictures = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        labels, probabilities, category_ids, picture_labels, picture_probabilities = session.run(None, {
            "pictures": pictures})  # fmt: skip
        assert labels.shape == probabilities.shape == category_ids.shape == (2,)
        assert picture_labels.shape == picture_probabilities.shape == (shape[0], 2)
        assert probabilities[0] >= probabilities[1] > 0 and probabilities.sum() <= 1 + 1e-6
        assert list(category_ids) == [_category_ids(run)[label] for label in labels]


def test_product_head_and_added_categories(demo: Path, tmp_path: Path) -> None:
    """A gated_product run (its own aggregation, over the one product's pictures) with two added categories."""
    from prodcat.config import TrainConfig
    from prodcat.predict.prototypes import Prototypes
    from prodcat.train.loop import train

    run = train(TrainConfig(workdir=str(demo / "W"), store=f"{BACKBONE}-pooled", head="gated_product",
                            max_steps=10, batch_size=16, eval_every=10, warmup_steps=1, run_name="gated"))  # fmt: skip
    choose(run, "product_head", tau=0.5, temperature=0.8, threshold=0.3)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2, 256)).astype(np.float32)  # test_efficientnet's pooled width
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # A new leaf at label 5 (label 4 stays empty: zero probability) and one replacing the head's leaf 1.
    replaced = _category_ids(run)[1]
    added = [
        {"category_id": 999, "names": ["A", "B", "new"], "label": 5, "products": 1, "pictures": 1},
        {"category_id": replaced, "names": ["A", "B", "again"], "label": 1, "products": 1, "pictures": 1},
    ]
    Prototypes(vectors, rng.normal(size=256).astype(np.float32), added, scale=20.0, bias=-1.0).save(run)
    onnx = tmp_path / "gated.onnx"
    export(run, onnx)
    expected, _ = compare(run, onnx, holdout_products(demo))
    assert any(score.category_id == 999 for p in expected for score in p.top)  # an added category is in play
    sidecar = json.loads((tmp_path / "gated.onnx.json").read_text())
    assert sidecar["aggregation"]["name"] == "product_head" and sidecar["num_outputs"] == 6
    assert [c["category_id"] for c in sidecar["added_categories"]] == [999, replaced]


def test_spatial_store_with_flip_tta(demo: Path, tmp_path: Path) -> None:
    """Spatial rows (first 8 channels) averaged with their mirror, a conv head, mean_logprob."""
    from prodcat.config import ExtractConfig, TrainConfig
    from prodcat.features.extract import extract
    from prodcat.train.loop import train

    workdir = demo / "W"
    extract(ExtractConfig(workdir=str(workdir), backbone=BACKBONE, random_init=True, batch_size=32, workers=0,
                          precision="float32", features="spatial", spatial_channels=8, tta="flip_mean",
                          store_name="spatial-flip"))  # fmt: skip
    run = train(TrainConfig(workdir=str(workdir), store="spatial-flip", head="conv", hidden_dim=8, max_steps=10,
                            batch_size=16, eval_every=10, warmup_steps=1, run_name="spatial"))  # fmt: skip
    choose(run, "mean_logprob", tau=0.3, temperature=1.2, threshold=0.5)
    export(run, tmp_path / "spatial.onnx")
    compare(run, tmp_path / "spatial.onnx", holdout_products(demo))


@pytest.mark.parametrize(
    ("interpolation", "most", "share"), [("bicubic", 1, 0.03), ("bilinear", 2, 0.2), ("nearest", 0, 0)]
)
def test_graph_resize_is_torchvisions(interpolation: str, most: int, share: float) -> None:
    """The graph's preprocessing, in PyTorch and in ONNX Runtime, against the Predictor's Preprocessor: how many
    uint8 steps apart, on how many values (torchvision's uint8 resize is fixed-point, the graph's float)."""
    import dataclasses
    import io
    import warnings

    import onnxruntime

    from prodcat.features.backbones import Preprocessor, get_spec
    from prodcat.predict.export import ONNX_OPSET, PicturePreprocess

    spec = dataclasses.replace(get_spec(BACKBONE), interpolation=interpolation)
    reference, graph = Preprocessor(spec), PicturePreprocess(spec)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice (as prodcat's own export)
        torch.onnx.export(graph, (torch.zeros(1, 64, 64, 3, dtype=torch.uint8),), buffer, dynamo=False,
                          input_names=["pictures"], dynamic_axes={"pictures": {0: "n", 1: "h", 2: "w"}},
                          opset_version=ONNX_OPSET)  # fmt: skip
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for height, width in ((64, 64), (160, 160), (180, 180), (300, 97)):
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        want, pictures = reference([image]), image.permute(1, 2, 0)[None]
        for got in (graph(pictures), torch.from_numpy(session.run(None, {"pictures": pictures.numpy()})[0])):
            steps = ((got - want) / graph.scale).abs()  # in uint8 steps
            assert steps.max() <= most + 1e-3 and (steps > 0.5).float().mean() <= share
            if (height, width) == spec.image_size:
                assert torch.allclose(got, want, atol=1e-6)  # at the input size nothing is resized


@pytest.mark.parametrize("method", ["mean_prob", "mean_logprob", "vote"])
def test_one_product_aggregation_is_the_predictors(method: str) -> None:
    from prodcat.predict.aggregation import aggregate_products
    from prodcat.predict.export import aggregate_one

    log_probs = torch.log_softmax(torch.randn(4, 9, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    log_probs[3] = log_probs[1]  # a tie in votes
    want = aggregate_products(log_probs.numpy(), np.zeros(4, dtype=np.int64), 1, method)
    np.testing.assert_allclose(aggregate_one(log_probs, method).numpy(), want, atol=1e-5)


def one_line_error(args: list[str], *fragments: str) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_bad_runs_and_outputs_are_one_line(demo: Path, tmp_path: Path) -> None:
    run, out = demo / "W" / "runs" / "linear", tmp_path / "model.onnx"
    one_line_error(["export", "--run", tmp_path / "nowhere", "--out", out], "no such run folder")
    choose(run, "median_prob", tau=0.0, temperature=1.0, threshold=0.5)  # an aggregation the graph has no form of
    one_line_error(["export", "--run", run, "--out", out], "median_prob", "prodcat evaluate")
    assert not out.exists()
    choose(run, "product_head", tau=0.0, temperature=1.0, threshold=0.5)  # a picture head cannot
    one_line_error(["export", "--run", run, "--out", out], "product head")
    choose(run, "mean_prob", tau=0.0, temperature=1.0, threshold=0.5)
    out.write_bytes(b"someone's file")
    one_line_error(["export", "--run", run, "--out", out], "--overwrite")
    assert out.read_bytes() == b"someone's file"  # never replaced without the flag
    one_line_error(["export", "--run", run, "--out", tmp_path], "is a folder")
    one_line_error(["serve", "--port", 0], "--run", "--onnx")  # neither a run nor an exported file
    one_line_error(["serve", "--onnx", tmp_path / "missing.onnx", "--port", 0], "no such file", "prodcat export")


def test_a_changed_file_or_missing_sidecar_is_refused(demo: Path, tmp_path: Path) -> None:
    from prodcat.errors import UserError
    from prodcat.predict.onnx_predictor import OnnxPredictor

    run, onnx = demo / "W" / "runs" / "linear", tmp_path / "model.onnx"
    choose(run, "mean_prob", tau=0.0, temperature=1.0, threshold=0.5)
    export(run, onnx)
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 1
    onnx.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        OnnxPredictor.load(onnx)
    (tmp_path / "model.onnx.json").unlink()
    with pytest.raises(UserError, match="sidecar"):
        OnnxPredictor.load(onnx)


def test_serve_answers_from_the_exported_file(demo: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from prodcat.config import ServeConfig
    from prodcat.data.images import decode_image
    from prodcat.predict.onnx_predictor import OnnxPredictor
    from prodcat.serve.app import create_app

    run, onnx = demo / "W" / "runs" / "linear", tmp_path / "model.onnx"
    choose(run, "mean_prob", tau=0.0, temperature=1.0, threshold=0.5)
    export(run, onnx)
    with open(demo / "data" / "train.bson", "rb") as source:
        pictures = [p["picture"] for p in next(d for d in bson.decode_file_iter(source) if len(d["imgs"]) > 1)["imgs"]]
    predictor = OnnxPredictor.load(onnx)
    want = predictor.predict_product([decode_image(p) for p in pictures], top_k=3)
    files = [("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(pictures)]
    with TestClient(create_app(predictor, ServeConfig(batch_window_ms=1.0))) as client:
        response = client.post("/v1/classify", files=files, params={"top_k": 3})
        health = client.get("/health").json()
    assert response.status_code == 200, response.text
    body = response.json()
    assert [s["label"] for s in body["top"]] == [s.label for s in want.top] and len(body["images"]) == len(pictures)
    assert body["top"][0]["probability"] == pytest.approx(want.top[0].probability, abs=1e-4)  # JSON keeps 4 digits
    assert body["aggregation"] == "mean_prob" and body["training_matches"] is None
    assert json.dumps(health).count("linear") >= 1  # the source run's name
