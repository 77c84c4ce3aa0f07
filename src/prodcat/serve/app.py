"""FastAPI app: decode request -> Predictor (micro-batched) -> JSON; plus the web page at `/`.

Routes: POST /v1/classify, GET /v1/categories, GET /health, GET / (web page), /docs (OpenAPI).
Every error a client can cause is a 4xx `{"error": {"code", "message"}}`; anything else is a logged JSON 500
that leaks no traceback. Uploads are limited while they stream in (per file and per request, in bytes and in time:
`body_timeout_s`, `body_idle_timeout_s`), a request counts against `max_pending_requests` from before its upload is
read, image sizes are checked from the header before decoding, pictures are decoded reduced towards the model's
input size on `decode_threads` threads, and the model runs on its own thread. Header timeouts and the 431 for
oversized headers live in the HTTP protocol (`prodcat.serve.protocol`), as uvicorn has neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prodcat.config import ServeConfig
from prodcat.data.images import ALLOWED_FORMATS, DecodedImage, ImageDecodeError, decode_image_sized
from prodcat.serve.batching import BatchInfo, ModelError, OverloadedError, Runner, create_runner
from prodcat.utils import get_logger

if TYPE_CHECKING:
    from prodcat.predict.predictor import CategoryScore, Predictor, ProductPrediction

__all__ = ["ApiError", "STATIC_DIR", "create_app", "serve"]

log = get_logger("prodcat.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_TOP_K = 100
_FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, part headers and the small top_k field


class ApiError(Exception):
    """A client error answered as `{"error": {"code", "message"}}` with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# -- upload parsing ------------------------------------------------------------------------------------------------
class _FileTooLarge(Exception):
    def __init__(self, filename: str | None) -> None:
        self.filename = filename


