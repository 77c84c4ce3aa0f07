"""The web page in a real headless Chromium: upload a photo, read the categories off the page."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prodcat.config import ServeConfig
from prodcat.data.images import decode_image
from prodcat.serve.app import create_app

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RUN_NAME = "linear-softmax-adamw-s0"


def _evaluated_run(root: Path) -> Path:
    """A run folder with what `prodcat evaluate` leaves for the page: the holdout product accuracy."""
    run = root / RUN_NAME
    (run / "eval").mkdir(parents=True)
    metrics = {"split": "holdout", "products": 312, "product": {"top1": 0.7346, "top1_ci95": [0.68, 0.78], "n": 312}}
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return run


@contextlib.contextmanager
def _serving(predictor: Any, tmp_path: Path) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    predictor.run_dir = _evaluated_run(tmp_path / "runs")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(predictor, ServeConfig(port=port)), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def server(make_predictor: Callable, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    predictor = make_predictor(threshold=0.3)
    with _serving(predictor, tmp_path) as url:
        yield url, predictor


@pytest.fixture
def page() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium, or `make browser`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no browser download needed)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 800})
        finally:
            browser.close()


@pytest.fixture
def coffee_jpeg(tmp_path: Path) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path / "coffee.jpg"
    Image.fromarray(data.coffee()).save(path, quality=90)
    return path


def test_page_shows_the_predicted_category(
    server: tuple[str, Any], page: Any, coffee_jpeg: Path, tmp_path: Path
) -> None:
    url, predictor = server
    expected = predictor.predict_product([decode_image(coffee_jpeg.read_bytes())]).top
    page.goto(url)
    # The header names the served run, its holdout accuracy, and the threshold as a rule on the top probability.
    page.wait_for_selector("#model-info .run-name", timeout=20_000)
    assert page.locator("#model-info .run-name").inner_text() == RUN_NAME
    info = page.locator("#model-info").inner_text()
    assert "73.5% right on holdout, n = 312 products" in info
    assert "auto-accept when the top probability ≥ 30%" in info
    assert page.locator("#classify").count() == 0  # classification starts on upload: no button to press
    page.set_input_files("#file-input", str(coffee_jpeg))
    page.wait_for_selector("#results .prediction", state="visible", timeout=20_000)
    first = page.locator("#results .prediction:first-child")
    assert first.locator(".leaf").inner_text() == expected[0].level3
    assert first.locator(".level1").inner_text() == expected[0].level1
    assert first.locator(".level2").inner_text() == expected[0].level2
    assert int(first.get_attribute("data-category-id")) == expected[0].category_id
    assert page.locator("#results .prediction").count() == 5
    badge = page.locator("#accept-badge")
    assert ("auto-accept" in badge.inner_text().lower()) is (expected[0].probability >= 0.3)
    assert page.locator("#thumbnails .thumb").count() == 1
    assert expected[0].level3 in page.locator("#thumbnails .thumb .thumb-top").inner_text()
    assert page.locator("#thumbnails .thumb .thumb-words").is_hidden()  # no text model: no words place shown
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


def test_page_shows_the_words_read_under_each_photo(
    make_predictor: Callable, page: Any, coffee_jpeg: Path, tmp_path: Path
) -> None:
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    words = {0: ["CAFÉ", "Arabica", hostile], 1: []}  # the second photo: read, nothing found
    plain = tmp_path / "back.jpg"
    shutil.copy(coffee_jpeg, plain)
    with _serving(make_predictor(threshold=0.3, ocr_words=words.__getitem__), tmp_path) as url:
        page.goto(url)
        page.wait_for_selector("#model-info .run-name", timeout=20_000)
        page.set_input_files("#file-input", [str(coffee_jpeg), str(plain)])
        page.wait_for_selector("#thumbnails .thumb-words .word", state="visible", timeout=20_000)
        first = page.locator('#thumbnails .thumb[data-index="0"] .thumb-words')
        assert first.locator(".word").all_inner_texts() == ["CAFÉ", "Arabica", hostile]  # shown as text
        assert first.locator("img").count() == 0 and page.title() != "pwned"  # never as markup
        assert "words read" in first.inner_text()
        second = page.locator('#thumbnails .thumb[data-index="1"] .thumb-words')
        assert second.is_visible() and second.locator(".word").count() == 0 and "none" in second.inner_text()
        below = first.bounding_box()["y"] > page.locator('#thumbnails .thumb[data-index="0"] img').bounding_box()["y"]
        assert below  # under the photo
        page.screenshot(path=str(tmp_path / "words.png"), full_page=True)


def test_page_shows_errors_readably_then_recovers(
    server: tuple[str, Any], page: Any, coffee_jpeg: Path, tmp_path: Path
) -> None:
    url, _ = server
    bogus = tmp_path / "notes.jpg"
    bogus.write_text("these are not pixels\n" * 10)
    page.goto(url)
    page.set_input_files("#file-input", str(bogus))
    page.wait_for_selector("#error", state="visible", timeout=20_000)
    assert "not an image" in page.locator("#error .error-message").inner_text()
    assert "notes.jpg" in page.locator("#error .error-message").inner_text()
    assert page.locator("#results").is_hidden()
    page.click("#clear")
    page.set_input_files("#file-input", str(coffee_jpeg))
    page.wait_for_selector("#results .prediction", state="visible", timeout=20_000)
    assert page.locator("#error").is_hidden()


def _report_workdir(root: Path) -> Path:
    """The smallest work directory a report with a headline box and a run table comes from."""
    for name, best in (("sweep-k16", 0.61), ("sweep-k2", 0.42), ("sweep-k8", 0.55)):
        run = root / "runs" / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"head": "linear", "loss": "sampled", "optimizer": "adamw"}))
        (run / "summary.json").write_text(json.dumps({"best": {"value": best}, "final": {"val_top1": best}}))
    metrics = {
        "split": "holdout",
        "protocol": "selected on val, reported on holdout, n = 312 products (540 images)",
        "product": {"top1": 0.7346, "top1_ci95": [0.68, 0.78], "n": 312, "macro": 0.61, "macro_ci95": [0.55, 0.66]},
        "image": {"top1": 0.6512, "top1_ci95": [0.61, 0.69], "n": 540, "macro": 0.52},
        "confidence": {"threshold": 0.95, "target_accuracy": 0.95, "chosen_on": "val", "coverage": 0.54,
                       "accuracy": 0.951, "accuracy_ci95": [0.92, 0.97], "accepted": 168},
    }  # fmt: skip
    (root / "runs" / "sweep-k8" / "eval").mkdir()
    (root / "runs" / "sweep-k8" / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_report_leads_with_the_answer_and_sorts_tables(page: Any, tmp_path: Path) -> None:
    from prodcat.report.html import build_report

    report = build_report(_report_workdir(tmp_path))
    page.goto(report.as_uri())
    box = page.locator("#headline-box")
    assert box.is_visible() and box.bounding_box()["y"] < 400  # the answer is on the first screen
    text = box.inner_text()
    assert "Best run sweep-k8" in text and "73.5%" in text and "n = 312 products" in text
    assert "[68.0, 78.0]" in text and "n = 540 pictures" in text
    assert "are 95.1% correct" in text and "54% of products" in text and "the rest go to a person" in text

    def runs() -> list[str]:
        return page.locator("table.runs tbody tr td:first-child").all_inner_texts()

    assert runs() == ["sweep-k2", "sweep-k8", "sweep-k16"]  # numbers in names sort by value
    header = page.locator("table.runs th", has_text="best val top-1")
    header.click()
    assert runs() == ["sweep-k16", "sweep-k8", "sweep-k2"]  # highest first
    header.click()
    assert runs() == ["sweep-k2", "sweep-k8", "sweep-k16"]
    page.screenshot(path=str(tmp_path / "report.png"))
