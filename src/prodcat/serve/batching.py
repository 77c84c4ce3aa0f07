"""Run the Predictor off the event loop: micro-batched across requests, or one forward per request.

Both runners own ONE model thread: forwards never overlap (the predictor need not be thread-safe, and torch's own
intra-op threads already use the cores), and the event loop only ever awaits futures.

`MicroBatcher` queues decoded products; a batcher task takes the first one, then keeps collecting until
`batch_window_ms` has passed or `max_batch_images` would be exceeded, and runs ONE `predict_products` call for them
all. It stops waiting early when no other request is on its way (none is being decoded), so a lone client pays no
window. While a batch runs, new requests queue up and form the next batch: under load, batches grow by themselves.

What waits is bounded twice: in requests (`max_pending_requests`, counted from before the upload is read) and in
bytes of decoded pixels held from submission to the end of their forward (`max_queued_bytes`); past either the
request is refused with `OverloadedError` (503) instead of growing the server's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from prodcat.config import ServeConfig
from prodcat.utils import get_logger

if TYPE_CHECKING:
    import torch

    from prodcat.predict.predictor import Predictor, ProductPrediction

__all__ = ["BatchInfo", "DirectRunner", "MicroBatcher", "ModelError", "OverloadedError", "Runner", "create_runner"]

log = get_logger("prodcat.serve")


class OverloadedError(RuntimeError):
    """Too many requests are already waiting; the client should retry later."""


class ModelError(RuntimeError):
    """The predictor failed on a batch (details are in the server log, not sent to clients)."""


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """How a request's forward went: the batch it shared and where the time went."""

    products: int  # products in the forward (1 without micro-batching)
    images: int  # images in the forward
    queue_ms: float  # from submission to the start of the forward
    model_ms: float  # the forward itself (shared by the whole batch)


@dataclasses.dataclass
class _Pending:
    images: list[torch.Tensor]
    top_k: int
    future: asyncio.Future[tuple[ProductPrediction, BatchInfo]]
    submitted: float
    hashes: list[bytes] | None = None  # digests of the photos' bytes, for training-twin lookup


def _truncate(prediction: ProductPrediction, top_k: int) -> ProductPrediction:
    """Top-k of a request that shared a forward run at a larger k: the first k are the same answers."""
    if len(prediction.top) <= top_k and all(len(scores) <= top_k for scores in prediction.images):
        return prediction
    return dataclasses.replace(
        prediction, top=prediction.top[:top_k], images=[scores[:top_k] for scores in prediction.images]
    )


