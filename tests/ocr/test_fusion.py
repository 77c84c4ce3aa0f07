"""Text + picture fusion: the heads train on tiny data, the late weight and the fused calibration come from val, the
Predictor and the server use a run's text model (the OCR parts skip without Tesseract)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from prodcat.config import EvalConfig, TrainConfig
from prodcat.data.synthetic.covers import COVER_LEAVES, render_cover_product
from prodcat.data.taxonomy import Taxonomy
from prodcat.paths import WorkPaths
from prodcat.train.text_fusion import FusionConfig, choose_late_weight, late_fuse, load_text_model, train_text_model
from prodcat.utils import write_parquet
from store_fixtures import write_labelled_store

STORE = "toy"
# Two departments of cover leaves (alike in picture within a department) and two ordinary leaves.
LEAVES = [COVER_LEAVES[0], COVER_LEAVES[4], COVER_LEAVES[1], COVER_LEAVES[6]]
ROWS = [(7000 + k, leaf.level1, leaf.level2, leaf.level3) for k, leaf in enumerate(LEAVES)]
ROWS += [(7004, "MAISON", "DECORATION", "VASE"), (7005, "MAISON", "LUMINAIRE", "LAMPE")]


def _tesseract():
    from prodcat.ocr.engine import EngineUnavailable, create_engine

    try:
        return create_engine("tesseract")
    except EngineUnavailable as error:
        pytest.skip(str(error))


def _build(root: Path, products: int = 240, dim: int = 8) -> Taxonomy:
    """Store of one picture per product: cover leaves share their department's centre (the picture cannot tell
    them apart); W/ocr/words.parquet holds two of each cover product's leaf words."""
    rng = np.random.default_rng(0)
    leaf = np.arange(products) % len(ROWS)
    split = np.array(["train", "train", "train", "val", "holdout"])[np.arange(products) // len(ROWS) % 5]
    counts = {row[0]: int(((leaf == k) & (split == "train")).sum()) for k, row in enumerate(ROWS)}
    taxonomy = Taxonomy.from_rows(ROWS, counts)
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    label = taxonomy.labels_of(np.array([ROWS[k][0] for k in leaf]))
    centre_of = np.array([0, 0, 1, 1, 2, 3])  # department (covers) or leaf (ordinary)
    centres = rng.normal(size=(4, dim)) * 3
    features = (centres[centre_of[leaf]] + rng.normal(size=(products, dim))).astype(np.float32)
    ids = np.arange(products) + 100
    write_labelled_store(root, taxonomy, features, product_id=ids, image_index=np.zeros(products), label=label,
                         split=split, store=STORE)  # fmt: skip
    words: dict[str, list] = {k: [] for k in ("product_id", "image_index", "word_index", "word", "confidence")}
    for product, k in zip(ids, leaf, strict=True):
        if k < len(LEAVES):
            for number, word in enumerate(rng.choice(LEAVES[k].words, size=2, replace=False)):
                for key, value in zip(words, (product, 0, number, str(word), 0.9), strict=True):
                    words[key].append(value)
    write_parquet(root / "ocr" / "words.parquet", pa.table(words))
    return taxonomy


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """train -> evaluate (picture calibration chosen on val) -> text-head, as the pipeline runs them."""
    from prodcat.evaluate.evaluation import evaluate
    from prodcat.train.loop import train

    root = tmp_path_factory.mktemp("fusion")
    _build(root)
    run = train(TrainConfig(workdir=str(root), store=STORE, head="linear", loss="softmax", lr=0.05, epochs=12,
                            batch_size=32, eval_every=40, device="cpu", run_name="pictures"))  # fmt: skip
    metrics = evaluate(EvalConfig(run=str(run), target_accuracy=0.8, bootstrap_resamples=0))
    summary = train_text_model(FusionConfig(run=str(run), epochs=15, n_features=512, lr=0.05))
    return {"root": root, "run": Path(run), "summary": summary, "metrics": metrics}


def test_both_fusions_beat_pictures_on_the_cover_leaves(fusion_run: dict) -> None:
    summary = fusion_run["summary"]
    held = summary["holdout"]
    picture = held["picture"]["text_leaves"]["top1"]
    assert held["picture"]["text_leaves"]["n"] == 32 and picture < 0.8  # the picture confuses sibling covers
    for kind in ("late", "concat"):
        assert held[kind]["text_leaves"]["top1"] >= 0.9 > picture, kind
    assert summary["late_weight"] > 0  # chosen on val
    assert summary["kept"] in ("late", "concat") and summary["chosen_on"] == "val"
    assert (fusion_run["run"] / "text" / "fusion.json").is_file()


def test_text_model_loads_checked_and_reruns_need_overwrite(fusion_run: dict) -> None:
    model = load_text_model(fusion_run["run"])
    assert model is not None and model.kind == fusion_run["summary"]["kept"]
    assert load_text_model(fusion_run["root"]) is None  # no text/ there
    from prodcat.config import ConfigError

    with pytest.raises(ConfigError, match="--overwrite"):
        train_text_model(FusionConfig(run=str(fusion_run["run"])))


def test_fused_calibration_is_chosen_on_val_and_kept_with_the_text_model(fusion_run: dict) -> None:
    from prodcat.checkpoint import read_meta
    from prodcat.predict.predictor import Predictor

    summary, metrics = fusion_run["summary"], fusion_run["metrics"]
    chosen = summary["calibration"]
    assert chosen["fitted_on"] == "val" and chosen["n"] == summary["val"]["picture"]["all"]["n"] == 48
    assert chosen["settings"].endswith("eval/config.json") and chosen["confidence"]["target_accuracy"] == 0.8
    held = chosen["holdout"]
    assert held["split"] == "holdout" and held["n"] == summary["holdout"]["picture"]["all"]["n"] == 48
    assert held["after"]["ece"] <= held["before"]["ece"]  # fitted on these scores' val twin, not the pictures'
    assert held["before"]["threshold"] == metrics["confidence"]["threshold"]
    sidecar = read_meta(fusion_run["run"] / "text", "best")["calibration"]
    assert sidecar["temperature"] == chosen["temperature"] != metrics["calibration"]["temperature"]
    assert sidecar["threshold"] == chosen["confidence"]["threshold"] and len(sidecar["prior_counts"]) == len(ROWS)
    predictor = Predictor.load(fusion_run["run"])
    assert predictor.calibration.temperature == sidecar["temperature"]
    assert predictor.accept_threshold == sidecar["threshold"]
    predictor.text_model = None  # pictures alone: evaluate's calibration again
    assert predictor.calibration.temperature == metrics["calibration"]["temperature"]
    assert predictor.accept_threshold == metrics["confidence"]["threshold"]


def test_predictor_applies_the_text_model_calibration_to_fused_scores(
    fusion_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prodcat.predict.calibration import ProductCalibration, apply_temperature

    predictor = _predictor_on_centre(fusion_run, monkeypatch)
    model = predictor.text_model
    words = list(LEAVES[1].words[:2])
    monkeypatch.setattr(model, "read", lambda images: [words for _ in images])  # no Tesseract needed
    monkeypatch.setattr(model, "calibration", ProductCalibration(0.0, None, 3.0))  # far from evaluate's T
    monkeypatch.setattr(model, "accept_threshold", 0.01)
    prediction = predictor.predict_product([_cover_tensor(1, 0)[0]], top_k=2)
    features = predictor.image_features([None])
    fused = model.fuse(predictor.log_probs_from_features(features), features, [" ".join(words)])
    assert prediction.top[0].probability == pytest.approx(np.exp(apply_temperature(fused, 3.0).max()), rel=1e-5)
    assert prediction.threshold == 0.01 and prediction.accepted and prediction.ocr_words == [words]
    as_before = apply_temperature(fused, fusion_run["metrics"]["calibration"]["temperature"])
    assert prediction.top[0].probability != pytest.approx(np.exp(as_before.max()), rel=1e-3)  # not the picture T


def test_late_weight_is_the_best_on_val_and_ties_go_to_the_smaller() -> None:
    picture = np.log(np.array([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1]]))
    text = np.log(np.array([[0.2, 0.8], [0.45, 0.55], [0.5, 0.5]]))
    has_text = np.array([True, True, False])
    weight, scores = choose_late_weight(picture, text, has_text, np.array([1, 1, 0]), (0.0, 1.0, 2.0, 5.0))
    assert weight == 5.0 and scores[5.0] == 1.0 and scores[0.0] < 1.0  # the second product needs a large weight
    weight, _ = choose_late_weight(picture, text, has_text, np.array([1, 0, 0]), (0.0, 1.0, 2.0))
    assert weight == 1.0  # 1 and 2 both get all three right
    fused = late_fuse(picture, text, has_text, 1.0)
    assert np.allclose(np.exp(fused).sum(1), 1) and np.allclose(fused[2], picture[2])  # no words: pictures alone


def _cover_tensor(leaf_index: int, seed: int) -> tuple[torch.Tensor, bytes]:
    jpeg = render_cover_product(LEAVES[leaf_index], np.random.default_rng(seed), 1)[0]
    array = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), jpeg


