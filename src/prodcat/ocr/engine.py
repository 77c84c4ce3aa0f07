"""OCR engines behind one small interface: `engine.read(image) -> list[Word]`, built by name from one registry.

`tesseract` (the default): Tesseract 5 through `tesserocr`, the in-process C++ API (its wheel brings the library;
Debian's `tesseract-ocr-fra`/`-eng` bring the language data). `rapidocr`: PP-OCRv4 ONNX models shipped inside the
`rapidocr-onnxruntime` wheel. Chosen by benchmarks/bench_ocr.py (2 single-thread workers, shared 2-core host):
words right 0.90 for Tesseract against 0.49 for RapidOCR (its Chinese/English recogniser drops French accents:
PREMIÈRE -> PREMIERE), at 6.7x its pictures/s; pytesseract reads as well as tesserocr but is 7.5x slower (a
process and a model load per picture)."""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from prodcat.config import OcrConfig

__all__ = [
    "Word",
    "OcrEngine",
    "EngineUnavailable",
    "register_engine",
    "create_engine",
    "list_engines",
    "DEFAULT_ENGINE",
    "TESSERACT_INSTALL",
]

DEFAULT_ENGINE = OcrConfig.engine  # one default, declared with the config
TESSERACT_INSTALL = "apt-get install tesseract-ocr tesseract-ocr-fra"


@dataclasses.dataclass(frozen=True)
class Word:
    """One word read on a picture: its text, the engine's confidence in [0, 1] and its box (left, top, right,
    bottom) in the picture's own pixels."""

    text: str
    confidence: float
    box: tuple[int, int, int, int]


class OcrEngine(Protocol):
    """What the stage needs of an engine: a name, a version string for the outputs, and `read`."""

    name: str
    version: str

    def read(self, image: Image.Image) -> list[Word]: ...


class EngineUnavailable(RuntimeError):
    """The engine's library or language data is missing; the message says how to install it."""


_ENGINES: dict[str, Callable[..., OcrEngine]] = {}


def register_engine(name: str) -> Callable[[Callable[..., OcrEngine]], Callable[..., OcrEngine]]:
    """Class decorator adding an engine factory under `name`; a second engine under the same name is refused."""

    def add(factory: Callable[..., OcrEngine]) -> Callable[..., OcrEngine]:
        if name in _ENGINES:
            raise ValueError(f"OCR engine {name!r} is already registered")
        _ENGINES[name] = factory
        return factory

    return add


def list_engines() -> list[str]:
    return sorted(_ENGINES)


def create_engine(name: str = DEFAULT_ENGINE, **kwargs: Any) -> OcrEngine:
    """Build the engine `name`; raises EngineUnavailable (with the install line) when it cannot run here."""
    if name not in _ENGINES:
        raise ValueError(f"unknown OCR engine {name!r}; known: {', '.join(list_engines())}")
    return _ENGINES[name](**kwargs)


def _upscaled(image: Image.Image, min_side: int) -> tuple[Image.Image, float]:
    """Small pictures (Cdiscount's are 180x180) upscaled so the shorter side is `min_side`: both engines read
    letters a few pixels high far better at 2-3x (measured in benchmarks/bench_ocr.py)."""
    image = image.convert("RGB")
    scale = max(1.0, min_side / max(1, min(image.size)))
    if scale > 1.0:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image, scale


def _unscaled_box(box: tuple[float, float, float, float], scale: float, size: tuple[int, int]) -> tuple[int, ...]:
    left, top, right, bottom = (value / scale for value in box)
    width, height = size
    return (
        int(np.clip(round(left), 0, width)),
        int(np.clip(round(top), 0, height)),
        int(np.clip(round(right), 0, width)),
        int(np.clip(round(bottom), 0, height)),
    )


def find_tessdata() -> str | None:
    """Folder holding fra/eng.traineddata: $TESSDATA_PREFIX, else Debian's /usr/share/tesseract-ocr/*/tessdata."""
    candidates = [os.environ.get("TESSDATA_PREFIX", "")]
    candidates += sorted(glob.glob("/usr/share/tesseract-ocr/*/tessdata"), reverse=True)
    candidates += ["/usr/share/tessdata", "/usr/local/share/tessdata"]
    for folder in candidates:
        if folder and any(Path(folder).glob("*.traineddata")):
            return folder
    return None


_THRESHOLDS = {"otsu": "0", "leptonica_otsu": "1", "sauvola": "2"}


