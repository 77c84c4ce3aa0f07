"""The server under hostile load (issue 12), for bench_serve.py: memory of max-size requests, and a mixed load test.

(1) serve_memory_4_max_requests: 4 concurrent requests of 4 pictures each at the server's pixel limit (the issue's
    attack: small, compressible files declaring huge sizes), one picture kind after another (PNG, JPEG, WebP at its
    own lower limit, GIF). The value is the conservative one: the server's peak RSS over the whole sequence minus
    its RSS before the first (memory one kind leaves in the allocator is counted, not re-used for free); each
    kind's own rise (VmHWM reset before it) is in the details. Goal < 200 MB.
(2) serve_reliability_load: 16 clients, 2,000 requests: 5% malformed, 2% mutated pictures (bit flips, truncations,
    header edits), the rest valid products of 1-4 photos; meanwhile a few slow clients (headers trickling in, uploads
    stalling) reconnect again and again. Goal: 0 5xx and 0 valid requests not answered 200 (the value is their sum);
    details hold p50/p99 of the valid requests, what the slow clients got, and the server's peak RSS.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MEMORY_GOAL_MB = 200.0
SLOW_HEADER_CLIENTS = 3
SLOW_BODY_CLIENTS = 3


# -- server memory -------------------------------------------------------------------------------------------------
def _status_mb(pid: int, field: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0]) / 1024


def _reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def max_size_pictures(max_pixels: int) -> dict[str, bytes]:
    """One picture per kind at (just under) the pixel limit, 4:3, smooth so it compresses like the attack's."""
    from PIL import Image

    def smooth(pixels: int) -> np.ndarray:
        width = int((pixels * 4 / 3) ** 0.5)
        height = pixels // width
        y, x = np.mgrid[0:height, 0:width]
        return np.stack([(x * 255 // width), (y * 255 // height), ((x + y) % 256)], -1).astype(np.uint8)

    rgb = smooth(max_pixels)
    kinds = {
        "png_rgb": (Image.fromarray(rgb), "PNG", {"compress_level": 6}),
        "png_rgba": (Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG", {"compress_level": 6}),
        "jpeg_baseline": (Image.fromarray(rgb), "JPEG", {"quality": 90}),
        "jpeg_progressive_444": (Image.fromarray(rgb), "JPEG", {"quality": 90, "progressive": True, "subsampling": 0}),
        "webp_at_its_limit": (Image.fromarray(smooth(max_pixels // 4)), "WEBP", {"quality": 80}),
        "gif": (Image.fromarray(rgb).convert("P"), "GIF", {}),
    }
    out = {}
    for name, (image, fmt, options) in kinds.items():
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out[name] = buffer.getvalue()
    return out


async def _four_at_once(url: str, picture: bytes) -> list[int]:
    files = [("images", (f"big{i}.img", picture, "application/octet-stream")) for i in range(4)]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        responses = await asyncio.gather(*[client.post("/v1/classify", files=files) for _ in range(4)])
    return [response.status_code for response in responses]


def measure_memory(url: str, pid: int, max_pixels: int) -> dict[str, Any]:
    """Per picture kind: statuses of the 4 requests and how far the server's peak RSS rose over its RSS before."""
    pictures = max_size_pictures(max_pixels)
    small = pictures["jpeg_baseline"]
    asyncio.run(_four_at_once(url, small))  # warm-up on the photo path (threads started), not on a big decode
    time.sleep(0.5)
    start = _status_mb(pid, "VmRSS")
    kinds: dict[str, Any] = {}
    overall_peak = start
    for name, picture in pictures.items():
        time.sleep(0.5)
        before = _status_mb(pid, "VmRSS")
        if not _reset_peak(pid):
            return {"error": "cannot reset the server's peak RSS (/proc/PID/clear_refs)"}
        statuses = asyncio.run(_four_at_once(url, picture))
        kinds[name] = {
            "file_mb": round(len(picture) / 1e6, 3),
            "statuses": statuses,
            "rss_before_mb": round(before, 1),
            "peak_rise_mb": round(_status_mb(pid, "VmHWM") - before, 1),
        }
        overall_peak = max(overall_peak, _status_mb(pid, "VmHWM"))
    return {
        "rise_mb": round(overall_peak - start, 1),
        "rss_before_mb": round(start, 1),
        "peak_rss_mb": round(overall_peak, 1),
        "rss_after_mb": round(_status_mb(pid, "VmRSS"), 1),
        "max_pixels": max_pixels,
        "requests": 4,
        "pictures_per_request": 4,
        "kinds": kinds,
    }


# -- mutated pictures ----------------------------------------------------------------------------------------------
def mutate(data: bytes, rng: random.Random) -> bytes:
    """Bit flips, a truncation, header byte edits, or a run of 0x00/0xFF (the fuzz test's mutations, fewer)."""
    out = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(out))
            out[position] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del out[rng.randrange(1, len(out)) :]
    elif kind == 2:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(min(64, len(out)))] = rng.randrange(256)
    else:
        start = rng.randrange(len(out))
        out[start : start + rng.randint(1, 64)] = bytes([rng.choice((0, 255))]) * rng.randint(1, 64)
    return bytes(out)


def _other_formats(photos: list[bytes]) -> list[bytes]:
    from PIL import Image

    out = []
    for index, fmt in enumerate(("PNG", "WEBP", "GIF", "BMP")):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(photos[index % len(photos)])).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


def reliability_plan(
    photos: list[bytes], bad: list[dict[str, Any]], total: int, files: Any, seed: int = 0
) -> list[tuple[str, dict]]:
    """(kind, request kwargs): 'valid' (1-4 photos), 'malformed' (5%, must be 4xx), 'mutated' (2%, 200 or 4xx)."""
    rng = random.Random(seed)
    sources = photos + _other_formats(photos)
    plan: list[tuple[str, dict]] = []
    for index in range(total):
        if index % 20 == 19:
            plan.append(("malformed", bad[(index // 20) % len(bad)]))
        elif index % 50 == 7:
            plan.append(("mutated", {"files": files(mutate(rng.choice(sources), rng))}))
        else:
            count = rng.choices((1, 2, 3, 4), (0.55, 0.25, 0.12, 0.08))[0]
            plan.append(("valid", {"files": files(*rng.sample(photos, count))}))
    return plan


# -- slow clients --------------------------------------------------------------------------------------------------
async def _slow_client(port: int, body: bool, stop: asyncio.Event, outcomes: list[tuple[str, str, float]]) -> None:
    """Reconnects until `stop`: trickles its headers (or stalls its upload) and records what the server did."""
    kind = "slow_body" if body else "slow_header"
    while not stop.is_set():
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as error:
            outcomes.append((kind, f"connect failed: {type(error).__name__}", 0.0))
            await asyncio.sleep(1)
            continue
        head = b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        writer.write(head)

        async def trickle() -> None:
            while True:
                await asyncio.sleep(1.0)
                writer.write(b"X-Slow: 1\r\n" if not body else b"")
                await writer.drain()

        trickler = asyncio.create_task(trickle())
        try:
            answer = await asyncio.wait_for(reader.read(), timeout=120)
            status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer"
        except (TimeoutError, OSError) as error:
            status = f"{type(error).__name__}"
        finally:
            trickler.cancel()
            writer.close()
        outcomes.append((kind, status, time.perf_counter() - start))


# -- the load test -------------------------------------------------------------------------------------------------
async def _run(url: str, port: int, plan: list[tuple[str, dict]], clients: int) -> dict[str, Any]:
    outcomes: list[tuple[str, int, float]] = []
    slow: list[tuple[str, str, float]] = []
    queue = list(reversed(plan))
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while queue:
                kind, kwargs = queue.pop()
                start = time.perf_counter()
                try:
                    status = (await client.post("/v1/classify", **kwargs)).status_code
                except httpx.HTTPError:
                    status = 0
                outcomes.append((kind, status, time.perf_counter() - start))

        slow_tasks = [
            asyncio.create_task(_slow_client(port, index >= SLOW_HEADER_CLIENTS, stop, slow))
            for index in range(SLOW_HEADER_CLIENTS + SLOW_BODY_CLIENTS)
        ]
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        elapsed = time.perf_counter() - start
        stop.set()
        await asyncio.wait(slow_tasks, timeout=30)
        for task in slow_tasks:
            task.cancel()
    return {"elapsed": elapsed, "outcomes": outcomes, "slow": slow}


def measure_reliability(url: str, port: int, pid: int, plan: list[tuple[str, dict]], clients: int) -> dict[str, Any]:
    rss_before = _status_mb(pid, "VmRSS")
    _reset_peak(pid)
    run = asyncio.run(_run(url, port, plan, clients))
    outcomes = run["outcomes"]
    valid_ms = np.array([seconds for kind, status, seconds in outcomes if kind == "valid" and status == 200]) * 1e3
    count = {kind: sum(1 for k, _, _ in outcomes if k == kind) for kind in ("valid", "malformed", "mutated")}
    slow_statuses: dict[str, dict[str, int]] = {}
    for kind, status, _ in run["slow"]:
        slow_statuses.setdefault(kind, {})
        slow_statuses[kind][status] = slow_statuses[kind].get(status, 0) + 1
    return {
        "requests": len(outcomes),
        **{f"{kind}_requests": value for kind, value in count.items()},
        "seconds": round(run["elapsed"], 2),
        "requests_per_s": round(len(outcomes) / run["elapsed"], 2),
        "valid_p50_ms": round(float(np.percentile(valid_ms, 50)), 1) if valid_ms.size else None,
        "valid_p99_ms": round(float(np.percentile(valid_ms, 99)), 1) if valid_ms.size else None,
        "status_5xx": sum(1 for _, status, _ in outcomes if status >= 500),
        "transport_errors": sum(1 for _, status, _ in outcomes if status == 0),
        "valid_not_ok": sum(1 for kind, status, _ in outcomes if kind == "valid" and status != 200),
        "malformed_not_4xx": sum(1 for kind, status, _ in outcomes if kind == "malformed" and not 400 <= status < 500),
        "mutated_ok": sum(1 for kind, status, _ in outcomes if kind == "mutated" and status == 200),
        "mutated_4xx": sum(1 for kind, status, _ in outcomes if kind == "mutated" and 400 <= status < 500),
        "slow_clients": {"header": SLOW_HEADER_CLIENTS, "body": SLOW_BODY_CLIENTS, "outcomes": slow_statuses},
        "slow_mean_seconds_to_cut": round(float(np.mean([s for _, _, s in run["slow"]])), 2) if run["slow"] else None,
        "server_rss_before_mb": round(rss_before, 1),
        "server_peak_rss_mb": round(_status_mb(pid, "VmHWM"), 1),
    }
