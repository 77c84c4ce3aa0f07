"""Synthetic data set in Kaggle's Cdiscount formats: the embedded default every command of the pipeline runs on.

`generate_demo` writes `category_names.csv`, `train.bson`, `test.bson` and `sample_submission.csv` exactly as
Kaggle ships them. The taxonomy has the real one's shape (scaled to the number of leaves), product counts per leaf
follow the real long tail, pictures per product the real 1-4 distribution. Pictures follow the hierarchy so that
pretrained features can learn it, without it being trivial:

- level 1 -> background family and colour palette,
- level 2 -> object shape family,
- leaf -> shape parameters, surface texture and accent colour,
- product -> one object instance (jittered leaf parameters); its 1-4 pictures are views of that instance
  (pose, scale, position, background, clutter, lighting, noise, blur).

Pictures repeat as on Cdiscount, byte for byte (only 7.77 M of the 12.37 M real train pictures are unique): half
the products show stock photos, a set of views shared with about five other products of their leaf (one in five
takes a sibling leaf's set, same level 2), and 2 % show one of a few "no picture" placeholders shared by every
category. About 37 % of the train pictures are then copies of another (1 - distinct / pictures), like the real set.

Everything derives from the seed through per-item generators (seed, kind, index), so the same config gives
byte-identical files and products could be rendered in parallel.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from prodcat.config import DemoConfig
from prodcat.data.synthetic import names
from prodcat.data.synthetic.covers import COVER_LEAVES, TEXT_DEPARTMENTS, CoverLeaf, render_cover_product
from prodcat.data.synthetic.stats import (
    CATEGORY_SIZE_QUANTILES,
    IMAGES_PER_PRODUCT,
    REAL_CATEGORIES,
    REAL_LEVEL1,
    REAL_LEVEL2,
)
from prodcat.utils import atomic_open, atomic_write_text, progress

__all__ = [
    "CategoryRow",
    "Look",
    "make_taxonomy",
    "taxonomy_shape",
    "category_counts",
    "read_taxonomy_rows",
    "counts_from_images",
    "make_looks",
    "render_product",
    "generate_demo",
]

CATEGORY_HEADER = ("category_id", "category_level1", "category_level2", "category_level3")

# Tags that keep the random streams of different purposes apart: default_rng([seed, TAG, index...]).
_TAXONOMY, _COUNTS, _SPLIT, _LEVEL1, _LEVEL2, _LEAF, _TRAIN, _TEST, _POOL, _REUSE, _STOCK, _PLACEHOLDER = range(1, 13)


class CategoryRow(NamedTuple):
    """One line of category_names.csv."""

    category_id: int
    level1: str
    level2: str
    level3: str


# ----------------------------------------------------------------------------------------------------- taxonomy


def taxonomy_shape(categories: int) -> tuple[int, int]:
    """Number of level-1 and level-2 groups for `categories` leaves, scaled from the real 5,270 / 49 / 486."""
    ratio = categories / REAL_CATEGORIES
    level1 = min(max(round(REAL_LEVEL1 * ratio**0.47), 2), categories)
    level2 = min(max(round(REAL_LEVEL2 * ratio**0.713), level1), categories)
    return level1, level2


def _spread(total: int, groups: int, sigma: float, rng: np.random.Generator) -> list[int]:
    """Split `total` items over `groups` (each >= 1) with log-normal, hence uneven, group weights."""
    weights = rng.lognormal(0.0, sigma, groups)
    extra = rng.multinomial(total - groups, weights / weights.sum())
    return (extra + 1).tolist()


def _level1_names(count: int, rng: np.random.Generator, reserved: set[str] = frozenset()) -> list[str]:
    pool = [name for name in names.LEVEL1 if name not in reserved]
    picked = [pool[i] for i in rng.permutation(len(pool))[: min(count, len(pool))]]
    # Past the vocabulary (more leaves than Cdiscount has), number the families.
    picked += [f"{pool[i % len(pool)]} {2 + i // len(pool)}" for i in range(count - len(picked))]
    return picked


def _level2_names(count: int, used: set[str], rng: np.random.Generator) -> list[str]:
    """Group names under one level-1: unique there, mostly unique overall, shared names ("ACCESSOIRES") recur."""
    chosen: list[str] = []
    if count >= 2 and rng.random() < 0.4:
        shared = names.SHARED_LEVEL2
        weights = 0.5 ** np.arange(len(shared))
        chosen.append(shared[rng.choice(len(shared), p=weights / weights.sum())])
    while len(chosen) < count:
        if rng.random() < 0.6:
            name = names.LEVEL2[rng.integers(len(names.LEVEL2))]
        else:
            parts = names.LEVEL2 + names.LEAF_NOUNS
            name = f"{parts[rng.integers(len(parts))]} - {parts[rng.integers(len(parts))]}"
        if name not in used and name not in chosen:
            used.add(name)
            chosen.append(name)
    return chosen


def _leaf_name(rng: np.random.Generator) -> str:
    noun = names.LEAF_NOUNS[rng.integers(len(names.LEAF_NOUNS))]
    form = rng.random()
    if form < 0.3:
        return noun
    if form < 0.65:
        return f"{noun} {names.LEAF_QUALIFIERS[rng.integers(len(names.LEAF_QUALIFIERS))]}"
    if form < 0.85:
        return f"{noun} - {names.LEAF_NOUNS[rng.integers(len(names.LEAF_NOUNS))]}"
    complement = names.LEAF_COMPLEMENTS[rng.integers(len(names.LEAF_COMPLEMENTS))]
    if rng.random() < 0.5:
        return f"{complement} POUR {noun}"
    return f"{complement} D'{noun}" if noun[0] in "AEIOUYÉÈÊŒ" else f"{complement} DE {noun}"


def _leaf_names(count: int, rng: np.random.Generator) -> list[str]:
    """Leaf names unique within their level-2 (also once stripped); about 1% keep a trailing space like Kaggle's."""
    chosen: list[str] = []
    seen: set[str] = set()
    while len(chosen) < count:
        name = _leaf_name(rng)
        if name in seen:
            continue
        seen.add(name)
        chosen.append(name + " " if rng.random() < 0.01 else name)
    return chosen


