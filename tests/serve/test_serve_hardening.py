"""Issue 12 on the server: crafted form values, foreign formats, decoder failures, reduced decoding, the queue's
byte bound, slow and vanishing clients, /health and offline /docs. Every answer a client can cause is a 4xx."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from prodcat.config import ServeConfig
from prodcat.serve.app import create_app
from prodcat.serve.batching import MicroBatcher, OverloadedError


@pytest.fixture
def client(make_predictor: Callable) -> Iterator[TestClient]:
    config = ServeConfig(max_upload_bytes=200_000, max_pixels=4_000_000, batch_window_ms=1.0)
    with TestClient(create_app(make_predictor(), config)) as test_client:
        yield test_client


def _files(*payloads: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"photo{i}.jpg", data, "image/jpeg")) for i, data in enumerate(payloads)]


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
    return response.json()["error"]["message"]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("value", ["²", "¹²", "٣", "1" * 4301, "-1", "+3", "3.0", "0x1", "1_0", "0", "101", "００３"])
def test_crafted_top_k_form_values_get_422(client: TestClient, make_jpeg: Callable, value: str) -> None:
    message = _error(
        client.post("/v1/classify", data={"top_k": value}, files=_files(make_jpeg(1))), 422, "invalid_top_k"
    )
    assert "1..100" in message and len(message) < 120


@pytest.mark.parametrize("value", ["²", "¹²", "٣", "1" * 4301])
def test_crafted_top_k_query_values_get_422(client: TestClient, make_jpeg: Callable, value: str) -> None:
    response = client.post("/v1/classify", params={"top_k": value}, files=_files(make_jpeg(1)))
    assert "top_k" in _error(response, 422, "invalid_request")


def test_plain_top_k_form_values_are_taken(client: TestClient, make_jpeg: Callable) -> None:
    for value, expected in (("3", 3), (" 2 ", 2), ("100", 6), ("007", 6)):
        response = client.post("/v1/classify", data={"top_k": value}, files=_files(make_jpeg(1)))
        assert response.status_code == 200 and len(response.json()["top"]) == expected, (value, response.text)


def test_formats_outside_the_allow_list_get_422_naming_the_file(client: TestClient) -> None:
    tiff = _encode(Image.new("RGB", (16, 16), (10, 20, 30)), "TIFF")
    message = _error(client.post("/v1/classify", files=_files(tiff)), 422, "invalid_image")
    assert message.startswith("images[0] 'photo0.jpg'") and "not an image" in message


def test_a_decoder_raising_anything_is_a_422(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import PngImagePlugin

    def broken(self: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'seek'")  # as SPIDER's decoder did

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
    png = _encode(Image.new("RGB", (16, 16)), "PNG")
    message = _error(client.post("/v1/classify", files=_files(png, png)), 422, "invalid_image")
    assert message.startswith("images[0] 'photo0.jpg': corrupt PNG (AttributeError")


def test_uploads_are_decoded_reduced_towards_the_model_input(make_predictor: Callable) -> None:
    predictor = make_predictor(input_size=(32, 32))
    big = _encode(Image.new("RGB", (1000, 600), (230, 0, 0)), "PNG")
    with TestClient(create_app(predictor, ServeConfig())) as client:
        body = client.post("/v1/classify", files=_files(big)).json()
    assert (body["images"][0]["width"], body["images"][0]["height"]) == (1000, 600)  # as uploaded
    assert predictor.shapes == [(3, 34, 33)]  # factors 31 (x), 18 (y): >= 32 on both axes, not 1000 x 600
    assert body["top"][0]["label"] == 5


def test_the_queue_is_bounded_in_bytes(make_predictor: Callable) -> None:
    gate = threading.Event()
    batcher = MicroBatcher(make_predictor(gate=gate), ServeConfig(max_queued_bytes=100_000))
    image = torch.zeros((3, 100, 100), dtype=torch.uint8)  # 30,000 bytes

    async def scenario() -> tuple[int, int]:
        await batcher.start()
        try:
            waiting = [asyncio.create_task(batcher.predict([image] * 3, top_k=1))]  # 90,000 bytes
            await asyncio.sleep(0.05)
            held = batcher.held_bytes
            with pytest.raises(OverloadedError, match="bytes of pictures are already waiting"):
                await batcher.predict([image], top_k=1)  # 120,000 > 100,000
            gate.set()
            await asyncio.gather(*waiting)
            return held, batcher.held_bytes
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == (90_000, 0)


def test_a_lone_request_is_taken_whatever_its_size(make_predictor: Callable) -> None:
    batcher = MicroBatcher(make_predictor(), ServeConfig(max_queued_bytes=1))

    async def scenario() -> int:
        await batcher.start()
        try:
            prediction, _ = await batcher.predict([torch.zeros((3, 8, 8), dtype=torch.uint8)], top_k=1)
            return len(prediction.top)
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == 1


def test_health_gives_the_run_name_not_the_path_as_typed(make_predictor: Callable, tmp_path: Any) -> None:
    run = tmp_path / "W" / "runs" / "demo"
    config = ServeConfig(run=f"{tmp_path}/W/../W/runs/demo/")
    with TestClient(create_app(make_predictor(), config)) as client:
        body = client.get("/health").json()
    assert body["model"]["run"] == "demo" and str(tmp_path) not in str(body) and run.name == "demo"
    assert body["limits"]["formats"] == ["JPEG", "PNG", "WEBP", "GIF", "BMP"]


def test_docs_load_their_assets_locally(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text and "/docs-assets/swagger-ui.css" in page.text
    assert "cdn" not in page.text.lower() and "http://" not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert client.get(f"/docs-assets/{asset}").status_code == 200, asset
    assert client.get("/openapi.json").json()["paths"]["/v1/classify"]


def test_docs_can_be_turned_off(make_predictor: Callable) -> None:
    with TestClient(create_app(make_predictor(), ServeConfig(docs=False))) as client:
        assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
        assert client.get("/health").status_code == 200


# -- slow and vanishing clients (ASGI level: the body arrives as the test says) ------------------------------------
def _multipart_head(boundary: str = "b") -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()


async def _slow_body(first: bytes, pause: float) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(pause)
    yield b"never read in time"


def test_slow_upload_counts_as_pending_and_times_out_with_408(make_predictor: Callable) -> None:
    config = ServeConfig(max_pending_requests=1, body_idle_timeout_s=0.3, body_timeout_s=5.0)
    app = create_app(make_predictor(), config)
    headers = {"content-type": "multipart/form-data; boundary=b"}

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                slow = asyncio.create_task(
                    client.post("/v1/classify", content=_slow_body(_multipart_head(), 2.0), headers=headers)
                )
                while app.state.runner.in_flight == 0:
                    await asyncio.sleep(0.01)
                second = await client.post("/v1/classify", files=_files(b"x"))  # the slow one holds the slot
                return await slow, second

    slow, second = asyncio.run(scenario())
    assert _error(second, 503, "overloaded")
    message = _error(slow, 408, "request_timeout")
    assert "0.3 s without data" in message and slow.headers["connection"] == "close"
    assert app.state.runner.in_flight == 0


def test_total_body_time_is_bounded_even_when_data_trickles(make_predictor: Callable) -> None:
    app = create_app(make_predictor(), ServeConfig(body_idle_timeout_s=1.0, body_timeout_s=0.5))

    async def trickle() -> AsyncIterator[bytes]:
        yield _multipart_head()
        for _ in range(40):
            await asyncio.sleep(0.05)
            yield b"\x00"

    async def scenario() -> httpx.Response:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                headers = {"content-type": "multipart/form-data; boundary=b"}
                return await client.post("/v1/classify", content=trickle(), headers=headers)

    assert "0.5 s in all" in _error(asyncio.run(scenario()), 408, "request_timeout")


def test_client_disconnect_is_one_warning_line_without_traceback(
    make_predictor: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_predictor(), ServeConfig())
    messages = [
        {"type": "http.request", "body": _multipart_head(), "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/classify",
        "raw_path": b"/v1/classify",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"host", b"test")],
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 8000),
    }

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    records = [record for record in caplog.records if record.name.startswith("prodcat")]
    assert [record.levelname for record in records] == ["WARNING"]
    assert "127.0.0.1:5555 disconnected during POST /v1/classify" in records[0].getMessage()
    assert not any(record.exc_info for record in caplog.records) and "Traceback" not in caplog.text
    assert app.state.runner.in_flight == 0


def test_serve_config_checks_the_new_limits() -> None:
    from prodcat.config import ConfigError

    for bad in ({"decode_threads": 0}, {"max_queued_bytes": 0}, {"header_timeout_s": 0}, {"max_header_bytes": 10}):
        with pytest.raises(ConfigError):
            ServeConfig(**bad)
    assert ServeConfig().max_pixels == 12_000_000 and np.isfinite(ServeConfig().body_timeout_s)


def test_the_issues_6300_square_pngs_are_refused_from_the_header(make_predictor: Callable, make_bomb: Callable) -> None:
    with TestClient(create_app(make_predictor(), ServeConfig())) as client:
        response = client.post("/v1/classify", files=_files(*[make_bomb(6300, 6300)] * 4))
        message = _error(response, 413, "image_too_large")
    assert "6300 x 6300" in message and "12000000" in message


def test_a_real_predictor_decodes_towards_its_backbone_input(make_predictor: Callable) -> None:
    from types import SimpleNamespace

    from prodcat.serve.app import _decode_size

    predictor = make_predictor()
    assert _decode_size(predictor) is None  # nothing known: full-size decoding
    predictor.extract_config = SimpleNamespace(backbone="efficientnet_lite0")
    assert _decode_size(predictor) == (180, 180)
    predictor.extract_config = SimpleNamespace(backbone="no-such-backbone-anywhere")
    assert _decode_size(predictor) is None
