"""Training twins (issue 10): the hash index, the deployed index holds train-split products only, override vs blend
chosen on val and reported on holdout, the Predictor and `predict_bson` using them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import xxhash

from prodcat.config import ExtractConfig
from prodcat.data.taxonomy import Taxonomy
from prodcat.features.store import write_store
from prodcat.paths import WorkPaths
from prodcat.predict.predictor import Predictor
from prodcat.predict.twins import (
    TwinChoice,
    TwinIndex,
    Votes,
    apply_twins,
    choose_twins,
    digest_words,
    load_twin_choice,
    twin_effect,
    twin_predictions,
)

CLASSES = 3
ROWS = [(7000 + c, f"L1 {c}", f"L2 {c}", f"leaf {c}") for c in range(CLASSES)]


def _words(*keys: str) -> np.ndarray:
    return digest_words([xxhash.xxh3_128_digest(key.encode()) for key in keys])


def test_index_votes_count_products_per_picture_and_leave_one_out() -> None:
    # Picture "a": products 1 (label 0), 2 (label 0), 3 (label 2); "b": product 4 (label 1), twice in product 4.
    index = TwinIndex(_words("a", "a", "a", "b", "b"), np.array([1, 2, 3, 4, 4]), np.array([0, 0, 2, 1, 1]))
    assert len(index) == 2
    assert index.find(_words("b", "zzz", "a")).tolist()[1] == -1
    votes = index.votes(np.array([0, 0, 1]), _words("a", "a", "zzz"))  # a picture repeated in a product votes once
    assert votes.product.tolist() == [0, 0] and votes.label.tolist() == [0, 2] and votes.count.tolist() == [2, 1]
    own = index.votes(np.array([0]), _words("a"), own_label=np.array([0]))  # query = product 1 itself
    assert own.label.tolist() == [0, 2] and own.count.tolist() == [1, 1]
    match = index.match(_words("a", "new", "b"), "none")
    assert match is not None and match.pictures_matched == 2 and match.products == 4 and match.images == [0, 2]
    assert index.match(_words("new"), "none") is None


def test_override_takes_the_twins_majority_and_blend_shifts_the_model() -> None:
    log_probs = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))
    votes = Votes(np.array([0, 0]), np.array([1, 2]), np.array([2.0, 1.0]))  # product 0: twins say 1 (2 votes), 2
    override = apply_twins(log_probs, votes, TwinChoice("override"))
    assert override[0].argmax() == 1 and np.isclose(np.exp(override[0]).sum(), 1)
    np.testing.assert_array_equal(override[1], log_probs[1])  # no twins: unchanged
    weak, strong = (apply_twins(log_probs, votes, TwinChoice("blend", w)) for w in (0.1, 4.0))
    assert weak[0].argmax() == 0 and strong[0].argmax() == 1
    assert apply_twins(log_probs, votes, TwinChoice()) is log_probs
    with pytest.raises(ValueError, match="weight"):
        TwinChoice("blend")


# -- a tiny run: products with pictures (named by a key), a one-hot "model" ------------------------------------------
def _workdir(root: Path, products: list[tuple[int, int, str, list[str], int]]) -> Predictor:
    """products: (product_id, label, split, picture keys, the class the model predicts for it)."""
    taxonomy = Taxonomy.from_rows(ROWS, {row[0]: 10 for row in ROWS})
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    paths.catalog.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.table(
            {
                "product_id": pa.array([p[0] for p in products], pa.int64()),
                "label": pa.array([p[1] for p in products], pa.int32()),
                "split": pa.array([p[2] for p in products]).dictionary_encode(),
            }
        ),
        paths.catalog_table("train"),
    )
    pictures = [(p[0], index, key) for p in products for index, key in enumerate(p[3])]
    pq.write_table(
        pa.table(
            {
                "source": pa.array(["train"] * len(pictures)),
                "product_id": pa.array([p[0] for p in pictures], pa.int64()),
                "image_index": pa.array([p[1] for p in pictures], pa.int16()),
                "hash": pa.array([xxhash.xxh3_128_digest(p[2].encode()) for p in pictures], pa.binary(16)),
                "offset": pa.array(np.arange(len(pictures)) * 100, pa.int64()),
                "length": pa.array([100] * len(pictures), pa.int32()),
            }
        ),
        paths.catalog / "pictures.parquet",
    )
    rows = [(p, index) for p in products for index in range(len(p[3]))]
    label = np.array([p[1] for p, _ in rows])
    features = np.eye(CLASSES, dtype=np.float32)[[p[4] for p, _ in rows]] * 5
    write_store(
        paths.feature_store("toy"), features, shard_size=8, product_id=np.array([p[0] for p, _ in rows]),
        image_index=np.array([i for _, i in rows]), label=label, level1=taxonomy.leaf_level1[label],
        level2=taxonomy.leaf_level2[label], split=np.array([p[2] for p, _ in rows]),
    )  # fmt: skip
    model = torch.nn.Sequential(torch.nn.Linear(CLASSES, CLASSES, bias=False), torch.nn.LogSoftmax(dim=1))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(CLASSES))
    config = ExtractConfig(workdir=str(root), backbone="test_efficientnet", random_init=True, precision="float32")
    return Predictor(model, taxonomy, config, {}, root / "runs" / "r", store_name="toy")


def _groups(split: str, start: int, twins_right: bool, count: int = 4) -> list[tuple[int, int, str, list[str], int]]:
    """`count` groups of 3 products sharing a stock photo, label 1; the model gets the first product of each wrong.
    With `twins_right` False the photo's other two holders carry label 2 instead (a photo shared across leaves)."""
    products = []
    for group in range(count):
        key = f"{split}-stock-{group}"
        pid = start + 10 * group
        products.append((pid, 1, split, [key, f"{split}-own-{pid}"], 0 if twins_right else 1))
        for k in (1, 2):
            products.append((pid + k, 1 if twins_right else 2, split, [key], 1 if twins_right else 2))
    return products


