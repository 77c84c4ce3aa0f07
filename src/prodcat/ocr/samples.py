"""Rendered covers with known words: ground truth for the OCR tests and benchmarks/bench_ocr.py.

A 180x180 picture like Cdiscount's: a coloured ground, a picture block, two to four lines of French words in a
DejaVu font (Debian's fonts-dejavu-core) at several sizes, turned a few degrees, with noise and JPEG compression.
Deterministic from the seed.
"""

from __future__ import annotations

import dataclasses
import io
import re
import unicodedata

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from prodcat.data.synthetic.covers import find_fonts

__all__ = ["COVER_WORDS", "RenderedCover", "render_cover", "find_fonts", "ground_truth_words", "words_right"]

# Words printed on book, music, film and game covers, accents included on purpose.
COVER_WORDS = (
    "ROMAN POLICIER THRILLER CUISINE RECETTES ÉDITION INTÉGRALE COFFRET COLLECTOR DÉLUXE BANDE DESSINÉE "
    "MANGA TOME JEUNESSE HISTOIRE GÉOGRAPHIE MUSIQUE CLASSIQUE CHANSON FRANÇAISE VINYLE ALBUM CONCERT FILM "
    "SÉRIE SAISON ÉPISODES COMÉDIE DRAME AVENTURE SCIENCE FICTION FANTASTIQUE JEUX VIDÉO ÉTÉ NOËL FÊTE "
    "PREMIÈRE ANNÉE GUIDE PRATIQUE DICTIONNAIRE ANGLAIS MATHÉMATIQUES CAHIER D'EXERCICES POCHE GRAND FORMAT "
    "LIVRE AUDIO ÉCOLE COLLÈGE LYCÉE CÉLÈBRE DÉCOUVERTE NATURE ANIMAUX VOYAGE PÂTISSERIE SANTÉ BIEN-ÊTRE"
).split()


@dataclasses.dataclass(frozen=True)
class RenderedCover:
    image: Image.Image
    words: tuple[str, ...]  # every word printed, in reading order
    font: str
    sizes: tuple[int, ...]


def render_cover(
    seed: int, size: int = 180, angle: float = 3.0, noise: float = 6.0, blur: float = 0.0, quality: int = 80
) -> RenderedCover:
    """A cover with 2-4 lines of 1-2 words; font sizes 14-26 px, rotation within +-angle degrees, Gaussian noise of
    `noise` grey levels, a Gaussian blur of `blur` pixels, JPEG at `quality`."""
    rng = np.random.default_rng(seed)
    fonts = [f for f in find_fonts() if "ExtraLight" not in f]
    if not fonts:
        raise FileNotFoundError("no DejaVu fonts found; apt-get install fonts-dejavu-core")
    font_path = fonts[int(rng.integers(len(fonts)))]
    ground = tuple(int(v) for v in rng.integers(150, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    image = Image.new("RGB", (size, size), ground)
    draw = ImageDraw.Draw(image)
    block = tuple(int(v) for v in rng.integers(60, 200, 3))
    draw.rectangle((size * 0.15, size * 0.55, size * 0.85, size * 0.92), fill=block)  # the cover's picture
    words, sizes, y = [], [], 8
    for _ in range(int(rng.integers(2, 5))):
        line = [str(w) for w in rng.choice(COVER_WORDS, size=int(rng.integers(1, 3)), replace=False)]
        font_size = int(rng.integers(14, 27))
        font = ImageFont.truetype(font_path, font_size)
        text = " ".join(line)
        while font.getlength(text) > size - 12 and font_size > 11:
            font_size -= 1
            font = ImageFont.truetype(font_path, font_size)
        if y + font_size > size * 0.55:
            break
        draw.text((8, y), text, font=font, fill=ink)
        words += line
        sizes.append(font_size)
        y += int(font_size * 1.3)
    turned = image.rotate(float(rng.uniform(-angle, angle)), resample=Image.Resampling.BICUBIC, fillcolor=ground)
    if blur > 0:
        turned = turned.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(turned, dtype=np.float32) + rng.normal(0, noise, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return RenderedCover(
        Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), tuple(words), font_path, tuple(sizes)
    )


_TOKEN = re.compile(r"\w+")


def ground_truth_words(text: str) -> list[str]:
    """Words to score: runs of letters/digits, NFC-normalised and case-folded, accents kept."""
    return _TOKEN.findall(unicodedata.normalize("NFC", text).casefold())


def words_right(truth: list[str], read: list[str]) -> tuple[int, int]:
    """(ground-truth words found among the words read, counted as multisets; ground-truth words)."""
    pool: dict[str, int] = {}
    for word in ground_truth_words(" ".join(read)):
        pool[word] = pool.get(word, 0) + 1
    found = 0
    for word in ground_truth_words(" ".join(truth)):
        if pool.get(word, 0) > 0:
            pool[word] -= 1
            found += 1
    return found, len(ground_truth_words(" ".join(truth)))
