"""Issue 11: a run folder stands alone (a copy predicts and serves as the original does, from another directory, with
its workdir gone), `load_run`, and the Predictor's contract: load, top-k order, probabilities, the aggregation chosen
on val, one-line errors for a bad run folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from prodcat.checkpoint import read_meta
from prodcat.cli import app
from prodcat.config import DemoConfig, EvalConfig, ExtractConfig, IngestConfig, ServeConfig, TrainConfig, save_config
from prodcat.data.images import decode_image
from prodcat.errors import UserError, describe
from prodcat.predict.aggregation import aggregate_products
from prodcat.predict.predictor import Predictor
from prodcat.predict.run import EXTRACT_FILE, TWIN_TABLE, RunError, load_run
from prodcat.serve.app import create_app
from prodcat.train.loop import train
from product_fixtures import STORE, make_product_workdir


# -- a tiny run on cached features (no backbone): fast unit tests ---------------------------------------------------
def _train_arrays(root: Path, name: str = "linear", **overrides: Any) -> Path:
    settings: dict[str, Any] = dict(workdir=str(root), store=STORE, head="linear", loss="softmax", lr=0.05,
                                    warmup_steps=0, epochs=3, batch_size=16, eval_every=20, device="cpu",
                                    dropout=0.0, run_name=name)  # fmt: skip
    settings.update(overrides)
    return train(TrainConfig(**settings))


@pytest.fixture(scope="module")
def array_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("arrays") / "W"
    make_product_workdir(root, products=90)
    return _train_arrays(root)


def _val_products(run: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Features of the val pictures of the run's store, their product index and the number of products."""
    from prodcat.features.loaders import product_sorted_rows
    from prodcat.features.store import FeatureStore

    store = FeatureStore.open(load_run(run).store_path)
    rows, product_id, starts = product_sorted_rows(store, "val")
    product_index = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(rows)]))
    return store.read(rows), product_index, len(starts)


def test_load_reads_everything_from_the_run_folder(array_run: Path) -> None:
    predictor = Predictor.load(array_run)
    run = predictor.run
    assert run is not None and run.self_contained and run.path == array_run
    assert (run.store_name, run.train_config.head, predictor.taxonomy.num_classes) == (STORE, "linear", 6)
    assert predictor.extract_config.backbone == "arrays" and Path(predictor.extract_config.workdir).is_absolute()
    assert run.extraction["backbone"] == "arrays" and run.extraction["feature_shape"] == [16]
    assert (predictor.aggregation, predictor.accept_threshold, predictor.twin_choice) == ("mean_prob", None, None)
    assert run.metrics == {} and run.summary["run"] == "linear"  # not evaluated yet: the Predictor's defaults


def test_scores_are_the_top_k_in_order_and_sum_to_at_most_one(array_run: Path) -> None:
    predictor = Predictor.load(array_run)
    features, _, _ = _val_products(array_run)
    log_probs = predictor.log_probs_from_features(features[:20])
    np.testing.assert_allclose(np.exp(log_probs).sum(axis=1), 1.0, rtol=1e-5)
    for row, scores in enumerate(predictor.scores(log_probs, top_k=3)):
        probabilities = [score.probability for score in scores]
        assert len(scores) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
        assert [score.label for score in scores] == np.argsort(-log_probs[row])[:3].tolist()
        assert scores[0].category_id == int(predictor.taxonomy.category_ids[scores[0].label])
    assert len(predictor.scores(log_probs[:1], top_k=50)[0]) == 6  # never more than the categories


def test_the_aggregation_chosen_on_val_is_the_one_used(array_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(array_run, tmp_path / "linear"))
    features, product_index, products = _val_products(array_run)
    plain = Predictor.load(run)
    picture_log_probs = plain.log_probs_from_features(features)
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"product": {"aggregation": "vote"},
                                                           "confidence": {"threshold": 0.4}}))  # fmt: skip
    predictor = Predictor.load(run)
    assert (predictor.aggregation, predictor.accept_threshold) == ("vote", 0.4)
    chosen = predictor.product_log_probs_from_features(features, product_index, products)
    np.testing.assert_allclose(chosen, aggregate_products(picture_log_probs, product_index, products, "vote"))
    mean = aggregate_products(picture_log_probs, product_index, products, "mean_prob")
    assert not np.allclose(chosen, mean)  # the choice changes the numbers: the test can fail


