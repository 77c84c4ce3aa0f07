"""HTTP serving: latency over the model alone, and micro-batching's throughput under load (CPU, 2 threads).

The servers are real uvicorn processes on loopback (one with micro-batching, one with one forward per request),
each with torch.set_num_threads(2); the clients run in this process. The model is a real backbone forward:
`--run W/runs/NAME` serves a trained run through the Predictor (`prodcat.predict`); without it (the default, as no run
is built here) a bench-local predictor implementing the same contract runs timm `efficientnet_lite0` (random init)
+ a linear layer over 60 classes at 180x180, one batched forward per call. Photos are 180x180 JPEGs (Cdiscount's
size) cut from scikit-image's sample pictures.

Results:
- serve_latency_vs_model: p50 of one-photo POST /v1/classify, sequential, on the micro-batching server, over the
  p50 of the predictor call on the same decoded photo in this process (A B A B ...). Goal <= 1.5.
- serve_microbatch_throughput_ratio: requests/s with micro-batching over requests/s with one forward per request:
  16 concurrent clients, 2,000 one-photo requests per mode (5% malformed), run in 4 interleaved chunks. Goal >= 2.
  `--mixed` sends products of 1-4 photos instead (Cdiscount's mix; the baseline's forwards are then partly
  batched already, so the ratio is lower), recorded as serve_microbatch_throughput_ratio_mixed. Each mode
  must answer zero 5xx, every valid request 200 and every malformed one 4xx (the benchmark fails otherwise).
- serve_memory_4_max_requests and serve_reliability_load (issue 12; see _serve_reliability.py): the peak RSS a
  server adds for 4 concurrent requests of 4 max-size pictures (goal < 200 MB), and a hostile load test (16
  clients, 2,000 requests, 5% malformed, 2% mutated pictures, slow clients; goal 0 5xx + 0 valid dropped).
  `--reliability` runs only these two.

    python benchmarks/bench_serve.py [--quick] [--reliability] [--run W/runs/NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _serve_reliability as reliability  # noqa: E402
from _common import cpu_model, write_result  # noqa: E402

FULL = {"latency_requests": 200, "load_requests": 2000, "clients": 16, "malformed_fraction": 0.05, "chunks": 4}
QUICK = {"latency_requests": 8, "load_requests": 64, "clients": 16, "malformed_fraction": 0.05, "chunks": 4}
LATENCY_GOAL = 1.5
THROUGHPUT_GOAL = 2.0
IMAGE_SIZE = 180
NUM_CLASSES = 60
THREADS = 2
PHOTOS_PER_PRODUCT = ((1, 0.55), (2, 0.25), (3, 0.12), (4, 0.08))  # roughly Cdiscount's mix


# -- the model -----------------------------------------------------------------------------------------------------
class BenchPredictor:
    """The Predictor contract over timm efficientnet_lite0 (random init) + linear head, 180x180, batched forward."""

    def __init__(self, seed: int = 0) -> None:
        import timm

        from prodcat.data.taxonomy import Taxonomy

        torch.manual_seed(seed)
        self.backbone = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
        self.head = torch.nn.Linear(self.backbone.num_features, NUM_CLASSES).eval()
        rows = [(1000000000 + i, f"LEVEL1 {i % 5}", f"LEVEL2 {i % 15}", f"LEAF {i}") for i in range(NUM_CLASSES)]
        self.taxonomy = Taxonomy.from_rows(rows)
        self.accept_threshold: float | None = 0.05
        self.aggregation = "mean_logprob"
        self.input_size = (IMAGE_SIZE, IMAGE_SIZE)  # the server decodes big uploads reduced towards it
        self.mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1) * 255
        self.std = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1) * 255

    def _preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        resized = []
        for image in images:
            batch = image.unsqueeze(0).float()
            if tuple(batch.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
                batch = torch.nn.functional.interpolate(
                    batch, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
                )
            resized.append(batch)
        return ((torch.cat(resized) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def _scores(self, log_probs: torch.Tensor, top_k: int) -> list[Any]:
        from prodcat.predict.predictor import CategoryScore

        values, labels = log_probs.topk(min(top_k, NUM_CLASSES))
        return [
            CategoryScore(
                int(label), int(self.taxonomy.category_ids[label]), float(value.exp()), *self.taxonomy.names(int(label))
            )
            for value, label in zip(values, labels, strict=True)
        ]

    @torch.inference_mode()
    def predict_products(self, products: list[list[torch.Tensor]], top_k: int = 5) -> list[Any]:
        from prodcat.predict.predictor import ProductPrediction

        images = [image for product in products for image in product]
        log_probs = torch.log_softmax(self.head(self.backbone(self._preprocess(images))), dim=1)
        predictions, start = [], 0
        for product in products:
            rows = log_probs[start : start + len(product)]
            start += len(product)
            product_log_probs = torch.log_softmax(rows.mean(dim=0), dim=0)
            top = self._scores(product_log_probs, top_k)
            accepted = self.accept_threshold is not None and top[0].probability >= self.accept_threshold
            predictions.append(
                ProductPrediction(
                    top, [self._scores(row, top_k) for row in rows], accepted, self.accept_threshold, self.aggregation
                )
            )
        return predictions

    def predict_product(self, images: list[torch.Tensor], top_k: int = 5) -> Any:
        return self.predict_products([images], top_k)[0]


def build_predictor(run: str | None) -> Any:
    if run:
        from prodcat.predict.predictor import Predictor

        return Predictor.load(run)
    return BenchPredictor()


def serve_child(port: int, micro_batching: bool, run: str | None, overrides: dict[str, Any]) -> None:
    """The server process: predictor, warm-up, uvicorn on loopback."""
    import uvicorn

    from prodcat.config import ServeConfig
    from prodcat.serve.app import create_app, uvicorn_options

    torch.set_num_threads(THREADS)
    predictor = build_predictor(run)
    photo = torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    for batch in (1, 4, 16, 32):  # allocator and kernels warm for the batch sizes the load test makes
        predictor.predict_products([[photo]] * batch)
    config = ServeConfig(run=run or "", port=port, micro_batching=micro_batching, **overrides)
    # The options `prodcat serve` uses (header timeout, 431): the slow clients of the reliability test need them.
    options = {**uvicorn_options(config), "host": "127.0.0.1"}
    uvicorn.run(create_app(predictor, config), **options, log_level="warning", access_log=False)


# -- photos and requests -------------------------------------------------------------------------------------------
def make_photos(count: int = 8) -> list[bytes]:
    """180x180 JPEGs: random square crops of scikit-image's sample photos (real texture, not noise)."""
    from PIL import Image
    from skimage import data

    sources = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]
    rng = random.Random(0)
    photos = []
    for index in range(count):
        picture = sources[index % len(sources)]
        side = rng.randint(min(picture.shape[:2]) // 2, min(picture.shape[:2]))
        top, left = rng.randint(0, picture.shape[0] - side), rng.randint(0, picture.shape[1] - side)
        crop = Image.fromarray(picture[top : top + side, left : left + side]).resize((IMAGE_SIZE, IMAGE_SIZE))
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _files(*payloads: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"photo{i}.jpg", payload, "image/jpeg")) for i, payload in enumerate(payloads)]