class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _LimitedMultiPartParser(MultiPartParser):
    """Starlette's parser, but a part over `max_part_bytes` is refused as it streams in, before it is spooled."""

    def __init__(self, *args: Any, max_part_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_part_bytes = max_part_bytes
        self._part_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        if self._part_bytes > self.max_part_bytes:
            upload = getattr(getattr(self, "_current_part", None), "file", None)
            raise _FileTooLarge(getattr(upload, "filename", None))
        super().on_part_data(data, start, end)


async def _limited_stream(request: Request, limit: int, config: ServeConfig) -> AsyncIterator[bytes]:
    """The body, refused past `limit` bytes, past `body_timeout_s` in all or `body_idle_timeout_s` between chunks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.body_timeout_s
    chunks = request.stream().__aiter__()
    received = 0
    while True:
        wait = min(config.body_idle_timeout_s, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _BodyTooSlow from None
        received += len(chunk)
        if received > limit:
            raise _BodyTooLarge
        yield chunk


async def _parse_form(request: Request, config: ServeConfig) -> FormData:
    """The multipart form, refusing oversized files and bodies while they arrive."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the photos as multipart/form-data (field 'images'), not {content_type or 'no type'!r}",
        )
    body_limit = config.max_images * config.max_upload_bytes + _FORM_OVERHEAD_BYTES
    too_large = ApiError(
        413,
        "request_too_large",
        f"request body is over {body_limit} bytes "
        f"({config.max_images} photos of at most {config.max_upload_bytes} bytes each)",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise too_large
    parser = _LimitedMultiPartParser(
        request.headers,
        _limited_stream(request, body_limit, config),
        max_files=config.max_images + 16,
        max_fields=16,
        max_part_bytes=config.max_upload_bytes,
    )
    try:
        return await parser.parse()
    except _FileTooLarge as error:
        name = f" {error.filename!r}" if error.filename else ""
        raise ApiError(
            413, "file_too_large", f"file{name} is over the limit of {config.max_upload_bytes} bytes per photo"
        ) from None
    except _BodyTooLarge:
        raise too_large from None
    except _BodyTooSlow:
        raise ApiError(
            408,
            "request_timeout",
            f"the upload did not arrive in time (at most {config.body_timeout_s:g} s in all, "
            f"{config.body_idle_timeout_s:g} s without data); retry on a faster connection",
            {"Connection": "close"},
        ) from None
    except MultiPartException as error:
        if error.message.startswith("Too many files"):
            raise ApiError(422, "too_many_images", f"at most {config.max_images} photos per product") from None
        raise ApiError(400, "malformed_form", f"could not parse the multipart form: {error.message}") from None


def _uploads(form: FormData, config: ServeConfig) -> list[UploadFile]:
    """The `images` files of the form, 1..max_images of them."""
    values = form.getlist("images")
    not_files = [value for value in values if not isinstance(value, UploadFile)]
    if not_files:
        raise ApiError(
            422,
            "images_not_files",
            f"field 'images' must hold files (multipart parts with a filename), got {len(not_files)} text value(s)",
        )
    if not values:
        others = sorted({key for key, value in form.multi_items() if isinstance(value, UploadFile)})
        hint = f"; got files under {', '.join(map(repr, others))}" if others else ""
        raise ApiError(
            422, "no_images", f"no photo uploaded: send 1 to {config.max_images} files in field 'images'{hint}"
        )
    if len(values) > config.max_images:
        raise ApiError(
            422, "too_many_images", f"{len(values)} photos uploaded; at most {config.max_images} per product"
        )
    return values  # type: ignore[return-value]


def _top_k(query_value: int | None, form: FormData, config: ServeConfig) -> int:
    if query_value is not None:
        return query_value
    raw = form.get("top_k")
    if raw is None or raw == "":
        return config.top_k
    text = raw.strip() if isinstance(raw, str) else ""
    # ASCII digits only: str.isdigit() also takes '²' and '٣', and int() of 4,301+ digits raises.
    if not (0 < len(text) <= 3 and text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_TOP_K):
        shown = repr(raw[:40]) if isinstance(raw, str) else "a file"
        raise ApiError(422, "invalid_top_k", f"top_k must be an integer in 1..{MAX_TOP_K}, got {shown}")
    return int(text)


def _decode_all(
    uploads: Sequence[UploadFile], max_pixels: int, reduce_to: tuple[int, int] | None
) -> list[DecodedImage]:
    """Read and decode every upload (runs on a decode thread); the first failure names its file."""
    images = []
    for index, upload in enumerate(uploads):
        upload.file.seek(0)
        data = upload.file.read()
        try:
            images.append(decode_image_sized(data, max_pixels=max_pixels, reduce_to=reduce_to))
        except ImageDecodeError as error:
            where = _where(index, upload)
            if error.reason.startswith("too many pixels"):
                raise ApiError(
                    413, "image_too_large", f"{where}: {error.reason}; the limit is {max_pixels} pixels"
                ) from None
            raise ApiError(422, "invalid_image", f"{where}: {error.reason}") from None
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises, the picture bytes caused it: 4xx
            log.warning("%s: decoder raised %s: %s", _where(index, upload), type(error).__name__, error)
            raise ApiError(422, "invalid_image", f"{_where(index, upload)}: could not decode") from None
        finally:
            del data  # the encoded bytes are not needed once decoded (up to max_upload_bytes each)
    return images


def _upload_digests(uploads: Sequence[UploadFile]) -> list[bytes]:
    """xxh3_128 of each upload's bytes, as ingest hashes pictures: the key of the training-twin lookup."""
    from prodcat.features.extract import picture_digest

    digests = []
    for upload in uploads:
        upload.file.seek(0)
        digests.append(picture_digest(upload.file.read()))
    return digests


def _where(index: int, upload: UploadFile) -> str:
    return f"images[{index}] {upload.filename!r}" if upload.filename else f"images[{index}]"


# -- response ------------------------------------------------------------------------------------------------------
PROBABILITY_DIGITS = 4  # decimals: finer than any decision the page or a threshold makes, without float noise


def _probability(value: float | None) -> float | None:
    return None if value is None else round(float(value), PROBABILITY_DIGITS)


def _score_json(score: CategoryScore, rank: int) -> dict[str, Any]:
    return {
        "rank": rank,
        "label": int(score.label),
        "category_id": int(score.category_id),
        "probability": _probability(score.probability),
        "level1": score.level1,
        "level2": score.level2,
        "level3": score.level3,
    }


def _scores_json(scores: Sequence[CategoryScore]) -> list[dict[str, Any]]:
    return [_score_json(score, rank) for rank, score in enumerate(scores, start=1)]


def _classify_json(
    prediction: ProductPrediction,
    uploads: Sequence[UploadFile],
    images: Sequence[DecodedImage],
    info: BatchInfo,
    decode_ms: float,
    started: float,
) -> dict[str, Any]:
    matches = getattr(prediction, "training_matches", None)
    per_image = [
        {
            "index": index,
            "filename": upload.filename,
            "width": image.width,
            "height": image.height,
            "top": _scores_json(scores),
        }
        for index, (upload, image, scores) in enumerate(zip(uploads, images, prediction.images, strict=True))
    ]
    return {
        "top": _scores_json(prediction.top),
        "accepted": bool(prediction.accepted),
        "threshold": _probability(prediction.threshold),
        "aggregation": prediction.aggregation,
        # Photos byte-identical to training pictures, and how many training products hold them (null: none).
        "training_matches": None if matches is None else matches.as_json(),
        # Words read on each picture when the run has a text model (prodcat text-head); null otherwise.
        "ocr_words": getattr(prediction, "ocr_words", None),
        "images": per_image,
        "batch": {"products": info.products, "images": info.images},
        "timing_ms": {
            "decode": round(decode_ms, 3),
            "queue": round(info.queue_ms, 3),
            "model": round(info.model_ms, 3),
            "total": round((time.perf_counter() - started) * 1e3, 3),
        },
    }


# -- routes --------------------------------------------------------------------------------------------------------
_ERROR_SCHEMA = {
    "content": {
        "application/json": {
            "example": {"error": {"code": "invalid_image", "message": "images[0] 'a.jpg': not an image"}}
        }
    }
}
_CLASSIFY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": 4,
                            "description": "1 to 4 photos of ONE product (JPEG, PNG, WebP, ...)",
                        },
                        "top_k": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_TOP_K,
                            "description": "how many categories to return (the query parameter wins)",
                        },
                    },
                }
            }
        },
    }
}

