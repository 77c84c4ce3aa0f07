"""Covers of the demo's text-heavy leaves (books, music, films, games): alike in picture, apart in printed words.

Every cover of one department has the same layout (a rectangle with a picture block and title lines, on a light
ground): a book is tall, a CD square, a DVD/game case tall with a coloured band. Leaves of a department differ only
in the words printed on their covers (genre, format, edition: POLICIER, VINYLE, SAISON ...), mixed with neutral
title words every leaf shares, in DejaVu fonts (Debian's fonts-dejavu-core) at several sizes, angles and colours,
with noise, blur and JPEG. So the picture features tell the department, and the text tells the leaf.

Lives in data/ (it draws demo pictures, nothing more); prodcat.ocr.samples imports `find_fonts` from here, never
the other way round, so the demo needs no OCR package.
"""

from __future__ import annotations

import dataclasses
import glob
import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = [
    "CoverLeaf",
    "COVER_LEAVES",
    "TEXT_DEPARTMENTS",
    "NEUTRAL_WORDS",
    "find_fonts",
    "render_cover_product",
    "cover_words",
]


@dataclasses.dataclass(frozen=True)
class CoverLeaf:
    """One text-heavy leaf: its taxonomy names and the words typical of its covers."""

    level1: str
    level2: str
    level3: str
    words: tuple[str, ...]


# In the order the demo takes them: the first eight cover the four departments twice.
COVER_LEAVES: tuple[CoverLeaf, ...] = (
    CoverLeaf("LIBRAIRIE", "LITTERATURE", "ROMAN POLICIER", ("POLICIER", "THRILLER", "ENQUÊTE", "CRIME", "MEURTRE")),
    CoverLeaf("MUSIQUE", "CD", "VARIETE FRANCAISE", ("CHANSON", "FRANÇAISE", "ALBUM", "VARIÉTÉ", "INÉDITS")),
    CoverLeaf("DVD - BLU-RAY", "FILM", "COMEDIE", ("COMÉDIE", "FILM", "HILARANT", "RIRE", "CINÉMA")),
    CoverLeaf("JEUX VIDEO", "JEU PS4", "JEU PS4", ("PLAYSTATION", "PS4", "ACTION", "COMBAT", "MULTIJOUEUR")),
    CoverLeaf("LIBRAIRIE", "CUISINE - VINS", "CUISINE DU MONDE", ("CUISINE", "RECETTES", "SAVEURS", "GOURMAND")),
    CoverLeaf("DVD - BLU-RAY", "SERIE TV", "SERIE TV", ("SÉRIE", "SAISON", "INTÉGRALE", "ÉPISODES", "COFFRET")),
    CoverLeaf("MUSIQUE", "VINYLE", "ROCK - POP", ("VINYLE", "ROCK", "TOURS", "REMASTERISÉ", "GUITARE")),
    CoverLeaf("JEUX VIDEO", "JEU PC", "JEU PC", ("PC", "STRATÉGIE", "SIMULATION", "WINDOWS", "EXTENSION")),
    CoverLeaf("MUSIQUE", "CD", "MUSIQUE CLASSIQUE", ("CLASSIQUE", "SYMPHONIE", "ORCHESTRE", "PIANO", "CONCERTO")),
    CoverLeaf("LIBRAIRIE", "JEUNESSE", "ALBUM JEUNESSE", ("CONTES", "JEUNESSE", "HISTOIRES", "ENFANTS", "ANS")),
    CoverLeaf("LIBRAIRIE", "BANDE DESSINEE", "MANGA", ("MANGA", "TOME", "SHÔNEN", "VOLUME", "JAPON")),
    CoverLeaf("DVD - BLU-RAY", "FILM", "FILM D'HORREUR", ("HORREUR", "FRISSONS", "TERREUR", "ÉPOUVANTE")),
)  # fmt: skip
TEXT_DEPARTMENTS = tuple(dict.fromkeys(leaf.level1 for leaf in COVER_LEAVES))

# Title words any cover may carry, whatever its leaf: they make the text noisy without telling the leaf.
NEUTRAL_WORDS = (
    "LE", "LA", "LES", "DES", "NUIT", "SOLEIL", "AMOUR", "DERNIER", "SECRET", "TEMPS", "MONDE", "ÉDITION",
    "COLLECTION", "NOUVEAU", "GRAND", "PETIT", "ROUGE", "NOIR", "ÉTÉ", "HIVER", "RETOUR", "VILLE", "MER",
    "OMBRE", "LUMIÈRE", "HISTOIRE", "PARIS", "VIE", "ROI", "FEMME", "ENFANT", "ÉTOILE", "SILENCE",
)  # fmt: skip

# Per department: (case width, case height) as shares of the picture, and whether the case has a top band.
_LAYOUTS = {"LIBRAIRIE": (0.62, 0.9, False), "MUSIQUE": (0.84, 0.84, False), "DVD - BLU-RAY": (0.62, 0.9, True),
            "JEUX VIDEO": (0.64, 0.9, True)}  # fmt: skip
_DEFAULT_LAYOUT = (0.7, 0.88, False)


def find_fonts() -> list[str]:
    """DejaVu TrueType files from Debian's fonts-dejavu-core (empty when not installed)."""
    return sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))


@lru_cache(maxsize=1)
def _cover_fonts() -> tuple[str, ...]:
    # Thin and math faces print words OCR and people both misread; the rest give sans, serif, mono, bold, oblique.
    return tuple(f for f in find_fonts() if "ExtraLight" not in f and "Math" not in f)


@lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Without DejaVu the demo still runs on Pillow's own scalable font (the covers just look less varied).
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def _colour(rng: np.random.Generator, low: int, high: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, 3))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class _Cover:
    """What one product's cover shows (its views re-render it with a new pose, light and noise)."""

    layout: tuple[float, float, bool]
    lines: tuple[str, ...]
    font: str
    sizes: tuple[int, ...]
    case: tuple[int, int, int]
    ink: tuple[int, int, int]
    band: tuple[int, int, int]
    block: tuple[int, int, int]
    blobs: tuple[tuple[float, float, float, tuple[int, int, int]], ...]


def _draw_cover(leaf: CoverLeaf, rng: np.random.Generator) -> _Cover:
    """Two to four lines: neutral title words, the leaf's words (at least two of them), one word per line or two."""
    own = [
        str(w) for w in rng.choice(leaf.words, size=int(rng.integers(2, min(4, len(leaf.words)) + 1)), replace=False)
    ]
    neutral = [str(w) for w in rng.choice(NEUTRAL_WORDS, size=int(rng.integers(1, 3)), replace=False)]
    words = neutral + own if rng.random() < 0.5 else own + neutral
    lines, at = [], 0
    while at < len(words) and len(lines) < 4:
        take = 2 if len(words) - at > 4 - len(lines) or (rng.random() < 0.4 and at + 1 < len(words)) else 1
        lines.append(" ".join(words[at : at + take]))
        at += take
    fonts = _cover_fonts() or ("",)
    case = _colour(rng, 140, 256)
    blobs = tuple(
        (float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.4)), _colour(rng, 0, 256))
        for _ in range(int(rng.integers(1, 4)))
    )  # fmt: skip
    return _Cover(
        layout=_LAYOUTS.get(leaf.level1, _DEFAULT_LAYOUT),
        lines=tuple(lines),
        font=fonts[int(rng.integers(len(fonts)))],
        sizes=tuple(int(rng.integers(13, 24)) for _ in lines),
        case=case,
        ink=_colour(rng, 0, 80),
        band=_colour(rng, 0, 120),
        block=_colour(rng, 40, 220),
        blobs=blobs,
    )


def _paint_case(cover: _Cover, size: int) -> tuple[Image.Image, list[str]]:
    """The cover itself, upright: case colour, optional band, title lines on top, picture block below; and the
    words printed (a line that would run into the picture block is left off)."""
    width, height = round(cover.layout[0] * size), round(cover.layout[1] * size)
    case = Image.new("RGB", (width, height), cover.case)
    draw = ImageDraw.Draw(case)
    y, printed = 4, []
    if cover.layout[2]:
        draw.rectangle((0, 0, width, height * 0.08), fill=cover.band)
        y = int(height * 0.08) + 3
    for line, font_size in zip(cover.lines, cover.sizes, strict=True):
        font_size = max(9, font_size)
        while _font(cover.font, font_size).getlength(line) > width - 8 and font_size > 9:
            font_size -= 1
        if y + font_size > height * 0.6:
            break
        draw.text((4, y), line, font=_font(cover.font, font_size), fill=cover.ink)
        printed += line.split()
        y += int(font_size * 1.25)
    top = max(y + 2, int(height * 0.6))
    draw.rectangle((4, top, width - 4, height - 4), fill=cover.block)
    for cx, cy, radius, colour in cover.blobs:
        x, yy, r = 4 + cx * (width - 8), top + cy * (height - 4 - top), radius * (width - 8) / 2
        draw.ellipse((x - r, yy - r * 0.7, x + r, yy + r * 0.7), fill=colour)
    return case, printed


def _view(cover: _Cover, rng: np.random.Generator, size: int, quality: int) -> bytes:
    """One photo of the cover: light ground, small turn and shift, brightness, sensor noise, sometimes blur."""
    ground = Image.new("RGB", (size, size), _colour(rng, 200, 256))
    case, _ = _paint_case(cover, size)
    turned = case.rotate(float(rng.uniform(-7, 7)), resample=Image.Resampling.BICUBIC, expand=True,
                         fillcolor=ground.getpixel((0, 0)))  # fmt: skip
    if turned.width > size or turned.height > size:
        turned.thumbnail((size, size), Image.Resampling.LANCZOS)
    x = int(rng.integers(0, size - turned.width + 1))
    y = int(rng.integers(0, size - turned.height + 1))
    ground.paste(turned, (x, y))
    if rng.random() < 0.3:
        ground = ground.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    pixels = np.asarray(ground, dtype=np.float32) * np.float32(rng.uniform(0.85, 1.1))
    pixels += rng.normal(0, rng.uniform(2, 8), pixels.shape).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_cover_product(
    leaf: CoverLeaf, rng: np.random.Generator, views: int, size: int = 180, quality: int = 90
) -> list[bytes]:
    """JPEG bytes of `views` photos of one new cover of `leaf` (deterministic from `rng`)."""
    cover = _draw_cover(leaf, rng)
    return [_view(cover, rng, size, quality) for _ in range(views)]


def cover_words(leaf: CoverLeaf, rng: np.random.Generator, size: int = 180) -> tuple[str, ...]:
    """The words `render_cover_product` prints with a generator in this state (ground truth for tests)."""
    return tuple(_paint_case(_draw_cover(leaf, rng), size)[1])