def _train_part() -> list[tuple[int, int, str, list[str], int]]:
    return [(1, 0, "train", ["t-a", "shared-tv"], 0), (2, 2, "train", ["t-b"], 2)]


def test_deployed_index_holds_train_split_products_only(tmp_path: Path) -> None:
    products = [*_train_part(), (500, 1, "val", ["shared-tv", "val-only"], 1), (600, 1, "holdout", ["ho-only"], 1)]
    _workdir(tmp_path, products)
    index = TwinIndex.from_workdir(tmp_path, ("train",))
    assert index is not None and len(index) == 3  # t-a, shared-tv, t-b: no val or holdout picture
    votes = index.votes(np.array([0, 0, 0]), _words("shared-tv", "val-only", "ho-only"))
    assert votes.label.tolist() == [0] and votes.count.tolist() == [1]  # the val holder of shared-tv is not there
    assert index.match(_words("val-only"), "none") is None


def test_choice_is_made_on_val_and_reported_on_holdout(tmp_path: Path) -> None:
    products = [*_train_part(), *_groups("val", 1000, twins_right=True), *_groups("holdout", 2000, twins_right=True)]
    predictor = _workdir(tmp_path, products)
    chosen = choose_twins(predictor, "val")
    assert chosen["selected_on"] == "val" and chosen["mode"] == "override"  # blend's weights cannot flip a 5-nat gap
    assert chosen["matched_products"] == 12 and chosen["top1"]["override"] > chosen["top1"]["none"]
    saved = json.loads((predictor.run_dir / "eval" / "twins.json").read_text())
    assert saved["name"] == "override" and load_twin_choice(predictor.run_dir) == TwinChoice("override")
    effect = twin_effect(predictor, "holdout")
    assert effect["products"] == 12 and effect["matched_products"] == 12
    assert effect["top1_without"] == pytest.approx(8 / 12) and effect["top1_with"] == pytest.approx(1.0)
    assert effect["gain_ci95"][0] < effect["gain"] < effect["gain_ci95"][1]


def test_misleading_twins_on_val_keep_none_whatever_holdout_says(tmp_path: Path) -> None:
    # Twins on val carry another leaf: using them would hurt, so none is kept, though they help on holdout.
    products = [*_train_part(), *_groups("val", 1000, twins_right=False), *_groups("holdout", 2000, twins_right=True)]
    predictor = _workdir(tmp_path, products)
    chosen = choose_twins(predictor, "val")
    assert chosen["mode"] == "none" and chosen["top1"]["override"] < chosen["top1"]["none"]
    results = twin_predictions(predictor, "holdout")
    assert results.accuracy("override") > results.accuracy("none")  # the holdout would have picked override