def test_bad_run_folders_are_one_line_errors(array_run: Path, tmp_path: Path) -> None:
    def message(error: BaseException) -> str:
        line = describe(error)
        assert line is not None and "\n" not in line
        return line

    with pytest.raises(UserError) as caught:
        Predictor.load(tmp_path / "nowhere")
    assert "no such run folder" in message(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as caught:
        load_run(tmp_path / "empty")
    assert "not a run folder" in message(caught.value)
    run = Path(shutil.copytree(array_run, tmp_path / "broken"))
    (run / EXTRACT_FILE).write_text("{ not json")
    with pytest.raises(RunError) as caught:
        Predictor.load(run)
    assert f"{run / EXTRACT_FILE}: unreadable" in message(caught.value)
    (run / EXTRACT_FILE).write_text(json.dumps({"format": 1, "config": {"features": "nope"}}))
    with pytest.raises(RunError, match="invalid extraction config"):
        Predictor.load(run)
    bson_file = tmp_path / "test.bson"
    bson_file.write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--bson", str(bson_file)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and EXTRACT_FILE in errors[0], result.output
    (run / EXTRACT_FILE).unlink()
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("[1, 2")
    with pytest.raises(RunError, match="metrics.json: unreadable"):
        Predictor.load(run)


def test_training_keeps_absolute_paths_and_the_extraction_config(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_product_workdir(tmp_path / "W", products=40)
    store_config = tmp_path / "W" / "features" / STORE / "config.json"
    save_config(ExtractConfig(workdir="W", backbone="arrays", store_name=STORE, random_init=True), store_config)
    run = _train_arrays(Path("W"), max_steps=2)  # a relative workdir, as `make demo` passes it
    assert not run.is_absolute()
    workdir = str(tmp_path / "W")
    assert json.loads((run / "config.json").read_text())["workdir"] == workdir
    extraction = json.loads((run / EXTRACT_FILE).read_text())
    assert extraction["config"]["workdir"] == workdir and extraction["store"] == str(
        tmp_path / "W" / "features" / STORE
    )
    assert extraction["manifest"]["kind"] == "pooled" and extraction["manifest"]["feature_shape"] == [16]
    meta = read_meta(run, "best")
    assert meta["config"]["workdir"] == workdir and "optimizer" not in meta  # config["optimizer"] says it once
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    predictor = Predictor.load(tmp_path / run)
    assert predictor.run.store_path == tmp_path / "W" / "features" / STORE


def test_a_run_from_before_extract_json_reads_its_workdir_with_a_warning(
    array_run: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    workdir = array_run.parent.parent
    old = Path(shutil.copytree(array_run, workdir / "runs" / "old"))
    try:
        (old / EXTRACT_FILE).unlink()
        config = json.loads((old / "config.json").read_text())
        (old / "config.json").write_text(json.dumps({**config, "workdir": "W"}))  # relative to a cwd long gone
        monkeypatch.chdir(tmp_path)
        with caplog.at_level("WARNING", logger="prodcat"):
            predictor = Predictor.load(old)
        assert "no extract.json" in caplog.text and "workdir 'W' holds no feature store" in caplog.text
        assert predictor.run.workdir == workdir and not predictor.run.self_contained
        assert predictor.extract_config.backbone == "arrays" and Path(predictor.extract_config.workdir) == workdir
        features, _, _ = _val_products(array_run)
        expected = Predictor.load(array_run).log_probs_from_features(features)
        np.testing.assert_array_equal(predictor.log_probs_from_features(features), expected)
    finally:
        shutil.rmtree(old)


# -- a real tiny pipeline (pictures, a backbone, twins): the copied run --------------------------------------------
@pytest.fixture(scope="module")
def pictures_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo pictures -> ingest -> extract (test backbone, random weights) -> train -> evaluate (choices on val)."""
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo
    from prodcat.evaluate.evaluation import evaluate
    from prodcat.features.extract import extract

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("pictures")
    data, workdir = root / "data", root / "W"
    generate_demo(data, DemoConfig(products=48, test_products=4, categories=4, seed=2, image_size=64))
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.25, holdout_fraction=0.25))
    extract(ExtractConfig(workdir=str(workdir), backbone="test_efficientnet", random_init=True, batch_size=32,
                          workers=0, precision="float32"))  # fmt: skip
    run = train(TrainConfig(workdir=str(workdir), store="test_efficientnet-pooled", max_steps=4, batch_size=16,
                            eval_every=2, warmup_steps=1, run_name="tiny"))  # fmt: skip
    evaluate(EvalConfig(run=str(run), bootstrap_resamples=20))
    return {"root": root, "data": data, "workdir": workdir, "run": run}


def _documents(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as handle:
        return list(bson.decode_file_iter(handle))


def _query(pictures_run: dict[str, Path]) -> tuple[Path, list[bytes]]:
    """A BSON file (the test products, and one showing a training product's picture: a twin) and its photos."""
    from prodcat.data.catalog import load_catalog

    in_train = set(load_catalog(pictures_run["workdir"], "train", split="train")["product_id"].to_pylist())
    twin = next(doc for doc in _documents(pictures_run["data"] / "train.bson") if doc["_id"] in in_train)
    documents = [*_documents(pictures_run["data"] / "test.bson"), {"_id": 1, "imgs": twin["imgs"][:1]}]
    query = pictures_run["root"] / "query.bson"
    query.write_bytes(b"".join(bson.encode(doc) for doc in documents))
    return query, [bytes(doc["imgs"][0]["picture"]) for doc in documents]


def _predict_cli(run: Path, query: Path, out: Path) -> str:
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--bson", str(query), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text()


def _serve(run: Path, photos: list[bytes]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What the server answers for each photo alone and for all of them as one product; its /health model block."""
    keys = ("top", "images", "accepted", "threshold", "aggregation", "training_matches")  # not the timings
    products = [[photo] for photo in photos] + [photos[:4]]
    answers = []
    with TestClient(create_app(Predictor.load(run), ServeConfig(run=str(run), batch_window_ms=1.0))) as client:
        for product in products:
            files = [("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(product)]
            response = client.post("/v1/classify", files=files)
            assert response.status_code == 200, response.text
            answers.append({key: response.json()[key] for key in keys})
        model = client.get("/health").json()["model"]
    return answers, model


@pytest.fixture
def moved_workdir(pictures_run: dict[str, Path]) -> Iterator[Path]:
    """The run copied elsewhere, then the workdir moved away (back afterwards, for the other tests)."""
    copy = Path(shutil.copytree(pictures_run["run"], pictures_run["root"] / "elsewhere" / "tiny"))
    away = pictures_run["workdir"].rename(pictures_run["root"] / "W-moved")
    try:
        yield copy
    finally:
        away.rename(pictures_run["workdir"])
        shutil.rmtree(copy.parent)


def test_a_copied_run_predicts_and_serves_as_the_original_without_its_workdir(
    pictures_run: dict[str, Path], tmp_path: Path, monkeypatch, request: pytest.FixtureRequest
) -> None:
    run = pictures_run["run"]
    assert (run / EXTRACT_FILE).is_file() and (run / TWIN_TABLE).is_file() and (run / "eval" / "twins.json").is_file()
    query, photos = _query(pictures_run)
    submission = _predict_cli(run, query, tmp_path / "original.csv")
    answers, model = _serve(run, photos)
    assert answers[len(photos) - 1]["training_matches"] is not None  # the twin photo: the index is in use
    assert model["evaluation"] is not None and model["aggregation"] == load_run(run).metrics["product"]["aggregation"]

    copy = request.getfixturevalue("moved_workdir")
    assert not pictures_run["workdir"].exists()  # nothing of the workdir is left to read
    (tmp_path / "somewhere").mkdir()
    monkeypatch.chdir(tmp_path / "somewhere")
    assert _predict_cli(copy, query, tmp_path / "copy.csv") == submission
    assert _serve(copy, photos) == (answers, model)


def test_predict_products_follows_the_run_choices_and_orders_the_top_k(pictures_run: dict[str, Path]) -> None:
    predictor = Predictor.load(pictures_run["run"])
    metrics = predictor.run.metrics
    assert predictor.aggregation == metrics["product"]["aggregation"]  # chosen by evaluate on val
    assert predictor.accept_threshold == metrics["confidence"]["threshold"]
    assert predictor.calibration.temperature == pytest.approx(metrics["calibration"]["temperature"])
    assert predictor.twin_choice is not None and predictor.twin_choice.name == predictor.run.choices.twins["name"]
    _, photos = _query(pictures_run)
    products = [[decode_image(photo) for photo in photos[:3]], [decode_image(photos[3])]]
    for prediction in predictor.predict_products(products, top_k=3):
        probabilities = [score.probability for score in prediction.top]
        assert len(prediction.top) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0.0 < sum(probabilities) <= 1.0 + 1e-6
        assert prediction.aggregation == predictor.aggregation
        assert all(
            len(scores) == 3 and sum(s.probability for s in scores) <= 1.0 + 1e-6 for scores in prediction.images
        )
    assert [len(p.images) for p in predictor.predict_products(products, top_k=2)] == [3, 1]
