"""The cheap text-presence test behind `--select text_likely`."""

from __future__ import annotations

import pytest
from ocr_helpers import plain_photo
from PIL import Image

from prodcat.ocr.samples import find_fonts, render_cover
from prodcat.ocr.select import create_selector, list_selectors, text_likely


@pytest.mark.skipif(not find_fonts(), reason="DejaVu fonts missing: apt-get install fonts-dejavu-core")
def test_covers_are_text_likely() -> None:
    # Seeds other than the 0-39 the threshold was chosen on.
    hits = sum(text_likely(render_cover(seed).image) for seed in range(300, 320))
    assert hits >= 19


def test_plain_and_real_photos_are_not() -> None:
    from skimage import data

    real = [Image.fromarray(data.chelsea()), Image.fromarray(data.rocket())]
    photos = [plain_photo(seed) for seed in range(5)] + real
    assert not any(text_likely(photo) for photo in photos)


def test_selectors_registry_has_a_hook_for_more() -> None:
    assert {"all", "text_likely"} <= set(list_selectors())
    assert create_selector("all")(Image.new("RGB", (10, 10)), {}) is True
    with pytest.raises(ValueError, match="unknown selector"):
        create_selector("top_k_departments")