def test_predictor_reports_matches_and_applies_the_choice(tmp_path: Path) -> None:
    products = [*_train_part(), (500, 1, "val", ["v"], 1)]
    predictor = _workdir(tmp_path, products)
    digests = [xxhash.xxh3_128_digest(b"t-b"), xxhash.xxh3_128_digest(b"new")]
    log_probs = np.log(np.array([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]]))
    _, matches = predictor._with_twins(log_probs, [digests[:1], digests[1:]])
    assert matches[0] is not None and matches[0].products == 1 and matches[0].applied == "none"
    assert matches[1] is None
    predictor.twin_choice = TwinChoice("override")
    changed, _ = predictor._with_twins(log_probs, [digests[:1], digests[1:]])
    assert changed[0].argmax() == 2 and changed[1].argmax() == 0  # t-b's training product is label 2


def test_predict_bson_looks_up_training_twins(tmp_path: Path) -> None:
    """Both submission paths: test.bson from the feature store, and any other BSON through the backbone."""
    import bson

    from picture_table import write_picture_table
    from prodcat.config import DemoConfig, IngestConfig, TrainConfig
    from prodcat.data.catalog import ingest, load_catalog
    from prodcat.data.synthetic.demo import generate_demo
    from prodcat.features.extract import extract
    from prodcat.predict.submission import predict_bson
    from prodcat.train.loop import train

    torch.set_num_threads(2)
    data, workdir = tmp_path / "data", tmp_path / "W"
    generate_demo(  # no stock photos: the only twins are the ones made below
        data,
        DemoConfig(
            products=40, test_products=6, categories=4, seed=1, image_size=64, stock_share=0.0, placeholder_share=0.0
        ),
    )
    with open(data / "train.bson", "rb") as source:
        documents = {int(doc["_id"]): doc for doc in bson.decode_file_iter(source)}
    with open(data / "test.bson", "rb") as source:
        tests = list(bson.decode_file_iter(source))
    reused = list(documents)[:3]  # test products 0-2 show the first picture of train.bson products 0-2
    with open(data / "test.bson", "wb") as handle:
        for k, doc in enumerate(tests):
            imgs = documents[reused[k]]["imgs"][:1] if k < len(reused) else doc["imgs"]
            handle.write(bson.encode({"_id": doc["_id"], "imgs": imgs}))
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.2))
    write_picture_table(workdir)
    extract(ExtractConfig(workdir=str(workdir), backbone="test_efficientnet", random_init=True, batch_size=32,
                          workers=0))  # fmt: skip
    run = train(TrainConfig(workdir=str(workdir), store="test_efficientnet-pooled", max_steps=3, batch_size=16,
                            eval_every=3, warmup_steps=1, run_name="tiny"))  # fmt: skip
    in_train = set(load_catalog(workdir, "train", split="train")["product_id"].to_pylist())
    summary = predict_bson(run, data / "test.bson", tmp_path / "sub.csv")
    assert summary["source"] == "store" and summary["products"] == 6
    expected = sum(pid in in_train for pid in reused)
    assert summary["twin_matched_products"] == expected >= 1  # val twins never count
    chosen = json.loads((Path(run) / "eval" / "twins.json").read_text())  # made on val, since evaluate had not
    assert chosen["selected_on"] == "val" and summary["twins"] == chosen["name"]
    twin = documents[next(pid for pid in documents if pid in in_train)]
    query = tmp_path / "query.bson"
    with open(query, "wb") as handle:
        handle.write(bson.encode({"_id": 7, "imgs": twin["imgs"][:1]}))  # a training picture, byte for byte
        handle.write(bson.encode({"_id": 8, "imgs": []}))  # no picture: fallback, no twin
    summary = predict_bson(run, query, tmp_path / "sub2.csv")
    assert summary["source"] == "backbone" and summary["twin_matched_products"] == 1 and summary["products"] == 2
