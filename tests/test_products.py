"""Product-level data and training: rows grouped by product, a product head trained, evaluated and predicted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from prodcat.features.products import PAD, ProductLoader, group_index, group_products
from prodcat.predict.predictor import PRODUCT_HEAD, Predictor
from product_fixtures import make_product_workdir, product_config

torch.set_num_threads(2)


def test_group_index_brute_force() -> None:
    product_index = np.array([2, 0, 2, 1, 2, 0])
    slots = group_index(product_index, 4)
    assert slots.shape == (4, 3)
    for product in range(4):
        expected = np.flatnonzero(product_index == product).tolist()
        assert slots[product][slots[product] != PAD].tolist() == expected
    assert (slots[3] == PAD).all()


def test_product_loader_groups_rows_by_product(tmp_path: Path) -> None:
    _, store, _ = make_product_workdir(tmp_path, products=40)
    rows = store.split_indices("train")
    groups = group_products(store, rows)
    product_id, image_index, label = (store.column(c) for c in ("product_id", "image_index", "label"))
    assert list(groups.product_id) == sorted(set(product_id[rows].tolist()))
    for p, pid in enumerate(groups.product_id):
        expected = rows[product_id[rows] == pid]
        expected = expected[np.argsort(image_index[expected])]
        assert groups.slots[p][groups.mask[p]].tolist() == expected.tolist()
        assert groups.label[p] == label[expected[0]]
    assert groups.mask.sum() == len(rows) and groups.slots.shape[1] == 4
    for limit in (1e9, 0.0):  # resident and streamed give the same batches
        loader = ProductLoader(store, rows, torch.device("cpu"), limit, workers=1)
        assert loader.in_memory == (limit > 0) and len(loader) == len(groups)
        where = np.array([0, 3, 5])
        features, targets = next(loader.batches([where]))
        assert features.shape == (3, 4, store.feature_shape[0]) and features.dtype == torch.float16
        torch.testing.assert_close(targets["mask"], torch.from_numpy(groups.mask[where]))
        for i, p in enumerate(where):
            picked = groups.slots[p][groups.mask[p]]
            torch.testing.assert_close(features[i, : len(picked)], torch.from_numpy(store.read(picked, np.float16)))
            assert (features[i, len(picked) :] == 0).all()
            assert int(targets["leaf"][i]) == groups.label[p]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from prodcat.train.loop import train

    root = tmp_path_factory.mktemp("products")
    make_product_workdir(root)
    run = train(product_config(root))
    return {"root": root, "run": run}


def test_product_head_trains_on_products(trained: dict) -> None:
    from prodcat.train.loop import read_metrics, run_summary

    summary = run_summary(trained["run"])
    products = 150 * 3 // 5
    assert summary["total_steps"] == 6 * -(-products // 16)  # steps count products, not pictures
    assert read_metrics(trained["run"])[-1]["val_rows"] == 30  # val top-1 is over val products
    assert summary["final"]["val_top1"] > 0.8


def test_predictor_product_prediction_ignores_picture_order(trained: dict) -> None:
    predictor = Predictor.load(trained["run"])
    assert predictor.reads_products and predictor.aggregation == PRODUCT_HEAD
    rng = np.random.default_rng(0)
    features = rng.normal(size=(9, 16)).astype(np.float32) * 2
    product_index = np.array([0, 0, 0, 0, 1, 2, 2, 1, 2])
    expected = predictor.product_log_probs_from_features(features, product_index, 3)
    order = rng.permutation(9)
    np.testing.assert_allclose(
        predictor.product_log_probs_from_features(features[order], product_index[order], 3), expected, atol=1e-5
    )
    # predict_products: the same top category whatever the order of a product's pictures
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(4)]
    table = {int(image[0, 0, 0]): features[i] for i, image in enumerate(images)}
    predictor.image_features = lambda batch, batch_size=64: np.stack([table[int(im[0, 0, 0])] for im in batch])
    first = predictor.predict_product(images)
    second = predictor.predict_product(images[::-1])
    assert first.top[0].category_id == second.top[0].category_id
    assert first.top[0].probability == pytest.approx(second.top[0].probability, abs=1e-5)
    assert first.aggregation == PRODUCT_HEAD and len(first.images) == 4


def test_evaluate_reports_the_product_head(trained: dict) -> None:
    from prodcat.config import EvalConfig
    from prodcat.evaluate.evaluation import evaluate

    metrics = evaluate(EvalConfig(run=str(trained["run"]), split="holdout"))
    methods = metrics["product"]["methods"]
    assert set(methods) == {"mean_prob", "mean_logprob", "vote", PRODUCT_HEAD}
    assert metrics["product"]["n"] == 30 and 0.0 <= methods[PRODUCT_HEAD]["top1"] <= 1.0
    assert metrics["selection"]["aggregation"] in methods