def _predictor_on_centre(fusion_run: dict, monkeypatch: pytest.MonkeyPatch):
    """The run's Predictor whose backbone always sees the LIBRAIRIE department's centre (no backbone built)."""
    from prodcat.features.store import FeatureStore
    from prodcat.predict.predictor import Predictor

    predictor = Predictor.load(fusion_run["run"])
    store = FeatureStore.open(WorkPaths(fusion_run["root"]).feature_store(STORE))
    rows = np.flatnonzero(store.column("label") == predictor.taxonomy.labels_of(np.array([7000]))[0])
    centre = store.read(rows).mean(0, keepdims=True)
    monkeypatch.setattr(predictor, "image_features", lambda images, batch_size=64: np.repeat(centre, len(images), 0))
    return predictor


def test_predictor_with_text_model_follows_the_words(fusion_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _tesseract()
    predictor = _predictor_on_centre(fusion_run, monkeypatch)
    text_model, predictor.text_model = predictor.text_model, None
    picture_top = predictor.predict_product([_cover_tensor(0, 1)[0]]).top[0].level3
    assert picture_top in ("ROMAN POLICIER", "CUISINE DU MONDE")
    other = 1 if picture_top == "ROMAN POLICIER" else 0  # a cover whose words point to the other leaf
    predictor.text_model = text_model
    for seed in range(3):
        prediction = predictor.predict_product([_cover_tensor(other, seed)[0]])
        read = {word.casefold() for word in prediction.ocr_words[0]}
        assert read & {word.casefold() for word in LEAVES[other].words}, prediction.ocr_words
        assert prediction.top[0].level3 == LEAVES[other].level3 != picture_top


def test_serve_answers_with_the_words_read(fusion_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _tesseract()
    from fastapi.testclient import TestClient

    from prodcat.config import ServeConfig
    from prodcat.serve.app import create_app

    predictor = _predictor_on_centre(fusion_run, monkeypatch)
    _, jpeg = _cover_tensor(1, 7)
    with TestClient(create_app(predictor, ServeConfig(batch_window_ms=1.0))) as client:
        body = client.post("/v1/classify", files=[("images", ("cover.jpg", jpeg, "image/jpeg"))]).json()
        assert client.get("/health").json()["model"]["text_model"] in ("late", "concat")
    assert len(body["ocr_words"]) == 1 and body["ocr_words"][0], body
    assert body["top"][0]["level3"] == "CUISINE DU MONDE"


def test_report_section_shows_the_fusion_table_and_examples(fusion_run: dict) -> None:
    from prodcat.report.ocr import fusion_rows, ocr_section

    section = ocr_section(fusion_run["root"], words_right=fusion_run["root"] / "absent.json")
    assert section.id == "ocr" and section.available
    assert "late fusion" in section.body and "± n/a" in section.body  # one seed: no spread to show
    assert "synthetic" in section.body and any(leaf.level3 in section.body for leaf in LEAVES)  # examples
    assert "their own calibration (served now)" in section.body and "on val's fused scores (n = 48)" in section.body
    rows = {row["arm"]: row for row in fusion_rows([fusion_run["summary"]] * 2)}
    assert rows["late"]["text_leaves"].endswith("± 0.000") and rows["late"]["text_leaves_n"] == 32
    empty = ocr_section(fusion_run["root"] / "nowhere", words_right=fusion_run["root"] / "absent.json")
    assert not empty.available and "prodcat text-head" in empty.body


def test_without_an_ocr_engine_the_text_model_reads_nothing(fusion_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from prodcat.ocr import engine
    from prodcat.ocr.engine import EngineUnavailable

    def missing(*args, **kwargs):
        raise EngineUnavailable("Tesseract language data fra not found; install it: apt-get install tesseract-ocr")

    monkeypatch.setattr(engine, "create_engine", missing)
    model = load_text_model(fusion_run["run"])
    cover, _ = _cover_tensor(0, 3)
    assert model.read([cover, cover]) == [[], []]  # said once in the log; predictions use the pictures alone
