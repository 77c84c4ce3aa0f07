"""OCR engines: the registry, Tesseract on a rendered cover and on skimage's real page, clear install messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from prodcat.ocr import engine as engines
from prodcat.ocr.engine import EngineUnavailable, Word, create_engine, register_engine
from prodcat.ocr.samples import find_fonts, ground_truth_words, render_cover, words_right

REPO = Path(__file__).resolve().parents[2]


def tesseract_or_skip() -> engines.OcrEngine:
    try:
        return create_engine("tesseract")
    except EngineUnavailable as error:
        pytest.skip(f"Tesseract not installed: {error}")


def test_registry_refuses_duplicates_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_engine("tesseract")(object)
    with pytest.raises(ValueError, match="unknown OCR engine 'nope'"):
        create_engine("nope")
    assert {"tesseract", "rapidocr"} <= set(engines.list_engines())


@pytest.mark.skipif(not find_fonts(), reason="DejaVu fonts missing: apt-get install fonts-dejavu-core")
def test_tesseract_reads_the_words_of_rendered_covers_accents_kept() -> None:
    engine = tesseract_or_skip()
    found = total = 0
    accented = []
    for seed in range(1, 6):
        cover = render_cover(seed)
        words = engine.read(cover.image)
        assert all(isinstance(w, Word) and 0.0 <= w.confidence <= 1.0 for w in words)
        assert all(0 <= w.box[0] <= w.box[2] <= 180 and 0 <= w.box[1] <= w.box[3] <= 180 for w in words)
        right, count = words_right(list(cover.words), [w.text for w in words])
        found, total = found + right, total + count
        read = set(ground_truth_words(" ".join(w.text for w in words)))
        accented += [word for word in ground_truth_words(" ".join(cover.words)) if not word.isascii() and word in read]
    assert found / total >= 0.8, (found, total)
    assert accented, "no accented word read with its accents"


def test_tesseract_reads_english_words_on_the_real_page_photo() -> None:
    from skimage import data

    engine = tesseract_or_skip()
    read = set(ground_truth_words(" ".join(w.text for w in engine.read(Image.fromarray(data.page())))))
    expected = {"segmentation", "markers", "coins", "background", "pixels", "histogram", "object", "extreme"}
    assert len(expected & read) >= 6, read


def test_missing_tesserocr_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tesserocr", None)  # import fails as if never installed
    with pytest.raises(EngineUnavailable, match="apt-get install tesseract-ocr tesseract-ocr-fra"):
        create_engine("tesseract")


def test_missing_language_data_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tesserocr")
    monkeypatch.setattr(engines, "find_tessdata", lambda: None)
    with pytest.raises(EngineUnavailable, match="fra.*apt-get install tesseract-ocr tesseract-ocr-fra"):
        create_engine("tesseract")


def test_rest_of_prodcat_never_imports_the_ocr_package() -> None:
    # The CLI, predictor and server must load (and run) on a machine without any OCR engine.
    code = (
        "import sys; sys.modules['tesserocr'] = None; sys.modules['rapidocr_onnxruntime'] = None\n"
        "import prodcat.cli, prodcat.predict.predictor, prodcat.serve.app, prodcat.pipeline\n"
        "print(sorted(m for m in sys.modules if m.startswith('prodcat.ocr')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not find_fonts(), reason="DejaVu fonts missing: apt-get install fonts-dejavu-core")
def test_rapidocr_reads_words_with_boxes_when_installed() -> None:
    try:
        engine = create_engine("rapidocr")
    except EngineUnavailable as error:
        pytest.skip(f"rapidocr not installed: {error}")
    cover = render_cover(1)
    words = engine.read(cover.image)
    assert all(0 <= w.box[0] <= w.box[2] <= 180 for w in words)
    assert words_right(list(cover.words), [w.text for w in words])[0] >= 1