@register_engine("tesseract")
class TesseractEngine:
    """Tesseract through tesserocr, one API handle per process (create one engine per worker)."""

    name = "tesseract"

    def __init__(
        self,
        languages: str = "fra+eng",
        min_side: int = 360,
        page_mode: str = "SPARSE_TEXT",
        threshold: str = "sauvola",
    ) -> None:
        try:
            import tesserocr
        except ImportError as error:
            raise EngineUnavailable(
                f"the tesseract engine needs tesserocr (pip install tesserocr) and Tesseract's language data "
                f"({TESSERACT_INSTALL}): {error}"
            ) from None
        tessdata = find_tessdata()
        missing = [
            lang for lang in languages.split("+") if not tessdata or not Path(tessdata, f"{lang}.traineddata").is_file()
        ]
        if missing:
            raise EngineUnavailable(
                f"Tesseract language data {', '.join(missing)} not found (looked in $TESSDATA_PREFIX and "
                f"/usr/share/tesseract-ocr/*/tessdata); install it: {TESSERACT_INSTALL}"
            )
        self._tesserocr = tesserocr
        self.min_side = min_side
        # Cover text is scattered words, not a page: SPARSE_TEXT finds more of it than the page-layout default.
        self._api = tesserocr.PyTessBaseAPI(
            path=tessdata.rstrip("/") + "/", lang=languages, psm=getattr(tesserocr.PSM, page_mode)
        )
        # Local (Sauvola) binarisation instead of one global Otsu threshold: a shadow across a photographed page
        # or a gradient behind a title no longer swallows whole lines (skimage page(): 40/44 words against 25/44).
        self._api.SetVariable("thresholding_method", _THRESHOLDS[threshold])
        self.version = f"tesseract {tesserocr.tesseract_version().split()[1]} ({languages}, {page_mode}, {threshold})"

    def read(self, image: Image.Image) -> list[Word]:
        big, scale = _upscaled(image, self.min_side)
        self._api.SetImage(big)
        self._api.Recognize()
        words: list[Word] = []
        iterator = self._api.GetIterator()
        level = self._tesserocr.RIL.WORD
        for item in self._tesserocr.iterate_level(iterator, level):
            try:
                text, box = item.GetUTF8Text(level), item.BoundingBox(level)
            except RuntimeError:  # tesserocr raises on an empty result instead of returning ""
                continue
            if not text or not text.strip() or box is None:
                continue
            words.append(
                Word(text.strip(), round(item.Confidence(level) / 100.0, 4), _unscaled_box(box, scale, image.size))
            )
        return words


@register_engine("rapidocr")
class RapidOcrEngine:
    """PP-OCRv4 detection + recognition on ONNX Runtime (models inside the rapidocr-onnxruntime wheel). It reads
    lines; words get the line's confidence and a share of its box proportional to their characters."""

    name = "rapidocr"

    def __init__(self, threads: int = 1, min_side: int = 540) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise EngineUnavailable(f"the rapidocr engine needs pip install rapidocr-onnxruntime: {error}") from None
        # The detector's default resizes every picture to a 736-pixel shorter side; ours is set by min_side.
        self._ocr = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1, det_limit_side_len=min_side)
        self.min_side = min_side
        from importlib.metadata import version

        self.version = f"rapidocr-onnxruntime {version('rapidocr-onnxruntime')} (PP-OCRv4)"

    def read(self, image: Image.Image) -> list[Word]:
        big, scale = _upscaled(image, self.min_side)
        lines, _ = self._ocr(np.asarray(big))
        words: list[Word] = []
        for polygon, text, score in lines or []:
            points = np.asarray(polygon, dtype=np.float64)
            left, top = points.min(axis=0)
            right, bottom = points.max(axis=0)
            words += _split_line(str(text), float(score), (left, top, right, bottom), scale, image.size)
        return words


def _split_line(
    text: str, score: float, box: tuple[float, float, float, float], scale: float, size: tuple[int, int]
) -> list[Word]:
    left, top, right, bottom = box
    per_char = (right - left) / max(1, len(text))
    words, at = [], 0
    for token in text.split(" "):
        if token:
            span = (left + at * per_char, top, left + (at + len(token)) * per_char, bottom)
            words.append(Word(token, round(score, 4), _unscaled_box(span, scale, size)))
        at += len(token) + 1
    return words
