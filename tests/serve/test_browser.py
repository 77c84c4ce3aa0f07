"""The web page in a real headless Chromium: upload a photo, read the categories off the page."""

from __future__ import annotations

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


@pytest.fixture
def server(make_predictor: Callable) -> Iterator[tuple[str, Any]]:
    """The app under uvicorn on a free loopback port, in a thread."""
    import uvicorn

    predictor = make_predictor(threshold=0.3)
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
        yield f"http://127.0.0.1:{port}/", predictor
    finally:
        server.should_exit = True
        thread.join(timeout=15)


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
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)


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
