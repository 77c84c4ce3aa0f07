"""Issue 12 item 5: `predict_bson` writes one row per readable test `_id`, in input order, damaged documents too."""

from __future__ import annotations

import csv
from pathlib import Path

import bson
import torch


def _zeroed_entry(document: bytes, index: int, shift: int) -> bytes:
    at = document.index(b"\x03" + str(index).encode() + b"\x00", document.index(b"\x04imgs\x00")) + shift
    return document[:at] + bytes(30) + document[at + 30 :]


def test_every_readable_id_gets_one_row(tmp_path: Path) -> None:
    from prodcat.config import DemoConfig, ExtractConfig, IngestConfig, TrainConfig
    from prodcat.data.catalog import ingest
    from prodcat.data.synthetic.demo import generate_demo
    from prodcat.features.extract import extract
    from prodcat.predict.submission import predict_bson
    from prodcat.train.loop import train

    torch.set_num_threads(2)
    data, workdir = tmp_path / "data", tmp_path / "W"
    generate_demo(data, DemoConfig(products=40, test_products=4, categories=4, seed=1, image_size=64))
    ingest(IngestConfig(data_dir=str(data), workdir=str(workdir), val_fraction=0.2))
    extract(ExtractConfig(workdir=str(workdir), backbone="test_efficientnet", random_init=True, batch_size=32,
                          workers=0))  # fmt: skip
    run = train(TrainConfig(workdir=str(workdir), store="test_efficientnet-pooled", max_steps=2, batch_size=16,
                            eval_every=2, warmup_steps=1, run_name="tiny"))  # fmt: skip
    with open(data / "train.bson", "rb") as source:
        imgs = [doc["imgs"] for doc in bson.decode_file_iter(source)][:6]
    two = imgs[0][:1] + imgs[1][:1]
    documents = [
        bson.encode({"_id": 1, "imgs": imgs[2]}),
        bson.encode({"_id": 2, "imgs": imgs[3], "category_id": "not a number"}),
        bson.encode({"_id": 3, "imgs": "not a list"}),
        _zeroed_entry(bson.encode({"_id": 4, "imgs": two}), 1, 7),  # damage inside imgs[1]
        bson.encode({"_id": "no id", "imgs": imgs[4]}),  # unreadable _id: no row possible
        bson.encode({"_id": 6, "imgs": imgs[5]}),
        bson.encode({"_id": 1, "imgs": imgs[0]}),  # repeated _id: the first document's row stands
    ]
    query = tmp_path / "query.bson"
    query.write_bytes(b"".join(documents))
    summary = predict_bson(run, query, tmp_path / "sub.csv")
    with open(tmp_path / "sub.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["_id", "category_id"]
    assert [int(row[0]) for row in rows[1:]] == [1, 2, 3, 4, 6]
    assert summary["products"] == 5 and summary["fallback_products"] == 2  # 3 (no pictures) and 4 (damaged)
    assert all(row[1].isdigit() for row in rows[1:])