def make_taxonomy(categories: int, seed: int = 0, text_leaves: int = 0) -> list[CategoryRow]:
    """The synthetic category_names.csv rows, sorted by names as Kaggle's file is; ids are 10-digit, distinct.
    `text_leaves` of them are the cover leaves of prodcat.data.synthetic.covers (books, music, films, games); the other
    leaves then never use those departments' names."""
    if categories < 2:
        raise ValueError(f"categories must be >= 2, got {categories}")
    if not 0 <= text_leaves <= min(len(COVER_LEAVES), categories - 2):
        raise ValueError(f"text_leaves must be in 0..{min(len(COVER_LEAVES), categories - 2)}, got {text_leaves}")
    rng = np.random.default_rng([seed, _TAXONOMY])
    ordinary = categories - text_leaves
    level1_count, level2_count = taxonomy_shape(ordinary)
    groups_per_level1 = _spread(level2_count, level1_count, 0.9, rng)
    leaves_per_group = iter(_spread(ordinary, level2_count, 0.8, rng))
    used: set[str] = set()
    triples = [(leaf.level1, leaf.level2, leaf.level3) for leaf in COVER_LEAVES[:text_leaves]]
    reserved = set(TEXT_DEPARTMENTS) if text_leaves else set()
    for level1 in _level1_names(level1_count, rng, reserved):
        for level2 in _level2_names(groups_per_level1.pop(0), used, rng):
            triples += [(level1, level2, leaf) for leaf in _leaf_names(next(leaves_per_group), rng)]
    triples.sort()
    span = max(30_000, 4 * categories)
    ids = 1_000_000_000 + rng.choice(span, size=categories, replace=False)
    return [CategoryRow(int(i), *triple) for i, triple in zip(ids, triples)]


# ------------------------------------------------------------------------------------------ products per leaf


def _allocate(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to `weights`, each >= 1, summing to `total` (largest remainders)."""
    target = weights / weights.sum() * total
    counts = np.maximum(np.floor(target).astype(np.int64), 1)
    missing = total - int(counts.sum())
    if missing > 0:
        counts[np.argsort(counts - target, kind="stable")[:missing]] += 1
    while missing < 0:  # the floor of 1 overshot: take back from the most over-served leaves
        candidates = np.flatnonzero(counts > 1)
        take = candidates[np.argsort((counts - target)[candidates], kind="stable")[::-1][:-missing]]
        counts[take] -= 1
        missing += len(take)
    return counts


def category_counts(categories: int, products: int, seed: int = 0, tail_power: float = 1.0) -> np.ndarray:
    """Train products per leaf (in taxonomy row order), following the real long tail; each leaf gets >= 1.

    Leaf sizes are the real size quantiles at the expected order statistics of `categories` draws, in a random
    order, raised to `tail_power` (1: real shape, 0: uniform).
    """
    if products < categories:
        raise ValueError(f"need at least one product per category: products={products} < categories={categories}")
    rng = np.random.default_rng([seed, _COUNTS])
    percent = (np.arange(categories) + 1) / (categories + 1) * 100
    log_sizes = np.interp(percent, np.arange(len(CATEGORY_SIZE_QUANTILES)), np.log(CATEGORY_SIZE_QUANTILES))
    weights = np.exp(tail_power * log_sizes)[rng.permutation(categories)]
    return _allocate(weights, products)


def read_taxonomy_rows(path: str | Path) -> list[CategoryRow]:
    """A real category_names.csv as taxonomy rows (in file order, names exactly as written)."""
    from prodcat.data.taxonomy import read_category_csv

    return [CategoryRow(int(cid), l1, l2, l3) for cid, l1, l2, l3 in read_category_csv(path)]


def counts_from_images(path: str | Path, rows: list[CategoryRow], products: int) -> np.ndarray:
    """Products per leaf (row order) proportional to a `{category_id: training images}` JSON (Kaggle's real
    long tail when it is images_per_category.json); every leaf gets >= 1. Leaves missing from the file: an error."""
    import json

    images = {int(key): int(value) for key, value in json.loads(Path(path).read_text(encoding="utf-8")).items()}
    missing = [row.category_id for row in rows if row.category_id not in images]
    if missing:
        raise ValueError(f"{path}: no image count for category {missing[0]} ({len(missing)} leaves missing)")
    if products < len(rows):
        raise ValueError(f"need at least one product per category: products={products} < categories={len(rows)}")
    weights = np.array([max(images[row.category_id], 1) for row in rows], dtype=np.float64)
    return _allocate(weights, products)


def _demo_taxonomy(config: DemoConfig) -> tuple[list[CategoryRow], np.ndarray]:
    """Taxonomy rows and train products per leaf: synthetic (the default), or from the real-shape sources."""
    if config.taxonomy_csv:
        rows = read_taxonomy_rows(config.taxonomy_csv)
        if len(rows) != config.categories:
            raise ValueError(
                f"{config.taxonomy_csv} has {len(rows)} categories but categories={config.categories}; "
                f"pass --categories {len(rows)}"
            )
    else:
        rows = make_taxonomy(config.categories, config.seed, config.resolved_text_leaves())
    if config.category_counts_json:
        return rows, counts_from_images(config.category_counts_json, rows, config.products)
    return rows, category_counts(config.categories, config.products, config.seed, config.tail_power)


# ------------------------------------------------------------------------------------------------------ looks

# How far leaves stray from their level-2 group (shape, colours, texture): sets how hard leaves are to tell
# apart. Tuned so pretrained EfficientNet-Lite0 features + a linear head land well between chance and 100 %.
_LEAF_DISTINCTNESS = 0.5
_FAMILY_TEMPLATE = 0.7  # share of level-2 groups whose shape comes from their level-1's three (sibling groups alike)
_BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "radial", "blotches", "floor", "dots")
_TEXTURES = ("solid", "stripes", "dots", "checks", "gradient", "rings", "waves")


@dataclasses.dataclass(frozen=True)
class Look:
    """What fixes the appearance of one leaf's products (level-1, level-2 and leaf parts together)."""

    background: int
    background_hsv: tuple[float, float, float]
    background_hsv2: tuple[float, float, float]
    background_period: float
    template: int
    shape: tuple[float, float, float, float]
    aspect: float
    texture: int
    texture_period: float
    texture_angle: float
    body_hsv: tuple[float, float, float]
    pattern_hsv: tuple[float, float, float]
    accent_hsv: tuple[float, float, float]


def _wrap(hue: float) -> float:
    return float(hue % 1.0)


def make_looks(rows: list[CategoryRow], seed: int = 0) -> list[Look]:
    """One Look per taxonomy row; leaves under one level-1 / level-2 share that level's draws."""
    level1_draws: dict[str, dict[str, Any]] = {}
    level2_draws: dict[tuple[str, str], dict[str, Any]] = {}
    looks = []
    for leaf, row in enumerate(rows):
        if row.level1 not in level1_draws:
            level1_draws[row.level1] = _level1_draw(seed, len(level1_draws))
        level1 = level1_draws[row.level1]
        if (row.level1, row.level2) not in level2_draws:
            level2_draws[row.level1, row.level2] = _level2_draw(seed, len(level2_draws), level1)
        looks.append(
            _leaf_look(level1, level2_draws[row.level1, row.level2], np.random.default_rng([seed, _LEAF, leaf]))
        )
    return looks


def _level1_draw(seed: int, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _LEVEL1, index])
    hue = rng.random()
    return {
        "background": int(rng.integers(len(_BACKGROUNDS))),
        "bg": (hue, rng.uniform(0.1, 0.6), rng.uniform(0.55, 0.95)),
        "bg2": (_wrap(hue + rng.normal(0, 0.12)), rng.uniform(0.1, 0.7), rng.uniform(0.3, 0.9)),
        "period": rng.uniform(0.08, 0.35),
        "palette": rng.random(),  # object hue family
        "saturation": rng.uniform(0.35, 0.95),
        "templates": tuple(int(t) for t in rng.choice(len(_TEMPLATES), size=3, replace=False)),
    }