class Runner:
    """Admission control and the model thread shared by both modes."""

    def __init__(self, predictor: Predictor, config: ServeConfig) -> None:
        self.predictor = predictor
        self.config = config
        self._in_flight = 0  # admitted requests (decoding, queued or in a forward)
        self._submitted = 0  # of those, the ones handed to predict()
        self._held_bytes = 0  # decoded pixels of submitted requests, until their forward ends
        self._executor: ThreadPoolExecutor | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    @contextlib.contextmanager
    def hold(self, images: list[torch.Tensor]) -> Iterator[None]:
        """Count the request's pixels while it waits and runs; refuse it when the queue would pass its byte bound.

        A lone request is always taken (its images passed the per-photo limits already), so nothing is refused
        on an idle server.
        """
        size = sum(image.numel() * image.element_size() for image in images)
        if self._held_bytes and self._held_bytes + size > self.config.max_queued_bytes:
            raise OverloadedError(
                f"{self._held_bytes} bytes of pictures are already waiting (limit {self.config.max_queued_bytes});"
                " retry shortly"
            )
        self._held_bytes += size
        try:
            yield
        finally:
            self._held_bytes -= size

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prodcat-model")

    async def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request from before decoding until its answer; refuse it when too many are waiting."""
        if self._in_flight >= self.config.max_pending_requests:
            raise OverloadedError(f"{self._in_flight} requests are already waiting; retry shortly")
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    def _arriving(self) -> int:
        """Admitted requests not yet submitted (still decoding): worth waiting for."""
        return self._in_flight - self._submitted

    async def _forward(
        self, products: list[list[torch.Tensor]], top_k: int, hashes: list[list[bytes] | None] | None = None
    ) -> tuple[list[ProductPrediction], float, float]:
        """One predict_products call on the model thread; returns predictions, start and end times."""
        if self._executor is None:
            raise RuntimeError("runner is not started (the app's lifespan did not run)")
        # Only predictors with a twin index get hashes (a predictor without one need not accept the argument).
        extra = {"hashes": hashes} if hashes is not None and any(h is not None for h in hashes) else {}

        def timed() -> tuple[list[ProductPrediction], float, float]:
            started = time.perf_counter()
            predictions = self.predictor.predict_products(products, top_k=top_k, **extra)
            return predictions, started, time.perf_counter()

        predictions, started, finished = await asyncio.get_running_loop().run_in_executor(self._executor, timed)
        if len(predictions) != len(products):
            raise RuntimeError(f"predict_products returned {len(predictions)} predictions for {len(products)} products")
        return predictions, started, finished

    async def predict(
        self, images: list[torch.Tensor], top_k: int, hashes: list[bytes] | None = None
    ) -> tuple[ProductPrediction, BatchInfo]:
        raise NotImplementedError


class DirectRunner(Runner):
    """One forward per request, still on the model thread (the benchmark's baseline)."""

    async def predict(
        self, images: list[torch.Tensor], top_k: int, hashes: list[bytes] | None = None
    ) -> tuple[ProductPrediction, BatchInfo]:
        self._submitted += 1
        submitted = time.perf_counter()
        try:
            with self.hold(images):
                predictions, started, finished = await self._forward([images], top_k, [hashes])
        except OverloadedError:
            raise
        except Exception as error:
            log.exception("predictor failed on a request of %d images", len(images))
            raise ModelError("the model failed on this request") from error
        finally:
            self._submitted -= 1
        info = BatchInfo(1, len(images), (started - submitted) * 1e3, (finished - started) * 1e3)
        return _truncate(predictions[0], top_k), info


class MicroBatcher(Runner):
    """Requests from many clients share model forwards (see the module docstring)."""

    def __init__(self, predictor: Predictor, config: ServeConfig) -> None:
        super().__init__(predictor, config)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # forwards run, for tests and /health

    async def start(self) -> None:
        await super().start()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run_forever(), name="prodcat-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ModelError("server is shutting down"))
        await super().stop()

    async def predict(
        self, images: list[torch.Tensor], top_k: int, hashes: list[bytes] | None = None
    ) -> tuple[ProductPrediction, BatchInfo]:
        if self._task is None or self._wakeup is None:
            raise RuntimeError("micro-batcher is not started (the app's lifespan did not run)")
        future: asyncio.Future[tuple[ProductPrediction, BatchInfo]] = asyncio.get_running_loop().create_future()
        with self.hold(images):
            self._queue.append(_Pending(images, top_k, future, time.perf_counter(), hashes))
            self._submitted += 1
            self._wakeup.set()
            try:
                return await future
            finally:
                self._submitted -= 1

    async def _run_forever(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._run_batch(batch)
            except asyncio.CancelledError:
                _fail(batch, ModelError("server is shutting down"))
                raise
            except Exception:  # noqa: BLE001 - the batcher must outlive a bad batch, or every later request hangs
                log.exception("predictor failed on a batch of %d products", len(batch))
                _fail(batch, ModelError("the model failed on this request"))

    async def _wait(self, timeout: float | None) -> bool:
        """Wait for a submission; False on timeout."""
        assert self._wakeup is not None
        self._wakeup.clear()
        if self._queue:
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _collect(self) -> list[_Pending]:
        """The next batch: the first queued product plus what arrives within the window, up to max_batch_images."""
        while not self._queue:
            await self._wait(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.batch_window_ms / 1e3
        batch: list[_Pending] = []
        images = 0
        while True:
            if self._queue:
                if batch and images + len(self._queue[0].images) > self.config.max_batch_images:
                    break  # stays first in line for the next batch
                pending = self._queue.popleft()
                if not pending.future.done():  # a cancelled request needs no forward
                    batch.append(pending)
                    images += len(pending.images)
                continue
            remaining = deadline - loop.time()
            if images >= self.config.max_batch_images or remaining <= 0 or self._arriving() <= 0:
                break
            if not await self._wait(remaining):
                break
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        top_k = max(pending.top_k for pending in batch)
        predictions, started, finished = await self._forward(
            [pending.images for pending in batch], top_k, [pending.hashes for pending in batch]
        )
        self.batches += 1
        images = sum(len(pending.images) for pending in batch)
        for pending, prediction in zip(batch, predictions, strict=True):
            if not pending.future.done():
                info = BatchInfo(len(batch), images, (started - pending.submitted) * 1e3, (finished - started) * 1e3)
                pending.future.set_result((_truncate(prediction, pending.top_k), info))


def _fail(batch: list[_Pending], error: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)


def create_runner(predictor: Predictor, config: ServeConfig) -> Runner:
    """The micro-batcher, or one forward per request when `config.micro_batching` is False."""
    return MicroBatcher(predictor, config) if config.micro_batching else DirectRunner(predictor, config)