router = APIRouter()


@router.post(
    "/v1/classify",
    openapi_extra=_CLASSIFY_OPENAPI,
    summary="Categorise one product from its photos",
    responses={
        status: {"description": text, **_ERROR_SCHEMA}
        for status, text in (
            (400, "malformed multipart form"),
            (413, "file, request or image too large"),
            (415, "not multipart/form-data"),
            (422, "no/too many photos, not an image, bad top_k"),
            (503, "too many requests waiting"),
        )
    },
)
async def classify(
    request: Request, top_k: int | None = Query(None, ge=1, le=MAX_TOP_K, description="categories to return")
) -> JSONResponse:
    """Top-k leaf categories of the product (aggregated over its photos), per-photo top-k, and auto-accept."""
    started = time.perf_counter()
    state = request.app.state
    config: ServeConfig = state.config
    runner: Runner = state.runner
    with runner.admit():  # from before the upload is read: slow uploads count against the pending limit
        form = await _parse_form(request, config)
        try:
            uploads = _uploads(form, config)
            k = min(_top_k(top_k, form, config), state.predictor.taxonomy.num_classes)
            decode_start = time.perf_counter()
            loop = asyncio.get_running_loop()
            images = await loop.run_in_executor(
                state.decode_pool, _decode_all, uploads, config.max_pixels, state.decode_size
            )
            decode_ms = (time.perf_counter() - decode_start) * 1e3
            hashes = await asyncio.to_thread(_upload_digests, uploads) if state.hash_uploads else None
            prediction, info = await runner.predict([image.pixels for image in images], k, hashes)
        finally:
            await form.close()
    return JSONResponse(_classify_json(prediction, uploads, images, info, decode_ms, started))


@router.get("/v1/categories", summary="The category taxonomy, paginated")
async def categories(
    request: Request,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> dict[str, Any]:
    """Leaves in label order (0 = most frequent in training) with their names at all three levels."""
    items: list[dict[str, Any]] = request.app.state.categories
    return {"total": len(items), "offset": offset, "limit": limit, "items": items[offset : offset + limit]}


@router.get("/health", summary="Liveness and model information")
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    config: ServeConfig = state.config
    runner: Runner = state.runner
    return {
        "status": "ok",
        "model": state.model_info,
        "serving": {
            "micro_batching": config.micro_batching,
            "batch_window_ms": config.batch_window_ms,
            "max_batch_images": config.max_batch_images,
            "in_flight": runner.in_flight,
            "queued_bytes": runner.held_bytes,
            "batches": getattr(runner, "batches", None),
        },
        "limits": {
            "max_images": config.max_images,
            "max_upload_bytes": config.max_upload_bytes,
            "max_pixels": config.max_pixels,
            "max_queued_bytes": config.max_queued_bytes,
            "formats": list(ALLOWED_FORMATS),
            "default_top_k": config.top_k,
            "max_top_k": MAX_TOP_K,
        },
    }


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))