def _level2_draw(seed: int, index: int, level1: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng([seed, _LEVEL2, index])
    templates, palette, saturation = level1["templates"], level1["palette"], level1["saturation"]
    family_template = rng.random() < _FAMILY_TEMPLATE
    template = templates[rng.integers(len(templates))] if family_template else rng.integers(len(_TEMPLATES))
    return {
        "template": int(template),
        "shape": rng.random(4),
        "aspect": float(np.exp(rng.normal(0, 0.2))),
        "body": (palette + rng.normal(0, 0.07), saturation + rng.normal(0, 0.12), rng.uniform(0.35, 0.95)),
        "pattern": (rng.random(), rng.random(), rng.uniform(0.1, 1.0)),
        "accent": (rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.2, 1.0)),
        "texture": int(rng.integers(len(_TEXTURES))),
        "texture_period": rng.uniform(0.15, 0.6),
        "texture_angle": rng.uniform(0, np.pi),
    }


def _offset_hsv(
    hsv: tuple[float, float, float], rng: np.random.Generator, hue: float, rest: float
) -> tuple[float, float, float]:
    return (_wrap(hsv[0] + rng.normal(0, hue)), float(np.clip(hsv[1] + rng.normal(0, rest), 0.05, 1)),
            float(np.clip(hsv[2] + rng.normal(0, rest), 0.1, 1)))  # fmt: skip


