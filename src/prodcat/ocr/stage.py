"""`prodcat ocr`: read the words on catalog pictures into Parquet tables, resumably, with parallel workers.

Outputs under W/ocr/:
  words.parquet     product_id, image_index, word_index, word, confidence, left, top, right, bottom
  pictures.parquet  product_id, image_index, split, status (ok | no_text | failed | skipped), reason, words,
                    text_score, seconds
  summary.json      pictures read, share with text, pictures/s, hours extrapolated to Cdiscount's 12.4 M pictures
  examples.png      a few pictures with the words and boxes read (drawn from these tables by
                    prodcat.report.ocr_examples: the stage writes tables only)
  plan.json, config.json, shards/  the plan, the config, and per-shard parts with their done markers
Work unit = one shard of the picture plan, written atomically with a marker last; a killed run resumes with only
the shards that have no marker. One OCR engine per worker process (one thread each: Tesseract's own threading
gains little on small pictures, processes scale with the cores).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prodcat.config import ConfigError, OcrConfig, save_config  # OcrConfig re-exported: its users import it here
from prodcat.data.bson_index import BsonReader
from prodcat.data.catalog import catalog_source, load_catalog
from prodcat.ocr.engine import OcrEngine, create_engine
from prodcat.ocr.select import create_selector, text_score
from prodcat.ocr.text_features import TextFeatureConfig, normalise
from prodcat.utils import get_logger, progress, read_json, write_json, write_parquet

__all__ = [
    "OcrConfig",
    "OcrError",
    "PicturePlan",
    "plan_pictures",
    "read_picture",
    "run_ocr",
    "ocr_dir",
    "has_text",
    "CDISCOUNT_PICTURES",
]

CDISCOUNT_PICTURES = 12_371_293  # Kaggle train.bson: 12.4 M pictures
log = get_logger("prodcat.ocr")
# Test hook: pause after each shard so a kill -9 test can land mid-run deterministically.
_SLOW_SHARDS = float(os.environ.get("PRODCAT_OCR_SLOW_SHARDS", "0"))
_WORDS_SCHEMA = pa.schema(
    [
        ("product_id", pa.int64()),
        ("image_index", pa.int16()),
        ("word_index", pa.int32()),
        ("word", pa.string()),
        ("confidence", pa.float32()),
        ("left", pa.int16()),
        ("top", pa.int16()),
        ("right", pa.int16()),
        ("bottom", pa.int16()),
    ]
)
_PICTURES_SCHEMA = pa.schema(
    [
        ("product_id", pa.int64()),
        ("image_index", pa.int16()),
        ("split", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("words", pa.int32()),
        ("text_score", pa.int32()),
        ("seconds", pa.float32()),
    ]
)
_PLAN_KEYS = ("splits", "engine", "select", "shard_size", "limit")


class OcrError(RuntimeError):
    """The stage cannot go on (e.g. W/ocr holds a run made with other settings)."""


def ocr_dir(workdir: str | Path) -> Path:
    return Path(workdir) / "ocr"


@dataclasses.dataclass
class PicturePlan:
    """One entry per picture, in catalog order, with where to read it."""

    sources: list[str]  # BSON paths
    source: np.ndarray  # (N,) index into sources
    offset: np.ndarray  # (N,) product document offset
    length: np.ndarray  # (N,) product document length
    product_id: np.ndarray
    image_index: np.ndarray
    split: np.ndarray  # (N,) object: train | val | test

    def __len__(self) -> int:
        return len(self.product_id)

    def part(self, start: int, stop: int) -> PicturePlan:
        cut = slice(start, stop)
        return PicturePlan(
            self.sources,
            self.source[cut],
            self.offset[cut],
            self.length[cut],
            self.product_id[cut],
            self.image_index[cut],
            self.split[cut],
        )


def plan_pictures(workdir: str | Path, splits: tuple[str, ...], limit: int | None = None) -> PicturePlan:
    """Expand catalog products into one entry per picture: train/val/holdout from train.bson, test from test.bson."""
    sources: list[str] = []
    parts: list[dict[str, np.ndarray]] = []
    for split in splits:
        name = "test" if split == "test" else "train"
        table = load_catalog(workdir, name, split=None if name == "test" else split)
        if limit is not None:
            table = table.slice(0, limit)
        path = str(catalog_source(workdir, name))
        if path not in sources:
            sources.append(path)
        repeat = np.maximum(table["num_images"].to_numpy().astype(np.int64), 0)
        total = int(repeat.sum())
        parts.append(
            {
                "source": np.full(total, sources.index(path), dtype=np.int64),
                "offset": np.repeat(table["offset"].to_numpy(), repeat),
                "length": np.repeat(table["length"].to_numpy(), repeat),
                "product_id": np.repeat(table["product_id"].to_numpy(), repeat),
                "image_index": np.arange(total) - np.repeat(np.cumsum(repeat) - repeat, repeat),
                "split": np.full(total, split, dtype=object),
            }
        )
    if not parts:
        raise ConfigError("no splits to read")
    merged = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return PicturePlan(sources, **merged)


# One engine, selector and set of BSON readers per worker process, made once by _init_worker.
_WORKER: dict[str, Any] = {}


def _init_worker(engine: str | OcrEngine, select: str) -> None:
    # One thread per worker: the cores are shared out by processes (set before tesserocr loads OpenMP).
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    import prodcat.data.images  # noqa: F401 - loaded (with torch) now, so the first picture's time is its own

    _WORKER["engine"] = create_engine(engine) if isinstance(engine, str) else engine
    _WORKER["select"] = create_selector(select)
    _WORKER["readers"] = {}


def has_text(words: list[Any]) -> bool:
    """A picture has text when one word is a word to the text features too (sure enough, 2+ letters or digits):
    engines read stray marks (")", "4") off photos, which should not count as text."""
    config = TextFeatureConfig()
    sure = [word.text for word in words if word.confidence >= config.min_confidence]
    return any(len(token) >= config.min_length for text in sure for token in normalise(text))


def read_picture(plan: PicturePlan, row: int, cache: dict) -> Any:
    """Decoded RGB picture `row` of the plan (the product's document is read once for all its pictures)."""
    from prodcat.data.images import ImageDecodeError, decode_pil

    readers = _WORKER.setdefault("readers", {})
    key = (int(plan.source[row]), int(plan.offset[row]))
    if cache.get("key") != key:
        if key[0] not in readers:
            readers[key[0]] = BsonReader(plan.sources[key[0]])
        cache["key"], cache["pictures"] = key, readers[key[0]].pictures(key[1], int(plan.length[row]))
    index = int(plan.image_index[row])
    if index >= len(cache["pictures"]):
        raise ImageDecodeError(f"picture {index} missing from the product document")
    return decode_pil(cache["pictures"][index])


def _ocr_picture(plan: PicturePlan, row: int, cache: dict) -> tuple[dict[str, Any], list[Any]]:
    """Status row and words of one picture. Any failure (bad bytes, engine error) is recorded, never raised."""
    where = f"product {int(plan.product_id[row])} picture {int(plan.image_index[row])} (offset {int(plan.offset[row])})"
    status: dict[str, Any] = {"status": "failed", "reason": "", "words": 0, "text_score": -1, "seconds": 0.0}
    start = time.perf_counter()
    try:
        image = read_picture(plan, row, cache)
        status["text_score"] = text_score(image)
        context = {
            "product_id": int(plan.product_id[row]),
            "image_index": int(plan.image_index[row]),
            "split": str(plan.split[row]),
            "text_score": status["text_score"],
        }
        if not _WORKER["select"](image, context):
            status["status"] = "skipped"
            return status, []
        words = _WORKER["engine"].read(image)
        status.update(status="ok" if has_text(words) else "no_text", words=len(words))
        return status, words
    except Exception as error:  # noqa: BLE001 - one bad picture is reported, the run goes on
        status["reason"] = f"{where}: {type(error).__name__}: {error}"
        return status, []
    finally:
        status["seconds"] = time.perf_counter() - start


def _run_shard(shard: int, plan: PicturePlan, folder: str) -> dict[str, Any]:
    """OCR one shard's pictures and write its two parts, then its done marker (last, so a kill leaves none)."""
    start = time.perf_counter()
    pictures: dict[str, list] = {name: [] for name in _PICTURES_SCHEMA.names}
    words: dict[str, list] = {name: [] for name in _WORDS_SCHEMA.names}
    cache: dict = {}
    for row in range(len(plan)):
        status, found = _ocr_picture(plan, row, cache)
        ids = {"product_id": int(plan.product_id[row]), "image_index": int(plan.image_index[row])}
        for name, value in {**ids, "split": str(plan.split[row]), **status}.items():
            pictures[name].append(value)
        for number, word in enumerate(found):
            for name, value in {**ids, "word_index": number, "word": word.text, "confidence": word.confidence}.items():
                words[name].append(value)
            for name, value in zip(("left", "top", "right", "bottom"), word.box, strict=True):
                words[name].append(value)
    base = Path(folder) / f"{shard:06d}"
    write_parquet(f"{base}.words.parquet", pa.table(words, schema=_WORDS_SCHEMA))
    write_parquet(f"{base}.pictures.parquet", pa.table(pictures, schema=_PICTURES_SCHEMA))
    counts = {status: pictures["status"].count(status) for status in ("ok", "no_text", "failed", "skipped")}
    done = {"shard": shard, "pictures": len(plan), "seconds": time.perf_counter() - start, **counts}
    write_json(f"{base}.done", done)
    return done


def auto_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_ocr(config: OcrConfig, engine: OcrEngine | None = None) -> dict[str, Any]:
    """OCR the pictures of `config.splits` into W/ocr/; returns the summary. Safe to re-run: does what is missing.
    `engine` (in-process runs only) replaces the registered one, e.g. a fake in tests."""
    folder = ocr_dir(config.workdir)
    plan = plan_pictures(config.workdir, config.splits, config.limit)
    shards = -(-len(plan) // config.shard_size)
    _check_plan(folder, config, len(plan), shards)
    if engine is None:
        # Built here first so a missing engine stops the run with its install line before any work is shared out.
        engine = create_engine(config.engine)
        workers = auto_workers() if config.workers is None else config.workers
    else:
        workers = 0  # a caller's own engine object is not rebuilt in worker processes
    save_config(config, folder / "config.json")
    missing = [k for k in range(shards) if not (folder / "shards" / f"{k:06d}.done").is_file()]
    log.info(
        "ocr: %d pictures in %d shards, %d to do, %d workers, %s",
        len(plan),
        shards,
        len(missing),
        workers,
        engine.version,
    )
    start = time.perf_counter()
    done = _run_missing(plan, missing, config, engine, workers, folder / "shards")
    wall = time.perf_counter() - start
    summary = _finalize(folder, config, shards, engine.version, workers, wall, done)
    log.info("ocr: %s", _summary_line(summary))
    return summary


def _check_plan(folder: Path, config: OcrConfig, pictures: int, shards: int) -> None:
    wanted = {**{key: getattr(config, key) for key in _PLAN_KEYS}, "pictures": pictures, "shards": shards}
    wanted["splits"] = list(wanted["splits"])
    path = folder / "plan.json"
    if path.is_file():
        found = read_json(path)
        differ = [key for key in wanted if found.get(key) != wanted[key]]
        if differ:
            raise OcrError(
                f"{folder} holds an OCR run with other settings ({', '.join(f'{k}: {found.get(k)}' for k in differ)}); "
                f"run with those settings to resume it, or move {folder} away to start anew"
            )
        return
    write_json(path, wanted)


def _run_missing(
    plan: PicturePlan, missing: list[int], config: OcrConfig, engine: OcrEngine, workers: int, folder: Path
) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    size = config.shard_size
    parts = {k: plan.part(k * size, min((k + 1) * size, len(plan))) for k in missing}
    bar = progress(total=sum(len(part) for part in parts.values()), desc="ocr", unit="pic")
    done: list[dict[str, Any]] = []
    if workers == 0 or len(missing) <= 1:
        _init_worker(engine, config.select)
        for shard, part in parts.items():
            done.append(_run_shard(shard, part, str(folder)))
            bar.update(len(part))
            if _SLOW_SHARDS:
                time.sleep(_SLOW_SHARDS)
    else:
        # spawn: a clean interpreter per worker, whatever threads the parent runs.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(config.engine, config.select)
        ) as pool:
            # A few shards in flight per worker, not all 48,000 of Cdiscount's: the plan parts stay in the parent.
            queue, running = collections.deque(parts.items()), set()
            while queue or running:
                while queue and len(running) < 4 * workers:
                    shard, part = queue.popleft()
                    running.add(pool.submit(_run_shard, shard, part, str(folder)))
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done.append(future.result())
                    bar.update(done[-1]["pictures"])
    bar.close()
    return done


def _gather(folder: Path, kind: str, shards: int, schema: pa.Schema) -> pa.Table:
    tables = [pq.read_table(folder / "shards" / f"{k:06d}.{kind}.parquet") for k in range(shards)]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _finalize(
    folder: Path,
    config: OcrConfig,
    shards: int,
    version: str,
    workers: int,
    wall: float,
    done_now: list[dict[str, Any]],
) -> dict[str, Any]:
    """Merge the shard parts into words.parquet and pictures.parquet; write summary.json."""
    words = _gather(folder, "words", shards, _WORDS_SCHEMA)
    pictures = _gather(folder, "pictures", shards, _PICTURES_SCHEMA)
    write_parquet(folder / "words.parquet", words)
    write_parquet(folder / "pictures.parquet", pictures)
    summary = _summary(config, pictures, version, workers, wall, done_now)
    summary["words"] = words.num_rows
    write_json(folder / "summary.json", summary)
    return summary


def _summary(
    config: OcrConfig, pictures: pa.Table, version: str, workers: int, wall: float, done_now: list[dict[str, Any]]
) -> dict[str, Any]:
    status = pictures["status"].to_numpy(zero_copy_only=False)
    seconds = pictures["seconds"].to_numpy().astype(np.float64)
    counts = {name: int((status == name).sum()) for name in ("ok", "no_text", "failed", "skipped")}
    total = len(status)
    read = counts["ok"] + counts["no_text"]
    # Per-picture seconds include reading, decoding and the selection test, so a selective run's cost per picture
    # (skipped ones cost a few ms) extrapolates correctly; one worker per core.
    per_picture = float(seconds.sum() / total) if total else float("nan")
    failures = pictures.filter(pc.equal(pictures["status"], "failed"))["reason"].slice(0, 10).to_pylist()
    return {
        "engine": version,
        "select": config.select,
        "pictures": total,
        **counts,
        "share_read": read / total if total else 0.0,
        "share_with_text": counts["ok"] / read if read else 0.0,
        "worker_seconds_per_picture": per_picture,
        "workers": max(1, workers),
        "pictures_per_s": max(1, workers) / per_picture if total and per_picture > 0 else None,
        "this_run": {
            "shards": len(done_now),
            "pictures": sum(d["pictures"] for d in done_now),
            "wall_seconds": round(wall, 3),
            "wall_pictures_per_s": sum(d["pictures"] for d in done_now) / wall if done_now and wall > 0 else None,
        },
        "cdiscount_pictures": CDISCOUNT_PICTURES,
        "cdiscount_hours": CDISCOUNT_PICTURES * per_picture / max(1, workers) / 3600 if total else None,
        "cdiscount_core_hours": CDISCOUNT_PICTURES * per_picture / 3600 if total else None,
        "cpus": auto_workers(),
        "first_failures": failures,
    }


def _summary_line(summary: dict[str, Any]) -> str:
    rate = summary["pictures_per_s"]
    hours = summary["cdiscount_hours"]
    return (
        f"{summary['pictures']} pictures: {summary['ok']} with text, {summary['no_text']} without, "
        f"{summary['failed']} failed, {summary['skipped']} skipped by --select {summary['select']}; "
        f"{rate or 0:.1f} pictures/s on {summary['workers']} worker(s); Cdiscount's 12.4 M pictures: "
        f"{hours or 0:.1f} h here"
    )
