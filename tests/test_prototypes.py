"""New categories without retraining: prototypes against an explicit class mean, the combined output, the val rule
for scale and bias, and add-category -> predict (CLI and library; the backbone is replaced by a fixed lookup)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from prodcat.predict.predictor import Predictor
from prodcat.predict.prototypes import (
    Prototypes,
    add_category,
    class_mean,
    embed,
    fit_scale_bias,
    read_example_products,
)
from product_fixtures import CLASSES, DIM, make_product_workdir, product_config

torch.set_num_threads(2)
NEW_ID = 424242


def test_class_mean_matches_an_explicit_mean() -> None:
    rng = np.random.default_rng(0)
    center = rng.normal(size=5)
    products = [rng.normal(size=(n, 5)) + 3 for n in (1, 4, 2)]
    by_hand = []
    for pictures in products:
        units = [(x - center) / np.sqrt(((x - center) ** 2).sum()) for x in pictures]
        by_hand.append(sum(units) / len(units))
    mean = sum(by_hand) / len(by_hand)
    np.testing.assert_allclose(class_mean(products, center), mean / np.sqrt((mean**2).sum()), rtol=1e-5)
    spatial = rng.normal(size=(3, 2, 2, 5))  # spatial maps are average-pooled first
    np.testing.assert_allclose(embed(spatial, center), embed(spatial.mean(axis=(1, 2)), center), rtol=1e-5)


def test_combine_normalises_and_replaces_columns() -> None:
    vectors = np.eye(3, 4, dtype=np.float32)[:2]
    categories = [{"category_id": 1, "label": 5, "names": ["a", "b", "c"]},  # new: after the 4 head columns
                  {"category_id": 2, "label": 1, "names": ["a", "b", "d"]}]  # fmt: skip
    prototypes = Prototypes(vectors, np.zeros(4, np.float32), categories, scale=3.0, bias=-1.0)
    head = np.log(np.full((2, 4), 0.25))
    features = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]], np.float32)
    scores = prototypes.scores(features)
    np.testing.assert_allclose(scores, [[2.0, -1.0], [-1.0, 2.0]], rtol=1e-6)
    out = prototypes.combine(head, scores)
    assert out.shape == (2, 6) and np.all(np.isneginf(out[:, 4]))  # label 4: no category
    np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-5)
    logits = np.array([np.log(0.25), -1.0, np.log(0.25), np.log(0.25), -np.inf, 2.0])  # row 0 by hand
    np.testing.assert_allclose(out[0], logits - np.log(np.exp(logits).sum()), rtol=1e-5)


def test_fit_scale_bias_separates_a_hidden_leaf() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    directions = np.eye(3, 6)
    embeddings = directions[labels] + rng.normal(size=(60, 6)) * 0.1
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    log_probs = np.log(np.full((60, 3), 0.1) + 0.7 * np.eye(3)[labels])
    scale, bias, nll, accuracy = fit_scale_bias(log_probs, embeddings, labels, {k: directions[k] for k in range(3)})
    assert accuracy > 0.95 and nll < 0.2  # each hidden leaf is found again, the others stay correct
    # the separation is sharp: a large scale wins, the bias stays inside its grid
    assert scale >= 5.0 and -scale - 10.0 <= bias <= scale + 2.0


class _Lookup:
    """Stands in for the backbone: a picture's red value picks its feature (>= 200: the new category)."""

    def __init__(self, centres: np.ndarray, new_centre: np.ndarray) -> None:
        self.centres, self.new_centre = centres, new_centre

    def __call__(self, images: list[torch.Tensor], batch_size: int = 64) -> np.ndarray:
        out = []
        for image in images:
            value = int(image[0, 0, 0])
            centre = self.new_centre if value >= 200 else self.centres[value % CLASSES]
            out.append(centre + np.random.default_rng(value).normal(size=DIM) * 0.3)
        return np.array(out, np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from prodcat.train.loop import train

    root = tmp_path_factory.mktemp("protos")
    _, _, centres = make_product_workdir(root, products=120)
    new_centre = np.random.default_rng(5).normal(size=DIM) * 1.5
    return {"root": root, "run": train(product_config(root, head="linear")), "lookup": _Lookup(centres, new_centre)}


def _picture(value: int) -> torch.Tensor:
    return torch.full((3, 8, 8), value, dtype=torch.uint8)


def test_add_category_then_predict_returns_the_new_leaf(run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Predictor, "image_features", lambda self, images, batch_size=64: run["lookup"](images))
    predictor = Predictor.load(run["run"])  # loaded before the category exists, like a running server
    assert predictor.predict_product([_picture(3)]).top[0].category_id == 7003
    products = [[_picture(200 + 2 * i), _picture(201 + 2 * i)] for i in range(5)]
    entry = add_category(run["run"], NEW_ID, ["Maison", "Jardin", "Nain de jardin"], products, predictor=predictor)
    assert entry["label"] == CLASSES and entry["products"] == 5 and entry["pictures"] == 10
    assert entry["chosen_by"].startswith("val episodes")
    top = predictor.predict_product([_picture(230)]).top[0]  # an unseen picture of the new leaf
    assert (top.category_id, top.level3, top.label) == (NEW_ID, "Nain de jardin", CLASSES)
    for value in range(CLASSES):  # the known leaves still win on their own pictures
        assert predictor.predict_product([_picture(value)]).top[0].category_id == 7000 + value
    with pytest.raises(ValueError, match="already in the run's taxonomy"):
        add_category(run["run"], 7001, ["a", "b", "c"], products, predictor=predictor)


def test_cli_add_category_from_a_folder(run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prodcat.cli import app

    monkeypatch.setattr(Predictor, "image_features", lambda self, images, batch_size=64: run["lookup"](images))
    folder = tmp_path / "examples"
    (folder / "product-a").mkdir(parents=True)
    for name, value in (("one.png", 240), ("two.jpg", 242), ("product-a/x.png", 244), ("product-a/y.png", 246)):
        Image.new("RGB", (8, 8), (value, value, value)).save(folder / name, quality=100)
    (folder / "notes.txt").write_text("not a picture")
    assert [len(p) for p in read_example_products(pictures=folder)] == [1, 2, 1]
    result = CliRunner().invoke(app, ["add-category", "--run", str(run["run"]), "--category-id", "555",
                                      "--names", "A|B|C", "--pictures", str(folder)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "category 555 (A > B > C)" in result.output
    predictor = Predictor.load(run["run"])
    assert 555 in [c["category_id"] for c in predictor.prototypes.categories]
    bad = CliRunner().invoke(app, ["add-category", "--run", str(run["run"]), "--category-id", "556",
                                   "--names", "A|B", "--pictures", str(folder)])  # fmt: skip
    assert bad.exit_code == 2 and "three non-empty names" in bad.output


def test_read_example_products_from_bson(tmp_path: Path, write_bson) -> None:
    import io

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, format="PNG")
        return buffer.getvalue()

    docs = [
        {"_id": 1, "imgs": [{"picture": png(210)}, {"picture": png(212)}]},
        {"_id": 2, "imgs": [{"picture": png(9)}]},
    ]
    write_bson(tmp_path / "examples.bson", docs)
    products = read_example_products(bson=tmp_path / "examples.bson")
    assert [[int(p[0, 0, 0]) for p in product] for product in products] == [[210, 212], [9]]
    write_bson(tmp_path / "bad.bson", [{"_id": 3, "imgs": [{"picture": b"not a picture"}]}])
    with pytest.raises(ValueError, match="product 3: cannot decode"):
        read_example_products(bson=tmp_path / "bad.bson")
    with pytest.raises(ValueError, match="one of them"):
        read_example_products()
