"""BsonReader.pictures reads picture by picture: one bad entry never hides the product's other pictures."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from prodcat.data.bson_index import BsonReader, index_bson
from prodcat.data.images import ImageDecodeError, decode_image


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_bad_picture_is_reported_and_the_good_ones_kept(tmp_path, write_bson, caplog) -> None:
    path = tmp_path / "train.bson"
    good, other = _jpeg(0), _jpeg(1)
    images = [{"picture": good}, {"picture": "a str"}, "not a document", {"picture": 123}, {}, {"picture": other}]
    frames = write_bson(path, [{"_id": 1, "category_id": 5, "imgs": [{"picture": good}]}, {"_id": 2, "imgs": images}])
    offset, length = frames[1]
    with caplog.at_level(logging.WARNING, logger="prodcat"), BsonReader(path) as reader:
        pictures = reader.pictures(offset, length)
    assert pictures == [good, b"", b"", b"", b"", other]  # indices stay aligned with the catalog's
    assert decode_image(pictures[0]).shape == (3, 16, 16) and decode_image(pictures[5]).shape == (3, 16, 16)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(pictures[1])
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 4
    assert f"{path}: product at byte {offset}, picture 1: picture str" in messages[0]
    assert "picture 2: str" in messages[1] and "picture 3: picture int" in messages[2]
    assert "picture 4: picture NoneType" in messages[3]
    assert index_bson(path).num_images.tolist() == [1, 6]


def test_imgs_of_the_wrong_type_give_no_pictures_and_a_report(tmp_path, write_bson, caplog) -> None:
    path = tmp_path / "test.bson"
    frames = write_bson(path, [{"_id": 7, "imgs": "not an array"}])
    with caplog.at_level(logging.WARNING, logger="prodcat"), BsonReader(path) as reader:
        assert reader.pictures(*frames[0]) == []
    assert "imgs is str, expected an array" in caplog.text and str(path) in caplog.text