def malformed_requests(photo: bytes) -> list[dict[str, Any]]:
    """httpx.post keyword arguments of requests a server must answer with a 4xx."""
    only_field = b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n--b--\r\n'
    return [
        {"files": _files(b"this is a text file, not a photo\n" * 8)},
        {"files": _files(photo[: len(photo) // 2])},
        {"files": _files(b"")},
        {"content": only_field, "headers": {"content-type": "multipart/form-data; boundary=b"}},
        {"files": _files(*[photo] * 5)},
        {"files": _files(_bomb_png())},
        {"json": {"images": ["photo.jpg"]}},
    ]


def load_plan(
    photos: list[bytes], total: int, malformed_fraction: float, mixed: bool, seed: int = 0
) -> list[tuple[bool, dict]]:
    """(valid, request kwargs) for every request of the load test, malformed ones spread evenly."""
    rng = random.Random(seed)
    bad = malformed_requests(photos[0])
    every = max(1, round(1 / malformed_fraction))
    counts, weights = zip(*PHOTOS_PER_PRODUCT, strict=True)
    plan = []
    for index in range(total):
        if index % every == every - 1:
            plan.append((False, bad[(index // every) % len(bad)]))
        else:
            count = rng.choices(counts, weights)[0] if mixed else 1
            plan.append((True, {"files": _files(*rng.sample(photos, count))}))
    return plan


# -- servers -------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A uvicorn child process on a free loopback port; logs go to a temporary file."""

    def __init__(self, micro_batching: bool, run: str | None, max_batch_images: int | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="bench_serve_", suffix=".log", delete=False)
        command = [
            sys.executable,
            __file__,
            "--serve-child",
            str(self.port),
            "--mode",
            "batch" if micro_batching else "direct",
        ]
        command += (["--run", run] if run else []) + (
            ["--max-batch-images", str(max_batch_images)] * bool(max_batch_images)
        )
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}; log: {self.log.name}\n"
                    + Path(self.log.name).read_text()[-3000:]
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server did not answer /health within {timeout:.0f}s; log: {self.log.name}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server so far (Linux /proc; 0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        Path(self.log.name).unlink(missing_ok=True)


# -- (1) latency ---------------------------------------------------------------------------------------------------
def measure_latency(
    batch_server: ServerProcess,
    direct_server: ServerProcess,
    predictor: Any,
    photos: list[bytes],
    repeats: int,
    block: int = 5,
) -> dict[str, Any]:
    """Sequential one-photo requests to both servers and the in-process predictor call, in interleaved blocks.

    The model-only figure is measured twice: here, on a worker thread as the server runs it, and inside the
    server (the `timing_ms.model` of each answer: the same predict_products call, same process, same moment).
    The ratio divides by the SMALLER of the two, the conservative choice: on this shared machine the in-process
    figure has come out several times slower than the very same forward inside the server, and dividing by it
    would flatter the server.

    Blocks (A x5, B x5, C x5, A x5, ...) with a pause between them, not A B C A B C: the processes share two
    cores, and OpenMP threads keep spinning for a while after a forward, which would bill one process's idle
    spin to the next measurement in another process. Every timed call starts from a short idle, as a request to
    a server does.
    """
    from concurrent.futures import ThreadPoolExecutor

    from prodcat.data.images import decode_image

    decoded = [decode_image(photo) for photo in photos]
    samples: dict[str, list[float]] = {"http_batching": [], "http_direct": [], "model": [], "server_model": []}
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-model")
    with httpx.Client(timeout=60) as client, model_thread:

        def post(server: ServerProcess, index: int) -> float:
            response = client.post(f"{server.url}/v1/classify", files=_files(photos[index % len(photos)]))
            response.raise_for_status()
            return response.json()["timing_ms"]["model"] / 1e3

        def forward(index: int) -> None:
            image = decoded[index % len(decoded)]
            model_thread.submit(predictor.predict_products, [[image]], top_k=5).result()

        steps = {
            "http_batching": lambda i: post(batch_server, i),
            "http_direct": lambda i: post(direct_server, i),
            "model": forward,
        }
        for step in steps.values():  # warm-up: connections, first requests, allocator
            for index in range(5):
                step(index)
        for first in range(0, repeats, block):
            for name, step in steps.items():
                time.sleep(0.3)
                for index in range(first, min(first + block, repeats)):
                    time.sleep(0.01)
                    start = time.perf_counter()
                    server_model = step(index)
                    samples[name].append(time.perf_counter() - start)
                    if name == "http_batching":
                        samples["server_model"].append(server_model)
    return _latency_summary(samples, repeats)


def _latency_summary(samples: dict[str, list[float]], repeats: int) -> dict[str, Any]:
    ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    model = min(ms["model"], ms["server_model"])
    return {
        "ratio": ms["http_batching"] / model,
        "p50_http_ms": round(ms["http_batching"], 3),
        "p50_http_no_batching_ms": round(ms["http_direct"], 3),
        "p50_model_in_process_ms": round(ms["model"], 3),
        "p50_model_in_server_ms": round(ms["server_model"], 3),
        "p50_model_ms": round(model, 3),
        "ratio_no_batching": ms["http_direct"] / model,
        "p90_http_ms": round(float(np.percentile(samples["http_batching"], 90)) * 1e3, 3),
        "requests": repeats,
    }


# -- (2) load ------------------------------------------------------------------------------------------------------
async def _run_load(url: str, plan: list[tuple[bool, dict]], clients: int) -> dict[str, Any]:
    """`clients` workers send the plan's requests as fast as answers come back."""
    outcomes: list[tuple[bool, int, float, int]] = []  # valid, status (0 = transport error), seconds, batch
    queue = list(reversed(plan))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while queue:
                valid, kwargs = queue.pop()
                start = time.perf_counter()
                batch = 0
                try:
                    response = await client.post("/v1/classify", **kwargs)
                    status = response.status_code
                    if status == 200:
                        body = response.json()
                        batch = body["batch"]["products"] if len(body["top"]) == 5 else -1
                except httpx.HTTPError:
                    status = 0
                outcomes.append((valid, status, time.perf_counter() - start, batch))

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "outcomes": outcomes}


def _load_run(server: ServerProcess, plan: list[tuple[bool, dict]], clients: int) -> dict[str, Any]:
    """One load run, with the CPU time the server and this client process spent on it."""
    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    run = asyncio.run(_run_load(server.url, plan, clients))
    run["server_cpu"] = server.cpu_seconds() - server_cpu
    run["client_cpu"] = time.process_time() - client_cpu
    return run


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = [outcome for run in runs for outcome in run["outcomes"]]
    elapsed = sum(run["elapsed"] for run in runs)
    latencies = np.array([seconds for _, _, seconds, _ in outcomes]) * 1e3
    valid_batches = [batch for valid, status, _, batch in outcomes if valid and status == 200]
    return {
        "requests": len(outcomes),
        "seconds": round(elapsed, 3),
        "requests_per_s": len(outcomes) / elapsed,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "status_5xx": sum(1 for _, status, _, _ in outcomes if status >= 500),
        "transport_errors": sum(1 for _, status, _, _ in outcomes if status == 0),
        "valid_not_ok": sum(1 for valid, status, _, batch in outcomes if valid and (status != 200 or batch < 0)),
        "malformed_not_4xx": sum(1 for valid, status, _, _ in outcomes if not valid and not 400 <= status < 500),
        "malformed": sum(1 for valid, _, _, _ in outcomes if not valid),
        # Per request: how many products shared its forward (so a forward of n counts n times).
        "mean_products_per_forward": round(float(np.mean(valid_batches)), 2) if valid_batches else None,
        # Both share the same two cores: CPU per request shows what the client costs the server.
        "server_cpu_ms_per_request": round(sum(run["server_cpu"] for run in runs) * 1e3 / len(outcomes), 2),
        "client_cpu_ms_per_request": round(sum(run["client_cpu"] for run in runs) * 1e3 / len(outcomes), 2),
    }


def measure_load(
    batch_server: ServerProcess, direct_server: ServerProcess, photos: list[bytes], config: dict[str, Any]
) -> dict[str, Any]:
    """Both modes, the same requests, in interleaved chunks (batching, direct, batching, direct, ...)."""
    plan = load_plan(photos, config["load_requests"], config["malformed_fraction"], config["mixed"])
    chunks = [plan[i :: config["chunks"]] for i in range(config["chunks"])]
    _load_run(batch_server, plan[:32], config["clients"])  # warm-up, not counted
    _load_run(direct_server, plan[:32], config["clients"])
    runs: dict[str, list[dict[str, Any]]] = {"batching": [], "direct": []}
    for chunk in chunks:
        runs["batching"].append(_load_run(batch_server, chunk, config["clients"]))
        runs["direct"].append(_load_run(direct_server, chunk, config["clients"]))
    summary = {mode: _summarise(mode_runs) for mode, mode_runs in runs.items()}
    summary["ratio"] = summary["batching"]["requests_per_s"] / summary["direct"]["requests_per_s"]
    summary["images_per_request"] = round(float(np.mean([len(kw["files"]) for ok, kw in plan if ok])), 3)
    return summary


def _check_load(summary: dict[str, Any]) -> list[str]:
    problems = []
    for mode in ("batching", "direct"):
        result = summary[mode]
        for key in ("status_5xx", "transport_errors", "valid_not_ok", "malformed_not_4xx"):
            if result[key]:
                problems.append(f"{mode}: {key} = {result[key]}")
    return problems


# -- main ----------------------------------------------------------------------------------------------------------
def _report(latency: dict[str, Any] | None, load: dict[str, Any]) -> None:
    if latency is not None:
        print(
            f"latency p50: HTTP {latency['p50_http_ms']:.1f} ms (no batching {latency['p50_http_no_batching_ms']:.1f}"
            f" ms), model {latency['p50_model_ms']:.1f} ms (in this process {latency['p50_model_in_process_ms']:.1f},"
            f" inside the server {latency['p50_model_in_server_ms']:.1f}) -> {latency['ratio']:.2f}x",
            flush=True,
        )
    for mode in ("batching", "direct"):
        result = load[mode]
        print(
            f"load {mode:8s}: {result['requests_per_s']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, "
            f"p99 {result['p99_ms']:.0f} ms, 5xx {result['status_5xx']}, valid not ok {result['valid_not_ok']}, "
            f"malformed not 4xx {result['malformed_not_4xx']}, products/forward "
            f"{result['mean_products_per_forward']}, CPU ms/request server {result['server_cpu_ms_per_request']}"
            f" client {result['client_cpu_ms_per_request']}",
            flush=True,
        )


def _measure(args: argparse.Namespace, config: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Start both servers, then latency (skipped with --mixed) and the load test; servers always stopped."""
    photos = make_photos()
    servers = [ServerProcess(True, args.run, args.max_batch_images), ServerProcess(False, args.run)]
    try:
        predictor = build_predictor(args.run)
        predictor.predict_products([[torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)]])
        for server in servers:
            server.wait_ready()
        latency = None
        if not args.mixed:
            latency = measure_latency(servers[0], servers[1], predictor, photos, config["latency_requests"])
        return latency, measure_load(servers[0], servers[1], photos, config)
    finally:
        for server in servers:
            server.stop()


def run_reliability(args: argparse.Namespace, config: dict[str, Any]) -> list[str]:
    """Both issue-12 measurements on one micro-batching server with ServeConfig defaults; returns the problems."""
    from prodcat.config import ServeConfig

    photos = make_photos()
    load_before = os.getloadavg()  # the machine is shared: contention goes into the result beside the figures
    server = ServerProcess(True, args.run)
    try:
        server.wait_ready()
        pid, max_pixels = server.process.pid, ServeConfig().max_pixels
        memory = reliability.measure_memory(server.url, pid, max_pixels)
        plan = reliability.reliability_plan(photos, malformed_requests(photos[0]), config["load_requests"], _files)
        _load_run(server, plan[:32], config["clients"])  # warm-up, not counted
        load = reliability.measure_reliability(server.url, server.port, pid, plan, config["clients"])
    finally:
        server.stop()
    worst = memory.get("rise_mb", float("nan"))
    print(f"memory, 4 x 4 pictures at {max_pixels} pixels: rise {worst} MB; per kind {memory.get('kinds')}", flush=True)
    print(f"reliability load: {load}", flush=True)
    problems = [f"{key} = {load[key]}" for key in ("status_5xx", "transport_errors", "valid_not_ok") if load[key]]
    problems += [f"malformed_not_4xx = {load['malformed_not_4xx']}"] * bool(load["malformed_not_4xx"])
    details = {
        "threads": THREADS,
        "server": "uvicorn on 127.0.0.1, ServeConfig defaults",
        "clients": config["clients"],
        "cpu": cpu_model(),
        "load_average_1_5_15_before": [round(value, 2) for value in load_before],
        "load_average_1_5_15_after": [round(value, 2) for value in os.getloadavg()],
    }
    if not args.quick:
        write_result(
            "serve_memory_4_max_requests", worst, "MB", reliability.MEMORY_GOAL_MB, "<=", {**details, **memory}
        )
        write_result(
            "serve_reliability_load",
            load["status_5xx"] + load["valid_not_ok"],
            "failures",
            0,
            "<=",
            {**details, "problems": problems, **load},
        )
    return problems


def main() -> None:
    from prodcat.config import ServeConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, no result files")
    parser.add_argument("--mixed", action="store_true", help="only the load test, with products of 1-4 photos")
    parser.add_argument("--reliability", action="store_true", help="only the memory and hostile-load tests")
    parser.add_argument("--max-batch-images", type=int, default=None, help="override ServeConfig's, for tuning")
    parser.add_argument("--run", default=None, help="serve this trained run instead of the bench-local model")
    parser.add_argument("--serve-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("batch", "direct"), default="batch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child is not None:
        overrides = {"max_batch_images": args.max_batch_images} if args.max_batch_images else {}
        serve_child(args.serve_child, args.mode == "batch", args.run, overrides)
        return
    torch.set_num_threads(THREADS)
    config = {**(QUICK if args.quick else FULL), "mixed": args.mixed}
    if args.reliability:
        problems = run_reliability(args, config)
        if problems:
            raise SystemExit("reliability problems: " + "; ".join(problems))
        return
    latency, load = _measure(args, config)
    _report(latency, load)
    problems = _check_load(load)
    defaults = ServeConfig()
    model = args.run or f"bench-local timm efficientnet_lite0 (random init) + linear {NUM_CLASSES}, {IMAGE_SIZE}px"
    common = {
        "threads": THREADS,
        "model": model,
        "server": "uvicorn on 127.0.0.1, ServeConfig defaults",
        "batch_window_ms": defaults.batch_window_ms,
        "max_batch_images": args.max_batch_images or defaults.max_batch_images,
    }
    throughput_name = "serve_microbatch_throughput_ratio" + ("_mixed" if args.mixed else "")
    load_details = {
        **common,
        "clients": config["clients"],
        "malformed_fraction": config["malformed_fraction"],
        "problems": problems,
        **load,
    }
    if args.quick:
        if latency is not None:
            print(f"BENCH serve_latency_vs_model_quick {latency['ratio']:.2f} ratio (quick)")
        print(f"BENCH {throughput_name}_quick {load['ratio']:.2f} x (quick)")
    else:
        if latency is not None:
            write_result("serve_latency_vs_model", latency["ratio"], "ratio", LATENCY_GOAL, "<=", {**common, **latency})
        write_result(throughput_name, load["ratio"], "x", THROUGHPUT_GOAL, ">=", load_details)
    if not args.mixed:
        problems += run_reliability(args, config)
    if problems:
        raise SystemExit("load test problems: " + "; ".join(problems))


if __name__ == "__main__":
    main()
