"""Micro-batching: concurrent requests share forwards, each gets its own answer, limits and failures hold."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch

from prodcat.config import ServeConfig
from prodcat.serve.app import create_app
from prodcat.serve.batching import MicroBatcher, OverloadedError


async def _post_all(app: Any, payloads: list[tuple[list[bytes], int]]) -> list[httpx.Response]:
    """POST every (photos, top_k) at once through the app, with its lifespan running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            requests = [
                client.post(
                    "/v1/classify",
                    params={"top_k": top_k},
                    files=[("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)],
                )
                for photos, top_k in payloads
            ]
            return await asyncio.gather(*requests)


def _labels(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [image["top"][0]["label"] for image in response.json()["images"]]


def test_concurrent_requests_share_forwards_and_get_their_own_answers(
    make_predictor: Callable, make_jpeg: Callable
) -> None:
    predictor = make_predictor(delay=0.05)
    app = create_app(predictor, ServeConfig(batch_window_ms=200.0))
    wanted = [[i % 6, (i + 2) % 6][: 1 + i % 2] for i in range(12)]
    payloads = [([make_jpeg(label, seed=i) for label in labels], 1 + i % 3) for i, labels in enumerate(wanted)]
    responses = asyncio.run(_post_all(app, payloads))
    assert [_labels(response) for response in responses] == wanted
    assert [len(response.json()["top"]) for response in responses] == [1 + i % 3 for i in range(12)]
    assert len(predictor.calls) < len(payloads)  # really batched
    assert sorted(n for call in predictor.calls for n in call) == sorted(len(labels) for labels in wanted)
    assert max(response.json()["batch"]["products"] for response in responses) > 1


def test_without_micro_batching_every_request_is_its_own_forward(make_predictor: Callable, make_jpeg: Callable) -> None:
    predictor = make_predictor(delay=0.02)
    app = create_app(predictor, ServeConfig(micro_batching=False))
    responses = asyncio.run(_post_all(app, [([make_jpeg(i % 6, seed=i)], 5) for i in range(6)]))
    assert [_labels(response) for response in responses] == [[i % 6] for i in range(6)]
    assert predictor.calls == [[1]] * 6
    assert all(response.json()["batch"]["products"] == 1 for response in responses)


def test_batches_respect_max_batch_images(make_predictor: Callable, make_jpeg: Callable) -> None:
    predictor = make_predictor(delay=0.05)
    app = create_app(predictor, ServeConfig(max_images=4, max_batch_images=5, batch_window_ms=200.0))
    payloads = [([make_jpeg(i % 6, seed=i), make_jpeg((i + 1) % 6, seed=i)], 5) for i in range(8)]
    responses = asyncio.run(_post_all(app, payloads))
    assert [_labels(response) for response in responses] == [[i % 6, (i + 1) % 6] for i in range(8)]
    assert all(sum(call) <= 5 for call in predictor.calls) and sum(map(sum, predictor.calls)) == 16


def test_failed_batch_answers_every_request_and_batcher_survives(make_predictor: Callable, make_jpeg: Callable) -> None:
    predictor = make_predictor(fail=True)
    app = create_app(predictor, ServeConfig(batch_window_ms=100.0))

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

                def post(label: int) -> Any:
                    return client.post("/v1/classify", files=[("images", ("a.jpg", make_jpeg(label), "image/jpeg"))])

                failed = await asyncio.gather(*[post(i) for i in range(4)])
                predictor.fail = False
                return failed, await asyncio.gather(*[post(i) for i in range(3)])

    failed, recovered = asyncio.run(scenario())
    assert all(r.status_code == 500 and r.json()["error"]["code"] == "model_error" for r in failed)
    assert [_labels(response) for response in recovered] == [[0], [1], [2]]


def test_overload_answers_503(make_predictor: Callable, make_jpeg: Callable) -> None:
    gate = threading.Event()
    predictor = make_predictor(gate=gate)
    app = create_app(predictor, ServeConfig(max_pending_requests=1))

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                files = [("images", ("a.jpg", make_jpeg(2), "image/jpeg"))]
                first = asyncio.create_task(client.post("/v1/classify", files=files))
                while not predictor.calls:  # the first request is now inside the model
                    await asyncio.sleep(0.01)
                second = await client.post("/v1/classify", files=files)
                gate.set()
                return await first, second

    first, second = asyncio.run(scenario())
    assert _labels(first) == [2]
    assert second.status_code == 503 and second.json()["error"]["code"] == "overloaded"
    assert second.headers["retry-after"] == "1"


def test_lone_request_does_not_wait_for_the_window(make_predictor: Callable) -> None:
    """Nobody else is on the way, so the batcher must not sit out its (here absurd) 600 s window."""
    predictor = make_predictor()
    batcher = MicroBatcher(predictor, ServeConfig(batch_window_ms=600_000.0))
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)

    async def scenario() -> int:
        await batcher.start()
        try:
            with batcher.admit():
                prediction, info = await asyncio.wait_for(batcher.predict([image], top_k=2), timeout=30)
            return prediction.top[0].label
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == predictor.label_of(image)
    assert predictor.calls == [[1]]


def test_admit_refuses_beyond_max_pending(make_predictor: Callable) -> None:
    batcher = MicroBatcher(make_predictor(), ServeConfig(max_pending_requests=2))
    with batcher.admit(), batcher.admit():
        assert batcher.in_flight == 2
        with pytest.raises(OverloadedError):
            with batcher.admit():
                pass
    assert batcher.in_flight == 0