def _leaf_look(level1: dict[str, Any], level2: dict[str, Any], rng: np.random.Generator) -> Look:
    """Siblings start from their level-2 draws and stray by offsets scaled by _LEAF_DISTINCTNESS."""
    spread = _LEAF_DISTINCTNESS
    shape = np.clip(level2["shape"] + rng.normal(0, 0.15 * spread, 4), 0.0, 1.0)
    body = _offset_hsv(level2["body"], rng, 0.05 * spread, 0.12 * spread)
    pattern = _offset_hsv(level2["pattern"], rng, 0.1 * spread, 0.15 * spread)
    accent = _offset_hsv(level2["accent"], rng, 0.1 * spread, 0.15 * spread)
    own_texture, texture = rng.random() < 0.5 * spread, int(rng.integers(len(_TEXTURES)))
    return Look(
        background=level1["background"], background_hsv=level1["bg"], background_hsv2=level1["bg2"],
        background_period=level1["period"], template=level2["template"], shape=tuple(float(s) for s in shape),
        aspect=float(level2["aspect"] * np.exp(rng.normal(0, 0.12 * spread))),
        texture=texture if own_texture else level2["texture"],
        texture_period=level2["texture_period"] * float(np.exp(rng.normal(0, 0.3 * spread))),
        texture_angle=level2["texture_angle"] + rng.normal(0, 0.5 * spread), body_hsv=body, pattern_hsv=pattern,
        accent_hsv=accent,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------- shapes
# Shapes are polygons in object units (about [-1, 1]^2), as (points, role): role 0 body, 1 hole, 2 accent.


def _ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _radial(radius: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _superellipse(exponent: float, points: int = 64) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    power = 2.0 / exponent
    return np.stack([np.sign(c) * np.abs(c) ** power, np.sign(s) * np.abs(s) ** power], axis=1)


def _regular(sides: int, roundness: float, points: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False) - np.pi / 2
    sector = 2 * np.pi / sides
    radius = np.cos(np.pi / sides) / np.cos((t + np.pi / 2) % sector - sector / 2)
    return _radial(roundness + (1 - roundness) * radius, t)


Parts = list[tuple[np.ndarray, int]]
_ANGLES = np.linspace(0, 2 * np.pi, 72, endpoint=False)

# Each shape family takes four parameters in [0, 1]; level-2 groups fix a family, leaves and products nudge them.


def _blob(p: tuple[float, ...]) -> Parts:
    band = 0.15 + 0.5 * p[1]
    return [(_superellipse(0.7 + 4 * p[0]), 0), (_rect(-1, band - 1, 1, 2 * band - 1 + 0.1 + 0.3 * p[2]), 2)]


def _polygon_shape(p: tuple[float, ...]) -> Parts:
    inner = 0.3 + 0.4 * p[2]
    return [(_regular(3 + int(p[0] * 5.99), 0.3 * p[1]), 0), (_regular(3 + int(p[3] * 3.99), 0) * inner, 2)]


def _star(p: tuple[float, ...]) -> Parts:
    points = 4 + int(p[0] * 4.99)
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, 0.3 + 0.4 * p[1])
    star = _radial(radius, np.arange(2 * points) * np.pi / points - np.pi / 2)
    return [(star, 0), (_ellipse(0, 0, 0.12 + 0.2 * p[2], 0.12 + 0.2 * p[2]), 2)]


def _flower(p: tuple[float, ...]) -> Parts:
    radius = 0.75 + (0.1 + 0.25 * p[1]) * np.cos((3 + int(p[0] * 4.99)) * _ANGLES)
    return [(_radial(radius, _ANGLES), 0), (_ellipse(0, 0, 0.2 + 0.25 * p[2], 0.2 + 0.25 * p[2]), 2)]


def _ring(p: tuple[float, ...]) -> Parts:
    hole = 0.3 + 0.35 * p[1]
    outer = _superellipse(1.5 + 4 * p[0])
    return [(outer, 0), (outer * hole, 1), (_ellipse(0, -1, 0.15 + 0.2 * p[2], 0.12 + 0.15 * p[3]), 0)]


def _bottle(p: tuple[float, ...]) -> Parts:
    width, neck, length = 0.45 + 0.35 * p[0], 0.12 + 0.2 * p[1], 0.2 + 0.35 * p[2]
    body = _superellipse(3 + 3 * p[3]) * [width, 0.75 - length / 2] + [0, 0.25 + length / 2]
    top = length / 2 - 0.5 - length
    label, cap = _rect(-width, 0.2, width, 0.55), _rect(-neck - 0.03, top - 0.1, neck + 0.03, top + 0.08)
    return [(body, 0), (_rect(-neck, top, neck, 0.0), 0), (label, 2), (cap, 2)]


def _mug(p: tuple[float, ...]) -> Parts:
    width = 0.45 + 0.3 * p[0]
    handle = _ellipse(width, 0, 0.3 + 0.15 * p[2], 0.35)
    hole = handle * [0.55, 0.55] + [width * 0.45, 0]
    body = _superellipse(4 + 6 * p[3]) * [width, 0.8]
    return [(handle, 0), (hole, 1), (body, 0), (_rect(-width, -0.1, width, 0.15 + 0.3 * p[1]), 2)]


def _lamp(p: tuple[float, ...]) -> Parts:
    top, base = 0.15 + 0.35 * p[0], 0.3 + 0.5 * p[1]
    shade = np.array([[-top, -0.9], [top, -0.9], [0.75, -0.15], [-0.75, -0.15]])
    stripe = _rect(-1, -0.6 + 0.3 * p[2], 1, -0.45 + 0.3 * p[2])
    return [(shade, 0), (_rect(-0.06, -0.15, 0.06, 0.8), 0), (_ellipse(0, 0.85, base, 0.12), 0), (stripe, 2)]


def _screen(p: tuple[float, ...]) -> Parts:
    half, margin, foot = 0.55 + 0.2 * p[0], 0.06 + 0.12 * p[2], 0.15 + 0.3 * p[1]
    panel = _rect(-1 + margin, -half + margin, 1 - margin, half * 0.8 - margin)
    return [(_rect(-1, -half, 1, half * 0.8), 0), (_rect(-foot, half * 0.8, foot, half * 0.8 + 0.3), 0), (panel, 2)]


def _cross(p: tuple[float, ...]) -> Parts:
    arm, length = 0.2 + 0.3 * p[0], 0.6 + 0.4 * p[1]
    return [(_rect(-arm, -1, arm, 1), 0), (_rect(-length, -arm, length, arm), 0), (_regular(4, 0.5 * p[2]) * arm, 2)]


def _arrow(p: tuple[float, ...]) -> Parts:
    shaft, head, width = 0.1 + 0.2 * p[0], 0.3 + 0.5 * p[1], 0.4 + 0.5 * p[2]
    tip = 1 - head
    outline = [[-1, -shaft], [tip, -shaft], [tip, -width], [1, 0], [tip, width], [tip, shaft], [-1, shaft]]
    return [(np.array(outline, dtype=float), 0), (_rect(-1, -shaft, -1 + 0.2 + 0.4 * p[3], shaft), 2)]


def _heart(p: tuple[float, ...]) -> Parts:
    t = _ANGLES
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - (5 + 2 * p[0]) * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    heart = np.stack([x * (0.8 + 0.3 * p[1]), y], axis=1) / 16
    return [(heart, 0), (_ellipse(-0.35, -0.3, 0.12 + 0.15 * p[2], 0.1 + 0.1 * p[2]), 2)]


def _crescent(p: tuple[float, ...]) -> Parts:
    bite = _ellipse(0.25 + 0.45 * p[0], -0.1 * p[2], 0.7 + 0.25 * p[1], 0.9, 56)
    return [(_ellipse(0, 0, 1, 1, 56), 0), (bite, 1), (_ellipse(-0.7, 0, 0.12 + 0.12 * p[3], 0.12 + 0.12 * p[3]), 2)]


def _chair(p: tuple[float, ...]) -> Parts:
    legs = 2 + int(p[0] * 2.99)
    seat, back = 0.1 + 0.15 * p[1], 0.15 + 0.85 * p[2]
    parts = [(_rect(-0.8, -seat, 0.8, seat), 0), (_rect(-0.8, -seat - back, -0.62, 0), 0)]
    parts += [(_rect(x, seat, x + 0.1, 1), 0) for x in np.linspace(-0.75, 0.65, legs)]
    return parts + [(_rect(-0.8, -seat * p[3], 0.8, seat), 2)]


_SHAPES: dict[str, Callable[[tuple[float, ...]], Parts]] = {
    "blob": _blob, "polygon": _polygon_shape, "star": _star, "flower": _flower, "ring": _ring, "bottle": _bottle,
    "mug": _mug, "lamp": _lamp, "screen": _screen, "cross": _cross, "arrow": _arrow, "heart": _heart,
    "crescent": _crescent, "chair": _chair,
}  # fmt: skip
_TEMPLATES = tuple(_SHAPES)  # looks store an index into this: append new shapes at the end


def _shape_parts(template: str, p: tuple[float, ...]) -> Parts:
    """Polygons for one object (points, role): role 0 body, 1 hole, 2 accent (drawn over the body only)."""
    return _SHAPES[template](p)


# -------------------------------------------------------------------------------------------------- rendering
# One product = one _Instance (jittered leaf look); each picture draws a fresh view of it. Per-pixel work runs
# in PIL or on small numpy crops: about 3 ms a picture on one core, JPEG included.

_STUDIO_BACKGROUND = 0.35  # share of pictures on a near-white studio background, whatever the level-1 style
_FOREIGN_BACKGROUND = 0.15  # share of pictures on a random background family and colours (a shop's own)
_OCCLUDER = 0.25  # share of pictures with a distractor in front of the object
_UPRIGHT = 0.7  # share of instances photographed upright (small tilt) rather than at any angle
_COLOUR_VARIANT = 0.3  # share of products in a colour of their own rather than the leaf's
_INSTANCE_SHAPE_SPREAD = 0.06  # product-to-product spread of the shape parameters (in [0, 1] units)
_SHADES = 32  # quantisation of texture amount and shading in the surface colour table


@dataclasses.dataclass(frozen=True)
class _Instance:
    parts: list[tuple[np.ndarray, int]]
    aspect: float
    body: np.ndarray
    pattern: np.ndarray
    accent: tuple[int, int, int]
    texture: int
    period: float
    angle: float
    phase: float
    upright: bool


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y coordinates, in pixels."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    xs, ys = np.meshgrid(axis, axis)
    return xs, ys


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed tile of Gaussian noise; each picture takes a crop at a random offset (cheaper than fresh noise)."""
    return np.random.default_rng(0x5EED).standard_normal((size + 64, size + 64, 3), dtype=np.float32)


def _rgb(hsv: tuple[float, float, float]) -> np.ndarray:
    import colorsys

    hue, saturation, value = hsv
    rgb = colorsys.hsv_to_rgb(float(hue) % 1.0, float(np.clip(saturation, 0, 1)), float(np.clip(value, 0, 1)))
    return np.array(rgb, dtype=np.float32)


def _rgb8(rgb: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.asarray(rgb) * 255 + 0.5, 0, 255))  # type: ignore[return-value]


def _jitter(
    hsv: tuple[float, float, float], rng: np.random.Generator, hue: float, sat: float, val: float
) -> tuple[float, float, float]:
    return (hsv[0] + rng.normal(0, hue), hsv[1] + rng.normal(0, sat), hsv[2] + rng.normal(0, val))


def _draw_instance(look: Look, rng: np.random.Generator) -> _Instance:
    """One product: the leaf look with small changes, sometimes in another colour (as shops sell colour variants)."""
    shape = tuple(np.clip(np.asarray(look.shape) + rng.normal(0, _INSTANCE_SHAPE_SPREAD, 4), 0.0, 1.0))
    body = _jitter(look.body_hsv, rng, 0.03, 0.1, 0.1)
    if rng.random() < _COLOUR_VARIANT:
        body = (rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))
    return _Instance(
        parts=_shape_parts(_TEMPLATES[look.template], shape), aspect=look.aspect * float(np.exp(rng.normal(0, 0.08))),
        body=_rgb(body), pattern=_rgb(_jitter(look.pattern_hsv, rng, 0.04, 0.1, 0.1)),
        accent=_rgb8(_rgb(_jitter(look.accent_hsv, rng, 0.04, 0.1, 0.1))), texture=look.texture,
        period=look.texture_period * float(np.exp(rng.normal(0, 0.15))),
        angle=look.texture_angle + rng.normal(0, 0.3), phase=rng.uniform(0, 2 * np.pi),
        upright=bool(rng.random() < _UPRIGHT),
    )  # fmt: skip


def _background_mix(kind: str, period: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """Mix between the two background colours in [0, 1], computed at half size (it is smooth anyway)."""
    half = max(size // 2, 8)
    xs, ys = _grid(half)
    x, y = xs * (2 / half) - 1, ys * (2 / half) - 1
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    along, across = x * np.cos(angle) + y * np.sin(angle), y * np.cos(angle) - x * np.sin(angle)
    if kind == "plain":
        return 0.15 * (x * x + y * y)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * along, 0, 1)
    if kind == "stripes":
        return np.clip(0.5 + 1.5 * np.sin(2 * np.pi * along / period + phase), 0, 1)
    if kind == "checker":
        return (np.floor(along / period + phase) + np.floor(across / period)) % 2
    if kind == "radial":
        return np.clip(np.sqrt(x * x + y * y) / 1.4, 0, 1)
    if kind == "blotches":
        return np.asarray(Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8)).resize(
            (half, half), Image.Resampling.BICUBIC), dtype=np.float32) / 255  # fmt: skip
    if kind == "floor":
        return np.clip((y - rng.uniform(-0.2, 0.5)) * 8, 0, 1) * 0.8 + 0.2 * np.clip(0.5 + 0.5 * along, 0, 1)
    cell_x, cell_y = (along / period + phase) % 1 - 0.5, (across / period) % 1 - 0.5  # dots
    return np.clip((0.08 - cell_x * cell_x - cell_y * cell_y) * 30, 0, 1)


def _background(look: Look, rng: np.random.Generator, size: int) -> Image.Image:
    """The level-1 background family (or a studio white), with a fresh angle, phase and tint per view."""
    roll = rng.random()
    if roll < _STUDIO_BACKGROUND:
        kind = "gradient"
        low, high = _rgb((rng.random(), rng.uniform(0, 0.05), rng.uniform(0.93, 1))), _rgb((0, 0, rng.uniform(0.8, 1)))
    elif roll < _STUDIO_BACKGROUND + _FOREIGN_BACKGROUND:
        kind = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
        low, high = _rgb(tuple(rng.random(3))), _rgb(tuple(rng.random(3)))  # type: ignore[arg-type]
    else:
        kind = _BACKGROUNDS[look.background]
        low = _rgb(_jitter(look.background_hsv, rng, 0.02, 0.06, 0.06))
        high = _rgb(_jitter(look.background_hsv2, rng, 0.02, 0.06, 0.06))
    period = look.background_period * float(np.exp(rng.normal(0, 0.15)))
    mix = _background_mix(kind, period, rng, size)
    table = (low + (high - low) * np.linspace(0, 1, 256, dtype=np.float32)[:, None]) * 255 + 0.5
    small = Image.fromarray(table.astype(np.uint8)[np.clip(mix * 255, 0, 255).astype(np.uint8)])
    return small.resize((size, size), Image.Resampling.BILINEAR)


def _polygon(points: np.ndarray, matrix: np.ndarray, offset: np.ndarray, factor: float = 1.0) -> list[float]:
    return ((points @ matrix.T + offset) * factor).ravel().tolist()


def _rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])


def _distractors(canvas: Image.Image, rng: np.random.Generator, count: int, largest: float) -> None:
    size = canvas.size[0]
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        parts = _shape_parts(_TEMPLATES[rng.integers(len(_TEMPLATES))], tuple(rng.random(4)))
        matrix = size / 2 * rng.uniform(0.1, largest) * _rotation(rng.uniform(0, 2 * np.pi))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        offset = rng.uniform(0, size, 2)
        for points, role in parts:
            if role != 1:
                draw.polygon(_polygon(points, matrix, offset), fill=colour)


def _clutter(canvas: Image.Image, rng: np.random.Generator) -> None:
    """Distractor shapes and text-like marks behind the object, as in cluttered shop photos."""
    size = canvas.size[0]
    _distractors(canvas, rng, min(int(rng.poisson(1.0)), 4), 0.35)
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.25:  # a line of "text": short dark bars
        x, y, height = rng.uniform(0, size * 0.6), rng.uniform(0, size * 0.9), rng.uniform(3, 8) * size / 180
        shade = int(rng.integers(0, 90))
        for _ in range(int(rng.integers(3, 9))):
            width = rng.uniform(3, 14) * size / 180
            draw.rectangle((x, y, x + width, y + height), fill=(shade, shade, shade))
            x += width + rng.uniform(2, 5) * size / 180


def _pose(instance: _Instance, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Object units -> pixels: rotation, mirror, scale, aspect, position of one view."""
    angle = rng.normal(0, 0.25) if instance.upright else rng.uniform(0, 2 * np.pi)
    mirror = 1.0 if rng.random() < 0.5 else -1.0
    stretch = np.array([np.sqrt(instance.aspect), 1 / np.sqrt(instance.aspect)])
    stretch /= stretch.max()
    matrix = size / 2 * rng.uniform(0.4, 0.85) * _rotation(angle) @ np.diag(stretch * [mirror, 1.0])
    offset = np.clip(size / 2 + rng.normal(0, 0.08 * size, 2), 0.3 * size, 0.7 * size)
    return matrix, offset


def _shadow(
    canvas: Image.Image, instance: _Instance, matrix: np.ndarray, offset: np.ndarray, rng: np.random.Generator
) -> Image.Image:
    """A soft drop shadow: the silhouette, shifted and blurred, darkens the background."""
    if rng.random() < 0.4:
        return canvas
    size = canvas.size[0]
    shift = offset + rng.uniform(-8, 8, 2) * size / 180
    half = Image.new("L", (size // 2, size // 2))  # blurred anyway: draw and blur at half size
    draw = ImageDraw.Draw(half)
    strength = int(rng.integers(50, 130))
    for points, role in instance.parts:
        draw.polygon(_polygon(points, matrix, shift, 0.5), fill=strength if role != 1 else 0)
    blur = rng.uniform(1, 2.5) * size / 180
    mask = half.filter(ImageFilter.GaussianBlur(blur)).resize(canvas.size, Image.Resampling.BILINEAR)
    return Image.composite(Image.new("RGB", canvas.size), canvas, mask)


def _box(instance: _Instance, matrix: np.ndarray, offset: np.ndarray, size: int) -> tuple[int, int, int, int]:
    points = np.concatenate([p for p, role in instance.parts if role == 0]) @ matrix.T + offset
    low = np.clip(np.floor(points.min(axis=0)), 0, size - 1).astype(int)
    high = np.clip(np.ceil(points.max(axis=0)) + 1, low + 1, size).astype(int)
    return int(low[0]), int(low[1]), int(high[0]), int(high[1])


def _masks(
    instance: _Instance, matrix: np.ndarray, offset: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[Image.Image, Image.Image]:
    """Body and accent coverage over `box`, drawn at twice the size then halved for smooth edges."""
    width, height = box[2] - box[0], box[3] - box[1]
    body, accent = Image.new("L", (2 * width, 2 * height)), Image.new("L", (2 * width, 2 * height))
    draw_body, draw_accent = ImageDraw.Draw(body), ImageDraw.Draw(accent)
    local = offset - np.array(box[:2])
    for points, role in instance.parts:
        polygon = _polygon(points, matrix, local, 2.0)
        if role == 2:
            draw_accent.polygon(polygon, fill=255)
        else:
            draw_body.polygon(polygon, fill=255 if role == 0 else 0)
    body = body.reduce(2)
    return body, ImageChops.multiply(accent.reduce(2), body)


def _texture(instance: _Instance, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pattern amount in [0, 1] over object coordinates, so it turns and scales with the object."""
    kind, period, phase = _TEXTURES[instance.texture], instance.period, instance.phase
    along = u * np.cos(instance.angle) + v * np.sin(instance.angle)
    across = v * np.cos(instance.angle) - u * np.sin(instance.angle)
    if kind == "solid":
        return np.zeros_like(u)
    if kind == "stripes":
        return np.clip(0.5 + 2 * np.sin(2 * np.pi * along / period + phase), 0, 1)
    if kind == "dots":
        cell_x, cell_y = (along / period + phase) % 1 - 0.5, (across / period) % 1 - 0.5
        return np.clip((0.09 - cell_x * cell_x - cell_y * cell_y) * 40, 0, 1)
    if kind == "checks":
        return (np.floor(along / period + phase) + np.floor(across / period)) % 2
    if kind == "gradient":
        return np.clip(0.5 + 0.6 * along, 0, 1)
    if kind == "rings":
        return np.clip(0.5 + 2 * np.sin(2 * np.pi * np.sqrt(u * u + v * v) / period + phase), 0, 1)
    wave = along + 0.15 * np.sin(2 * np.pi * across / period)
    return np.clip(0.5 + 2 * np.sin(2 * np.pi * wave / (0.7 * period) + phase), 0, 1)


def _surface(
    instance: _Instance,
    matrix: np.ndarray,
    offset: np.ndarray,
    box: tuple[int, int, int, int],
    rng: np.random.Generator,
) -> Image.Image:
    """Object colour over `box`: body colour, pattern, and a soft light from one side."""
    axis_x = np.arange(box[0], box[2], dtype=np.float32) + np.float32(0.5 - offset[0])
    axis_y = np.arange(box[1], box[3], dtype=np.float32) + np.float32(0.5 - offset[1])
    inverse = np.linalg.inv(matrix).astype(np.float32)
    u = inverse[0, 0] * axis_x[None, :] + inverse[0, 1] * axis_y[:, None]
    v = inverse[1, 0] * axis_x[None, :] + inverse[1, 1] * axis_y[:, None]
    light, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.3)
    shade = np.clip(u * np.cos(light) + v * np.sin(light), -1, 1) * 0.5 + 0.5
    steps = np.linspace(0, 1, _SHADES, dtype=np.float32)
    colours = instance.body + (instance.pattern - instance.body) * steps[:, None]  # by texture amount
    lights = 1 + strength * (2 * steps - 1)  # by position along the light
    table = np.clip(colours[:, None, :] * lights[None, :, None] * 255 + 0.5, 0, 255).astype(np.uint8)
    amount = (_texture(instance, u, v) * (_SHADES - 1) + 0.5).astype(np.intp)
    return Image.fromarray(table[amount, (shade * (_SHADES - 1) + 0.5).astype(np.intp)])


def _finish(canvas: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera-ish variation: exposure, contrast, white balance, sensor noise, focus blur."""
    contrast, brightness = rng.uniform(0.8, 1.15), rng.normal(0, 0.05)
    gains = 1 + rng.normal(0, 0.04, 3)
    levels = np.linspace(0, 1, 256)
    table = ((levels[None, :] - 0.5) * contrast + 0.5 + brightness) * gains[:, None] * 255 + 0.5
    canvas = canvas.point(np.clip(table, 0, 255).astype(np.uint8).ravel().tolist())
    sigma = rng.uniform(0, 9)
    if sigma > 2:
        size = canvas.size[0]
        dx, dy = (int(d) for d in rng.integers(0, 64, 2))
        noise = _noise_bank(size)[dy : dy + size, dx : dx + size] * np.float32(sigma)
        canvas = Image.fromarray(np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.3)))
    return canvas


def _render_view(look: Look, instance: _Instance, rng: np.random.Generator, size: int) -> Image.Image:
    canvas = _background(look, rng, size)
    _clutter(canvas, rng)
    matrix, offset = _pose(instance, rng, size)
    canvas = _shadow(canvas, instance, matrix, offset, rng)
    box = _box(instance, matrix, offset, size)
    body, accent = _masks(instance, matrix, offset, box)
    canvas.paste(_surface(instance, matrix, offset, box, rng), box, body)
    canvas.paste(instance.accent, box, accent)
    if rng.random() < _OCCLUDER:
        _distractors(canvas, rng, 1, 0.22)
    return _finish(canvas, rng)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_product(look: Look, rng: np.random.Generator, views: int, size: int = 180, quality: int = 90) -> list[bytes]:
    """JPEG bytes of `views` pictures of one new instance of a leaf's object (different poses and backgrounds)."""
    instance = _draw_instance(look, rng)
    return [_jpeg(_render_view(look, instance, rng, size), quality) for _ in range(views)]


# ------------------------------------------------------------------------------------------------------ files


def _product_ids(train: int, test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Increasing int32 ids with small gaps, train and test interleaved in one id space as in Kaggle's files."""
    rng = np.random.default_rng([seed, _SPLIT])
    total = train + test
    ids = np.cumsum(1 + (rng.random(total) < 0.1) * rng.integers(1, 4, total)) - 1
    is_test = np.zeros(total, dtype=bool)
    is_test[rng.choice(total, size=test, replace=False)] = True
    return ids[~is_test].astype(np.int32), ids[is_test].astype(np.int32)


def _product_labels(counts: np.ndarray, test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Leaf of every train product (shuffled) and of every test product (same class frequencies)."""
    rng = np.random.default_rng([seed, _SPLIT, 1])
    train = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    rng.shuffle(train)
    return train, rng.choice(len(counts), size=test, p=counts / counts.sum()).astype(np.int32)


_PRODUCTS_PER_STOCK_SET = 6  # products expected to show one leaf's stock set (sets per leaf scale with its size)
_SIBLING_STOCK = 0.25  # share of stock products showing any set of their level-2 group (often a sibling leaf's)
_PLACEHOLDER_WEIGHTS = (0.6, 0.25, 0.15)  # a few "no picture" placeholders, the first the most common


class _StockSet:
    """Views of one rendered instance, rendered on demand in a fixed order (so every product gets the same bytes)."""

    def __init__(self, look: Look, rng: np.random.Generator, size: int, quality: int) -> None:
        self.look, self.rng, self.size, self.quality = look, rng, size, quality
        self.instance = _draw_instance(look, rng)
        self.views: list[bytes] = []

    def first(self, count: int) -> list[bytes]:
        while len(self.views) < count:
            self.views.append(_jpeg(_render_view(self.look, self.instance, self.rng, self.size), self.quality))
        return self.views[:count]


def _placeholder(index: int, seed: int, size: int, quality: int) -> bytes:
    """A shop's "no picture" image: flat light background, a grey camera pictogram, a caption bar."""
    rng = np.random.default_rng([seed, _PLACEHOLDER, index])
    tone = int(rng.integers(215, 250))
    canvas = Image.new("RGB", (size, size), (tone, tone, tone - int(rng.integers(0, 12))))
    draw, unit = ImageDraw.Draw(canvas), size / 10
    shade = int(rng.integers(120, 180))
    draw.rounded_rectangle((2.5 * unit, 3.5 * unit, 7.5 * unit, 6.8 * unit), radius=unit / 2, fill=(shade,) * 3)
    draw.rectangle((4 * unit, 2.9 * unit, 6 * unit, 3.6 * unit), fill=(shade,) * 3)
    draw.ellipse((4 * unit, 4.1 * unit, 6 * unit, 6.1 * unit), fill=(tone,) * 3)
    draw.rectangle((2 * unit, 7.6 * unit, (3.5 + 4.5 * rng.random()) * unit, 8.1 * unit), fill=(shade - 40,) * 3)
    return _jpeg(canvas, quality)


class _CoverStock:
    """A cover leaf's stock set: four photos of one cover, rendered at first use."""

    def __init__(self, leaf: CoverLeaf, rng: np.random.Generator, size: int, quality: int) -> None:
        self.views = render_cover_product(leaf, rng, 4, size, quality)

    def first(self, count: int) -> list[bytes]:
        return self.views[:count]


def cover_leaves(rows: list[CategoryRow]) -> dict[int, CoverLeaf]:
    """Taxonomy row index -> its cover leaf, for the rows that are text-heavy cover leaves."""
    by_names = {(leaf.level1, leaf.level2, leaf.level3): leaf for leaf in COVER_LEAVES}
    return {k: by_names[tuple(row[1:])] for k, row in enumerate(rows) if tuple(row[1:]) in by_names}


class _Pictures:
    """Pictures of one product: freshly rendered, a leaf's stock photos, a placeholder, or from a per-leaf pool."""

    def __init__(self, looks: list[Look], rows: list[CategoryRow], counts: np.ndarray, config: DemoConfig) -> None:
        self.looks, self.config = looks, config
        self.covers = cover_leaves(rows) if config.resolved_text_leaves() else {}
        self.instances = None if config.unique_images_per_leaf is None else config.unique_images_per_leaf // 4
        self.pool: dict[tuple[int, int], list[bytes]] = {}
        self.stock: dict[tuple[int, int], _StockSet] = {}
        self.placeholders: dict[int, bytes] = {}
        self.sets = np.maximum(1, np.round(counts * config.stock_share / _PRODUCTS_PER_STOCK_SET)).astype(np.int64)
        by_group: dict[tuple[str, str], list[int]] = {}
        for leaf, row in enumerate(rows):
            by_group.setdefault((row.level1, row.level2), []).append(leaf)
        self.siblings = [by_group[row.level1, row.level2] for row in rows]  # the leaf itself included

    def __call__(self, leaf: int, rng: np.random.Generator, reuse: np.random.Generator) -> list[bytes]:
        """`rng` renders the product's own pictures; `reuse` decides whether it shows shared ones instead."""
        views = int(rng.choice(len(IMAGES_PER_PRODUCT), p=IMAGES_PER_PRODUCT)) + 1
        size, quality = self.config.image_size, self.config.jpeg_quality
        if self.instances is not None:
            return self._pooled(leaf, rng, views)
        roll = reuse.random()
        if roll < self.config.placeholder_share:
            index = int(reuse.choice(len(_PLACEHOLDER_WEIGHTS), p=_PLACEHOLDER_WEIGHTS))
            if index not in self.placeholders:
                self.placeholders[index] = _placeholder(index, self.config.seed, size, quality)
            return [self.placeholders[index]]
        if roll < self.config.placeholder_share + self.config.stock_share:
            return self._stock(leaf, reuse, views)
        return self._render(leaf, rng, views)

    def _render(self, leaf: int, rng: np.random.Generator, views: int) -> list[bytes]:
        size, quality = self.config.image_size, self.config.jpeg_quality
        if leaf in self.covers:
            return render_cover_product(self.covers[leaf], rng, views, size, quality)
        return render_product(self.looks[leaf], rng, views, size, quality)

    def _stock(self, leaf: int, reuse: np.random.Generator, views: int) -> list[bytes]:
        siblings = self.siblings[leaf]
        if len(siblings) > 1 and reuse.random() < _SIBLING_STOCK:
            # Any set of the level-2 group alike: a small leaf's few sets are not flooded by a big sibling's products.
            sets = self.sets[siblings]
            pick = int(reuse.integers(sets.sum()))
            at = int(np.searchsorted(np.cumsum(sets), pick, side="right"))
            key = (siblings[at], pick - int(sets[:at].sum()))
        else:
            key = (leaf, int(reuse.integers(self.sets[leaf])))
        if key not in self.stock:  # rendered on first use: sets nobody shows cost nothing
            set_rng = np.random.default_rng([self.config.seed, _STOCK, *key])
            size, quality = self.config.image_size, self.config.jpeg_quality
            if key[0] in self.covers:  # a cover set prints its own leaf's words, whoever shows it
                self.stock[key] = _CoverStock(self.covers[key[0]], set_rng, size, quality)
            else:
                self.stock[key] = _StockSet(self.looks[leaf], set_rng, size, quality)
        return self.stock[key].first(views)

    def _pooled(self, leaf: int, rng: np.random.Generator, views: int) -> list[bytes]:
        key = (leaf, int(rng.integers(self.instances)))
        if key not in self.pool:  # render lazily: small leaves never pay for their whole pool
            pool_rng = np.random.default_rng([self.config.seed, _POOL, *key])
            self.pool[key] = self._render(leaf, pool_rng, 4)
        return self.pool[key][:views]


def _write_bson(
    path: Path,
    ids: np.ndarray,
    leaves: np.ndarray,
    category_ids: np.ndarray | None,
    pictures: _Pictures,
    seed: int,
    tag: int,
    seen: set[bytes],
) -> tuple[int, int]:
    """Stream one BSON file (temp file then rename); returns (images, bytes). Adds picture digests to `seen`."""
    import bson

    from prodcat.data.dedupe import digest

    images = 0
    with atomic_open(path) as out:
        for index in progress(range(len(ids)), total=len(ids), desc=path.name, unit="product"):
            own, reuse = np.random.default_rng([seed, tag, index]), np.random.default_rng([seed, _REUSE, tag, index])
            jpegs = pictures(int(leaves[index]), own, reuse)
            document: dict[str, Any] = {
                "_id": int(ids[index]),
                "imgs": [{"picture": bson.Binary(jpeg)} for jpeg in jpegs],
            }
            if category_ids is not None:
                document["category_id"] = int(category_ids[leaves[index]])
            out.write(bson.encode(document))
            images += len(jpegs)
            seen.update(digest(jpeg) for jpeg in jpegs)
    return images, path.stat().st_size


def _csv_text(header: tuple[str, ...], rows: list[tuple[Any, ...]] | Iterator[tuple[Any, ...]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def generate_demo(out_dir: str | Path, config: DemoConfig) -> dict[str, Any]:
    """Write category_names.csv, train.bson, test.bson and sample_submission.csv into `out_dir`; return counts."""
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, counts = _demo_taxonomy(config)
    train_leaves, test_leaves = _product_labels(counts, config.test_products, config.seed)
    train_ids, test_ids = _product_ids(config.products, config.test_products, config.seed)
    category_ids = np.array([row.category_id for row in rows], dtype=np.int64)
    atomic_write_text(out / "category_names.csv", _csv_text(CATEGORY_HEADER, [tuple(row) for row in rows]))

    pictures = _Pictures(make_looks(rows, config.seed), rows, counts, config)
    train_seen: set[bytes] = set()
    train_images, train_bytes = _write_bson(
        out / "train.bson", train_ids, train_leaves, category_ids, pictures, config.seed, _TRAIN, train_seen
    )
    seen = set(train_seen)
    test_images, test_bytes = _write_bson(
        out / "test.bson", test_ids, test_leaves, None, pictures, config.seed, _TEST, seen
    )
    most_frequent = int(category_ids[int(np.argmax(counts))])
    atomic_write_text(
        out / "sample_submission.csv", _csv_text(("_id", "category_id"), ((int(i), most_frequent) for i in test_ids))
    )
    return {
        "train_products": config.products, "test_products": config.test_products, "train_images": train_images,
        "test_images": test_images, "categories": config.categories,
        "level1": len({row.level1 for row in rows}), "level2": len({(row.level1, row.level2) for row in rows}),
        "largest_category_products": int(counts.max()), "median_category_products": float(np.median(counts)),
        "most_frequent_category": most_frequent, "train_bytes": train_bytes, "test_bytes": test_bytes,
        "unique_pictures": len(seen),  # distinct by content, train and test together
        "train_duplicate_share": round(1 - len(train_seen) / max(train_images, 1), 4),  # 1 - distinct / pictures
        "seconds": round(time.perf_counter() - start, 2),
    }  # fmt: skip