# -- errors --------------------------------------------------------------------------------------------------------
def _validation_message(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()))
        parts.append(f"{location}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(OverloadedError)
    async def overloaded(_: Request, error: OverloadedError) -> JSONResponse:
        return _error_response(503, "overloaded", str(error), {"Retry-After": "1"})

    @app.exception_handler(ModelError)
    async def model_error(_: Request, error: ModelError) -> JSONResponse:
        return _error_response(500, "model_error", f"{error}; the server log has the details")

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(422, "invalid_request", _validation_message(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(
            error.status_code,
            _HTTP_CODES.get(error.status_code, "http_error"),
            str(error.detail),
            getattr(error, "headers", None),
        )


class _InternalErrorMiddleware:
    """Any unexpected exception -> logged, answered as a JSON 500 without traceback; the server keeps serving."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # Nobody is left to answer, and nothing is wrong with the server: one line, no traceback.
            client = scope.get("client") or ("?", 0)
            log.warning("client %s:%s disconnected during %s %s", *client[:2], scope.get("method"), scope.get("path"))
        except Exception:
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if response_started:
                raise
            response = _error_response(500, "internal_error", "internal server error; the server log has the details")
            await response(scope, receive, send)


# -- app -----------------------------------------------------------------------------------------------------------
def _model_info(predictor: Predictor, config: ServeConfig) -> dict[str, Any]:
    taxonomy = predictor.taxonomy
    run_dir = Path(config.run).resolve() if config.run else getattr(predictor, "run_dir", None)
    info: dict[str, Any] = {
        # The run's name, not the path as typed on the command line (which may reveal the server's layout).
        "run": None if run_dir is None else Path(run_dir).name,
        "evaluation": _evaluation_info(predictor, run_dir),
        "num_classes": int(taxonomy.num_classes),
        "num_level1": int(taxonomy.num_level1),
        "num_level2": int(taxonomy.num_level2),
        "accept_threshold": predictor.accept_threshold,
    }
    extract_config = getattr(predictor, "extract_config", None)
    for key, value in (
        ("backbone", getattr(extract_config, "backbone", None)),
        ("aggregation", getattr(predictor, "aggregation", None)),
        ("device", getattr(predictor, "device", None)),
        ("text_model", getattr(getattr(predictor, "text_model", None), "kind", None)),  # late | concat | absent
    ):
        if value is not None:
            info[key] = str(value)
    return info


def _evaluation_info(predictor: Predictor, run_dir: Path | None) -> dict[str, Any] | None:
    """The run's held-out product accuracy (from `prodcat evaluate`), for the page to name; None before evaluation."""
    from prodcat.errors import UserError
    from prodcat.predict.run import read_evaluation

    run = getattr(predictor, "run", None)  # the run folder a loaded Predictor read (prodcat.predict.run)
    try:
        metrics = run.metrics if run is not None else read_evaluation(run_dir) if run_dir is not None else {}
        if not metrics:
            return None
        product = metrics["product"]
        return {
            "split": metrics.get("split"),
            "product_top1": _probability(product["top1"]),
            "product_top1_ci95": [_probability(v) for v in product.get("top1_ci95") or []] or None,
            "products": product.get("n", metrics.get("products")),
        }
    except (UserError, KeyError, TypeError) as error:  # an unreadable or odd metrics.json names nothing
        log.warning("%s: %s", run_dir, error)
        return None


def _category_items(predictor: Predictor) -> list[dict[str, Any]]:
    taxonomy = predictor.taxonomy
    return [
        {**taxonomy.describe(label), "train_count": int(taxonomy.train_counts[label])}
        for label in range(taxonomy.num_classes)
    ]


def _decode_size(predictor: Predictor) -> tuple[int, int] | None:
    """The model's input (H, W), towards which uploads are decoded reduced; None decodes them at full size."""
    size = getattr(predictor, "input_size", None)  # a predictor may say it directly (the benchmark's does)
    if size is None:
        extract_config = getattr(predictor, "extract_config", None)
        if extract_config is None:
            return None
        from prodcat.features.extractor import input_size

        try:
            size = input_size(extract_config)  # what the predictor's FeatureExtractor resizes pictures to
        except Exception as error:  # noqa: BLE001 - serving still works, only without reduced decoding
            log.warning("no input size for backbone %r (%s); pictures decode at full size", extract_config, error)
            return None
    return int(size[0]), int(size[1])


def _swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-bundle-v2 package, so /docs works offline; None when not installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(str(swagger_ui_bundle.swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


def _install_docs(app: FastAPI, config: ServeConfig) -> None:
    """/docs from local files (never a CDN: the page would be blank offline), or no /docs at all."""
    assets = _swagger_assets() if config.docs else None
    if config.docs and assets is None:
        log.warning("swagger-ui-bundle-v2 is not installed: /docs is off (/openapi.json still describes the API)")
    if assets is None:
        return
    from fastapi.openapi.docs import get_swagger_ui_html

    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="prodcat API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


def create_app(predictor: Predictor, config: ServeConfig | None = None) -> FastAPI:
    """The app over a loaded predictor; the runner (micro-batcher) and the decode threads live with its lifespan."""
    config = config or ServeConfig()
    runner = create_runner(predictor, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Its own few threads, not the loop's default pool: at most decode_threads full-size decodes at once.
        app.state.decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="prodcat-decode")
        await runner.start()
        try:
            yield
        finally:
            await runner.stop()
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="prodcat",
        version="0.1.0",
        lifespan=lifespan,
        description="Categorise a new product from 1-4 photos into the Cdiscount category tree.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if config.docs else None,
    )
    app.state.predictor, app.state.config, app.state.runner = predictor, config, runner
    app.state.decode_size = _decode_size(predictor)
    app.state.model_info = _model_info(predictor, config)
    app.state.categories = _category_items(predictor)
    app.state.hash_uploads = bool(getattr(predictor, "has_twins", False))  # builds the twin index before serving
    _install_error_handlers(app)
    app.add_middleware(_InternalErrorMiddleware)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _install_docs(app, config)
    return app


def _warm_up(predictor: Predictor) -> None:
    """One forward before the first client, so its latency is not the model's first-call setup."""
    import torch

    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    predictor.predict_product([torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator)])
    log.info("warm-up forward took %.0f ms", (time.perf_counter() - start) * 1e3)


def serve(config: ServeConfig) -> None:
    """Load `config.run` (or the exported `config.onnx`), then serve the API and the web page with uvicorn."""
    import uvicorn

    from prodcat.predict.predictor import Predictor

    if not config.run and not config.onnx:
        from prodcat.config import ConfigError  # a ValueError too, and one line on the command line

        raise ConfigError("serve needs a run directory (--run W/runs/NAME) or an exported file (--onnx model.onnx)")
    check_port(config.host, config.port)  # before the model loads and before "serving on ..." is printed
    if config.onnx:  # the exported graph (prodcat export) through ONNX Runtime: same contract, no PyTorch model
        from prodcat.predict.onnx_predictor import OnnxPredictor

        predictor = OnnxPredictor.load(config.onnx)
    else:
        predictor = Predictor.load(config.run)
    _warm_up(predictor)
    log.info(
        "serving %s on http://%s:%d (micro-batching %s)",
        config.onnx or config.run,
        config.host,
        config.port,
        "on" if config.micro_batching else "off",
    )
    uvicorn.run(create_app(predictor, config), **uvicorn_options(config), log_level="info")


def check_port(host: str, port: int) -> None:
    """Bind and release host:port the way uvicorn will (SO_REUSEADDR), so a taken port is one clear line now."""
    import socket

    from prodcat.errors import UserError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UserError(f"--host {host!r}: cannot resolve it ({error.strerror}); pass an address such as 127.0.0.1")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise UserError(
                f"cannot listen on {host}:{port} ({error.strerror}); pass another --port, or stop what uses it"
            ) from None


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """uvicorn.run keywords: loopback host/port, the guarded h11 protocol (header timeout, 431), keep-alive."""
    from prodcat.serve.protocol import guarded_h11_protocol

    return {
        "host": config.host,
        "port": config.port,
        "http": guarded_h11_protocol(config.header_timeout_s),
        "h11_max_incomplete_event_size": config.max_header_bytes,
        "timeout_keep_alive": 5,
        "ws": "none",  # no WebSocket routes: an upgrade would only hand the connection to code that is never used
    }
