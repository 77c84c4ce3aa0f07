"""HTTP API: every route, every kind of bad input, and that the server keeps serving afterwards."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from prodcat.config import ServeConfig
from prodcat.serve.app import create_app, serve


@pytest.fixture
def predictor(make_predictor: Callable) -> object:
    return make_predictor(threshold=0.5)


@pytest.fixture
def client(predictor: object) -> Iterator[TestClient]:
    config = ServeConfig(max_upload_bytes=20_000, max_pixels=1_000_000, batch_window_ms=1.0)
    with TestClient(create_app(predictor, config)) as test_client:
        yield test_client


def _files(*payloads: bytes, field: str = "images") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(payloads)]


def _error(response: object, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]["message"]


def test_health_reports_model_and_limits(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"]["num_classes"] == 6 and body["model"]["accept_threshold"] == 0.5
    assert body["limits"]["max_images"] == 4 and body["serving"]["micro_batching"] is True


def test_categories_are_paginated_with_total(client: TestClient, predictor: object) -> None:
    page = client.get("/v1/categories", params={"offset": 2, "limit": 3}).json()
    assert page["total"] == 6 and page["offset"] == 2 and page["limit"] == 3
    assert [item["label"] for item in page["items"]] == [2, 3, 4]
    first = page["items"][0]
    assert (first["level1"], first["level2"], first["level3"]) == predictor.taxonomy.names(2)
    assert first["category_id"] == int(predictor.taxonomy.category_ids[2])
    assert client.get("/v1/categories", params={"offset": 5, "limit": 10}).json()["items"][0]["label"] == 5
    assert client.get("/v1/categories", params={"offset": 99}).json()["items"] == []
    _error(client.get("/v1/categories", params={"limit": 0}), 422, "invalid_request")
    assert "offset" in _error(client.get("/v1/categories", params={"offset": "x"}), 422, "invalid_request")


def test_web_page_and_its_assets_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for element_id in ('id="dropzone"', 'id="file-input"', 'id="results"', 'id="error"', 'id="accept-badge"'):
        assert element_id in page.text
    assert "v1/classify" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200


def test_page_has_a_place_for_the_words_read_on_each_photo(client: TestClient) -> None:
    page = client.get("/").text
    template = page[page.index('<template id="thumb-template">') : page.index("</template>")]
    assert '<p class="thumb-words" hidden>' in template and 'class="thumb-top"' in template  # under each photo
    script = client.get("/static/app.js").text
    assert "result.ocr_words" in script and '".thumb-words"' in script
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script  # words go in as text, never markup


def test_classify_answers_the_words_read_per_photo(make_predictor: Callable, make_jpeg: Callable) -> None:
    words = {0: ["LIVRE", "<b>Polar</b>"], 1: []}
    with TestClient(create_app(make_predictor(ocr_words=words.__getitem__), ServeConfig())) as client:
        files = [("images", (f"{i}.jpg", make_jpeg(i), "image/jpeg")) for i in (0, 1)]
        body = client.post("/v1/classify", files=files).json()
    assert body["ocr_words"] == [["LIVRE", "<b>Polar</b>"], []]
    with TestClient(create_app(make_predictor(), ServeConfig())) as client:  # no text model: null, not []
        assert client.post("/v1/classify", files=files[:1]).json()["ocr_words"] is None


def test_openapi_docs_describe_the_upload(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/classify"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["images"]["items"]["format"] == "binary"


def test_classify_one_photo(client: TestClient, predictor: object, make_jpeg: Callable) -> None:
    response = client.post("/v1/classify", files=_files(make_jpeg(3)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["top"]) == 5 and body["top"][0]["label"] == 3
    best = body["top"][0]
    assert best["category_id"] == int(predictor.taxonomy.category_ids[3]) and best["rank"] == 1
    assert (best["level1"], best["level2"], best["level3"]) == predictor.taxonomy.names(3)
    probabilities = [score["probability"] for score in body["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-6
    assert body["accepted"] is (best["probability"] >= 0.5) and body["threshold"] == 0.5
    assert body["aggregation"] == "mean_prob"
    assert len(body["images"]) == 1 and body["images"][0]["top"][0]["label"] == 3
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (40, 32)
    assert body["images"][0]["filename"] == "photo0.jpg"
    assert set(body["timing_ms"]) == {"decode", "queue", "model", "total"}


def test_classify_product_of_several_photos_aggregates(client: TestClient, make_jpeg: Callable) -> None:
    body = client.post(
        "/v1/classify", files=_files(make_jpeg(0), make_jpeg(1, seed=1), make_jpeg(1, seed=2), make_jpeg(5))
    ).json()
    assert [image["top"][0]["label"] for image in body["images"]] == [0, 1, 1, 5]
    assert body["top"][0]["label"] == 1  # two of four photos say 1, and 0 is its neighbour
    assert body["batch"]["images"] >= 4


def test_png_and_top_k_from_query_or_form(client: TestClient, make_jpeg: Callable) -> None:
    png = make_jpeg(4, fmt="PNG")
    body = client.post("/v1/classify", params={"top_k": 2}, files=_files(png)).json()
    assert len(body["top"]) == 2 and len(body["images"][0]["top"]) == 2 and body["top"][0]["label"] == 4
    body = client.post("/v1/classify", data={"top_k": "3"}, files=_files(png)).json()
    assert len(body["top"]) == 3
    assert len(client.post("/v1/classify", params={"top_k": 50}, files=_files(png)).json()["top"]) == 6
    _error(client.post("/v1/classify", params={"top_k": 0}, files=_files(png)), 422, "invalid_request")
    _error(client.post("/v1/classify", data={"top_k": "many"}, files=_files(png)), 422, "invalid_top_k")


def test_not_accepted_without_threshold(make_predictor: Callable, make_jpeg: Callable) -> None:
    with TestClient(create_app(make_predictor(threshold=None), ServeConfig())) as client:
        body = client.post("/v1/classify", files=_files(make_jpeg(2))).json()
    assert body["accepted"] is False and body["threshold"] is None
    with TestClient(create_app(make_predictor(threshold=0.999), ServeConfig())) as client:
        assert client.post("/v1/classify", files=_files(make_jpeg(2))).json()["accepted"] is False
    with TestClient(create_app(make_predictor(threshold=0.01), ServeConfig())) as client:
        assert client.post("/v1/classify", files=_files(make_jpeg(2))).json()["accepted"] is True


def _multipart(*parts: bytes) -> dict:
    """Request kwargs for a hand-made multipart body (httpx sends urlencoded when there are no files)."""
    body = b"".join(b"--abc\r\n" + part + b"\r\n" for part in parts) + b"--abc--\r\n"
    return {"content": body, "headers": {"content-type": "multipart/form-data; boundary=abc"}}


def _bad_requests(make_jpeg: Callable, make_bomb: Callable) -> list[tuple[str, dict, int, str, str]]:
    """(name, request kwargs, status, code, text the message must contain)."""
    good = make_jpeg(1)
    return [
        ("not an image", {"files": _files(b"hello, I am text " * 20)}, 422, "invalid_image", "not an image"),
        ("truncated jpeg", {"files": _files(good[: len(good) // 2])}, 422, "invalid_image", "truncated"),
        ("empty upload", {"files": _files(b"")}, 422, "invalid_image", "empty"),
        ("bad second photo", {"files": _files(good, b"\x00" * 50)}, 422, "invalid_image", "images[1]"),
        (
            "no files",
            _multipart(b'Content-Disposition: form-data; name="top_k"\r\n\r\n3'),
            422,
            "no_images",
            "no photo",
        ),
        ("no parts", _multipart(), 422, "no_images", "no photo"),
        ("wrong field", {"files": _files(good, field="file")}, 422, "no_images", "'file'"),
        (
            "text not file",
            {"data": {"images": "abc"}, "files": _files(good, field="other")},
            422,
            "images_not_files",
            "files",
        ),
        ("five files", {"files": _files(*[good] * 5)}, 422, "too_many_images", "at most 4"),
        ("many files", {"files": _files(*[good] * 30)}, 422, "too_many_images", "at most 4"),
        ("file too large", {"files": _files(good + b"\x00" * 30_000)}, 413, "file_too_large", "20000"),
        ("bomb", {"files": _files(make_bomb())}, 413, "image_too_large", "100000 x 100000"),
        ("json body", {"json": {"images": ["x"]}}, 415, "unsupported_media_type", "multipart/form-data"),
        ("urlencoded", {"data": {"images": "x"}}, 415, "unsupported_media_type", "multipart/form-data"),
        (
            "no boundary",
            {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "malformed_form",
            "boundary",
        ),
        (
            "garbage multipart",
            {"content": b"garbage" * 10, "headers": {"content-type": "multipart/form-data; boundary=abc"}},
            400,
            "malformed_form",
            "Invalid multipart",
        ),
    ]


def test_bad_input_gets_clear_4xx_and_server_keeps_serving(
    client: TestClient, make_jpeg: Callable, make_bomb: Callable
) -> None:
    for name, kwargs, status, code, text in _bad_requests(make_jpeg, make_bomb):
        message = _error(client.post("/v1/classify", **kwargs), status, code)
        assert text in message, (name, message)
    good = client.post("/v1/classify", files=_files(make_jpeg(4)))
    assert good.status_code == 200 and good.json()["top"][0]["label"] == 4
    assert client.get("/health").json()["serving"]["in_flight"] == 0


def test_declared_body_over_limit_is_refused_before_reading(client: TestClient) -> None:
    headers = {"content-type": "multipart/form-data; boundary=abc", "content-length": str(10**9)}
    _error(client.post("/v1/classify", content=b"--abc--\r\n", headers=headers), 413, "request_too_large")


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    _error(client.get("/nope"), 404, "not_found")
    _error(client.get("/v1/classify"), 405, "method_not_allowed")


def test_model_failure_is_json_500_without_details(make_predictor: Callable, make_jpeg: Callable) -> None:
    predictor = make_predictor(fail=True)
    with TestClient(create_app(predictor, ServeConfig())) as client:
        response = client.post("/v1/classify", files=_files(make_jpeg(1)))
        assert "secret" not in _error(response, 500, "model_error")
        predictor.fail = False
        assert client.post("/v1/classify", files=_files(make_jpeg(1))).status_code == 200


def test_unexpected_error_is_json_500_and_server_keeps_serving(make_predictor: Callable, make_jpeg: Callable) -> None:
    predictor = make_predictor()
    real = predictor.predict_products

    def malformed(products: list, top_k: int = 5) -> list:
        return [dataclasses.replace(prediction, top=[object()]) for prediction in real(products, top_k)]

    predictor.predict_products = malformed
    with TestClient(create_app(predictor, ServeConfig())) as client:
        response = client.post("/v1/classify", files=_files(make_jpeg(1)))
        message = _error(response, 500, "internal_error")
        assert "object" not in message and "Traceback" not in response.text
        predictor.predict_products = real
        assert client.post("/v1/classify", files=_files(make_jpeg(1))).status_code == 200


def test_serve_config_checks() -> None:
    with pytest.raises(ValueError, match="max_batch_images"):
        ServeConfig(max_images=4, max_batch_images=2)
    with pytest.raises(ValueError, match="top_k"):
        ServeConfig(top_k=0)


def test_serve_loads_the_run_and_binds_loopback(monkeypatch: pytest.MonkeyPatch, make_predictor: Callable) -> None:
    import uvicorn

    from prodcat.predict.predictor import Predictor

    predictor, seen = make_predictor(), {}

    def load(cls: type, run: str, device: object = None) -> object:
        seen["run"] = run
        return predictor

    monkeypatch.setattr(Predictor, "load", classmethod(load))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    serve(ServeConfig(run="W/runs/demo", port=8123))
    assert seen["run"] == "W/runs/demo" and (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    assert seen["app"].state.predictor is predictor and predictor.calls == [[1]]  # one warm-up forward
    with pytest.raises(ValueError, match="run"):
        serve(ServeConfig())


def _odd_uploads(make_jpeg: Callable) -> list[bytes]:
    """Corrupt, exotic and hostile payloads; none may ever produce a 5xx."""
    import io

    import numpy as np
    from PIL import Image

    def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    jpeg = make_jpeg(2)
    sof = jpeg.index(b"\xff\xc0")
    huge_jpeg = jpeg[: sof + 5] + (65000).to_bytes(2, "big") * 2 + jpeg[sof + 9 :]
    png = encode(rgb, "PNG")
    return [
        b"\xff\xd8\xff" + rng.bytes(500),  # JPEG magic, then noise
        jpeg[:200],
        huge_jpeg,  # 65000 x 65000 declared in the frame header
        png[:-30],
        png[:40] + rng.bytes(200) + png[-12:],  # corrupt IDAT
        b"GIF89a" + b"\x00" * 10,
        encode(rgb, "WEBP")[:30],
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb.convert("L"), "PNG"),
        encode(Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "PNG"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(rgb, "GIF"),
        encode(rgb, "BMP"),
        rng.bytes(3000),
    ]


def test_odd_and_hostile_photos_never_give_5xx(client: TestClient, make_jpeg: Callable) -> None:
    for index, payload in enumerate(_odd_uploads(make_jpeg)):
        response = client.post("/v1/classify", files=_files(payload))
        assert response.status_code < 500, (index, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["code"] in {"invalid_image", "image_too_large"}, (index, response.text)
    assert client.post("/v1/classify", files=_files(make_jpeg(3))).json()["top"][0]["label"] == 3


def test_probabilities_are_rounded_to_four_decimals(client: TestClient, make_jpeg: Callable) -> None:
    body = client.post("/v1/classify", files=_files(make_jpeg(3))).json()
    values = [score["probability"] for score in body["top"]] + [body["images"][0]["top"][0]["probability"]]
    assert all(value == round(value, 4) for value in values)
    assert any(value != round(value, 2) for value in values)  # rounded, not coarsened


def test_health_names_the_run_and_its_holdout_accuracy(make_predictor: Callable, tmp_path: object) -> None:
    import json
    from pathlib import Path

    run = Path(str(tmp_path)) / "linear-softmax-adamw-s0"
    (run / "eval").mkdir(parents=True)
    metrics = {"split": "holdout", "products": 312, "product": {"top1": 0.73456, "top1_ci95": [0.68, 0.78], "n": 312}}
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    predictor = make_predictor()
    predictor.run_dir = run
    with TestClient(create_app(predictor, ServeConfig())) as client:
        model = client.get("/health").json()["model"]
    assert model["run"] == "linear-softmax-adamw-s0"
    assert model["evaluation"] == {
        "split": "holdout",
        "product_top1": 0.7346,
        "product_top1_ci95": [0.68, 0.78],
        "products": 312,
    }
    with TestClient(create_app(make_predictor(), ServeConfig())) as client:  # no run folder: nothing to name
        model = client.get("/health").json()["model"]
    assert model["run"] is None and model["evaluation"] is None
