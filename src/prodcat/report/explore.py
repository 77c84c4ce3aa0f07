"""`prodcat explore`: what the catalog looks like before any model sees it -> W/reports/explore/.

Reproduces the reference Cdiscount exploration notebook (totals, categories per level, log-log histograms of
products per category, the largest and smallest categories) and adds what it left out: the images-per-product
distribution, the rank-frequency (Zipf) curve with how few leaves cover half or 90 % of the products, the level-1
breakdown, per-split numbers, and categories of the taxonomy that have no product at all.

Everything is counted with `np.bincount` over label indices read from Parquet (three columns), so the full
7.07 M-product catalog takes a few seconds; nothing loops over products in Python.

Outputs: summary.json (every number), index.html (self-contained page; PNG figures beside it), config.json.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from matplotlib.axes import Axes

from prodcat.config import ExploreConfig, save_config
from prodcat.data.split import SPLITS
from prodcat.data.taxonomy import Taxonomy
from prodcat.paths import WorkPaths
from prodcat.report import figures
from prodcat.report.markup import cards as html_cards
from prodcat.report.markup import esc, figure, num, page, table
from prodcat.report.markup import share as share_text
from prodcat.utils import atomic_write_text, get_logger, write_json

__all__ = [
    "explore",
    "CatalogCounts",
    "count_catalog",
    "group_products",
    "summarise",
    "ranked_categories",
    "coverage",
    "render_html",
    "FIGURES",
    "COVERAGE_SHARES",
]

FIGURES = {
    "hist_products_per_category": "hist_products_per_category.png",
    "images_per_product": "images_per_product.png",
    "rank_frequency": "rank_frequency.png",
    "products_per_level1": "products_per_level1.png",
}
COVERAGE_SHARES = (0.5, 0.8, 0.9, 0.99)
_TOP_SHARE_RANKS = (1, 10, 100, 1000)
_SPLITS = SPLITS  # train, val, holdout: rows 0, 1, 2 of CatalogCounts.leaf_products
log = get_logger("prodcat.explore")


@dataclasses.dataclass(frozen=True)
class CatalogCounts:
    """Everything explore needs, reduced from the catalogs: per-leaf and per-image-count tallies."""

    leaf_products: np.ndarray  # (3, C) int64: products per leaf in train, val and holdout (rows 0, 1, 2)
    leaf_images: np.ndarray  # (C,) int64 images per leaf, all splits
    images_per_product: dict[str, np.ndarray]  # set name -> products having k images at index k
    test_products: int | None  # None when there is no test catalog
    test_images: int | None


def explore(workdir: str | Path, top_k: int = ExploreConfig.top_k) -> dict:
    """Summarise `W/catalog/*.parquet` + `W/taxonomy.parquet`; returns the summary also written as JSON."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    start = time.perf_counter()
    paths = WorkPaths(workdir)
    out = paths.report("explore")
    if not paths.taxonomy.is_file():
        raise FileNotFoundError(f"{paths.taxonomy}: no taxonomy; run `prodcat ingest DATA_DIR --workdir {workdir}`")
    taxonomy = Taxonomy.load(paths.taxonomy)
    counts = count_catalog(paths, taxonomy.num_classes)
    summary = summarise(taxonomy, counts, top_k)
    summary["duplicates"] = duplicate_pictures(paths, taxonomy, out)
    _draw_figures(out, taxonomy, counts, summary)
    summary["files"] = {"summary": "summary.json", "html": "index.html", "config": "config.json", **FIGURES}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    atomic_write_text(out / "index.html", render_html(summary, out))
    write_json(out / "summary.json", summary)
    save_config(ExploreConfig(workdir=str(workdir), top_k=top_k), out / "config.json")
    log.info(
        "explore: %s products, %s images -> %s (%.1f s)",
        f"{summary['products']:,}",
        f"{summary['images']:,}",
        out,
        summary["seconds"],
    )
    return summary


# -- reading and counting ---------------------------------------------------------------------------------------
def count_catalog(paths: WorkPaths, num_classes: int) -> CatalogCounts:
    """Tally the train catalog (required) and the test catalog (optional) with bincounts."""
    train_path = paths.catalog_table("train")
    table = _read_columns(train_path, ("label", "num_images", "split"), paths.root)
    labels = _column_numpy(train_path, table, "label")
    num_images = _column_numpy(train_path, table, "num_images")
    _check_range(train_path, "label", labels, 0, num_classes - 1, "taxonomy.parquet and the catalog disagree")
    _check_range(train_path, "num_images", num_images, 0, None, "image counts cannot be negative")
    if table.column("split").null_count:
        raise ValueError(f"{train_path}: field 'split' has {table.column('split').null_count} null value(s)")
    codes = _split_codes(train_path, table.column("split"))
    del table
    leaf_products = np.stack([np.bincount(labels[codes == i], minlength=num_classes) for i in range(len(_SPLITS))])
    leaf_products = leaf_products.astype(np.int64)
    # float64 weights are exact far past 12 M images (2**53); round only guards the float sum.
    leaf_images = np.rint(np.bincount(labels, weights=num_images, minlength=num_classes)).astype(np.int64)
    width = int(num_images.max(initial=0)) + 1
    per_product = {name: np.bincount(num_images[codes == i], minlength=width) for i, name in enumerate(_SPLITS)}
    test_products = test_images = None
    test_path = paths.catalog_table("test")
    if test_path.is_file():
        test_counts = _column_numpy(test_path, _read_columns(test_path, ("num_images",), paths.root), "num_images")
        _check_range(test_path, "num_images", test_counts, 0, None, "image counts cannot be negative")
        per_product["test"] = np.bincount(test_counts, minlength=1)
        test_products, test_images = len(test_counts), int(test_counts.sum(dtype=np.int64))
    return CatalogCounts(leaf_products, leaf_images, per_product, test_products, test_images)


def _read_columns(path: Path, columns: tuple[str, ...], root: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no catalog; run `prodcat ingest DATA_DIR --workdir {root}` first")
    present = set(pq.read_schema(path).names)
    missing = [name for name in columns if name not in present]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; re-run ingest")
    return pq.read_table(path, columns=list(columns))


def _column_numpy(path: Path, table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"{path}: field {name!r} has {column.null_count} null value(s)")
    return column.to_numpy()


def _check_range(path: Path, field: str, values: np.ndarray, low: int, high: int | None, why: str) -> None:
    bad = values < low if high is None else (values < low) | (values > high)
    if values.size and bad.any():
        row = int(np.argmax(bad))
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{path}: row {row}: field {field!r} is {values[row]}, expected {allowed} ({why})")


def _split_codes(path: Path, column: pa.ChunkedArray) -> np.ndarray:
    """Index into `_SPLITS` of every row's `split`; dictionary chunks are read by code, not as 7 M strings."""
    parts = [_chunk_codes(path, chunk) for chunk in column.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int8)


def _chunk_codes(path: Path, chunk: pa.Array) -> np.ndarray:
    if pa.types.is_dictionary(chunk.type):
        names = np.asarray(chunk.dictionary.to_pylist(), dtype=object)
        indices = chunk.indices.to_numpy(zero_copy_only=False)
        used = names[np.unique(indices)] if indices.size else names[:0]
    else:
        names, indices = np.unique(chunk.to_numpy(zero_copy_only=False).astype(object), return_inverse=True)
        used = names
    unknown = sorted(set(used.tolist()) - set(_SPLITS), key=str)
    if unknown:
        raise ValueError(f"{path}: field 'split' has value(s) {unknown}, expected one of {', '.join(_SPLITS)}")
    code_of_name = np.array([_SPLITS.index(name) if name in _SPLITS else -1 for name in names.tolist()], np.int8)
    return code_of_name[indices] if indices.size else np.zeros(0, dtype=np.int8)


# -- duplicate pictures -----------------------------------------------------------------------------------------
_THUMBNAILS = 8  # most reused pictures shown (decoded: only these few)
_THUMBNAIL_SIZE = 96


def duplicate_pictures(paths: WorkPaths, taxonomy: Taxonomy, out: Path) -> dict | None:
    """Duplicate share, groups and the most reused train pictures (thumbnails written to `out`); None without
    `catalog/pictures.parquet` (catalogs from before picture hashing)."""
    from prodcat.data import dedupe

    if not dedupe.pictures_path(paths.root).is_file():
        return None
    catalog = _read_columns(paths.catalog_table("train"), ("product_id", "label", "group"), paths.root)
    pictures = dedupe.load_pictures(paths.root)
    is_train = pictures["source"].to_numpy(zero_copy_only=False) == "train"
    hashes = dedupe.hashes_of(pictures["hash"])
    keys = dedupe.hash_keys(hashes)
    ids = catalog["product_id"].to_numpy()
    order = np.argsort(ids, kind="stable")
    product_row = order[np.searchsorted(ids, pictures["product_id"].to_numpy()[is_train], sorter=order)]
    labels, train_keys = catalog["label"].to_numpy(), dedupe.hash_keys(hashes[is_train])
    stats = dedupe.duplicate_stats(train_keys, product_row, catalog["group"].to_numpy(), labels, _THUMBNAILS)
    test_keys = keys[~is_train]
    stats["test_pictures"] = int(len(test_keys))
    stats["test_pictures_seen_in_train"] = int(np.isin(test_keys, keys[is_train]).sum())
    train_rows = np.flatnonzero(is_train)
    out.mkdir(parents=True, exist_ok=True)
    offsets, lengths = pictures["offset"].to_numpy(), pictures["length"].to_numpy()
    for rank, entry in enumerate(stats["most_reused"], start=1):
        row = train_rows[entry["picture_row"]]
        users = np.unique(product_row[train_keys == train_keys[entry["picture_row"]]])
        leaves, counts = np.unique(labels[users], return_counts=True)
        entry["top_leaves"] = [
            {**taxonomy.describe(int(leaf)), "products": int(n)}
            for leaf, n in sorted(zip(leaves.tolist(), counts.tolist()), key=lambda pair: -pair[1])[:3]
        ]
        entry["thumbnail"] = _thumbnail(paths, int(offsets[row]), int(lengths[row]), out / f"reused_{rank}.png")
    return stats


def _thumbnail(paths: WorkPaths, offset: int, length: int, path: Path) -> str | None:
    """Decode one picture from the train BSON and save a small PNG; None (logged) when it does not decode."""
    from PIL import Image

    from prodcat.data.catalog import catalog_source

    try:
        with open(catalog_source(paths.root, "train"), "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        with Image.open(io.BytesIO(data)) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((_THUMBNAIL_SIZE, _THUMBNAIL_SIZE))
            picture.save(path, format="PNG")
    except (OSError, ValueError) as error:
        log.warning("explore: picture at byte %d of the train BSON does not decode: %s", offset, error)
        return None
    return path.name


# -- numbers ----------------------------------------------------------------------------------------------------
def _level_groups(taxonomy: Taxonomy) -> dict[str, tuple[np.ndarray, int]]:
    """Per hierarchy view: (group index of every leaf, number of groups in the taxonomy)."""
    level2_names, level2_of_group = np.unique(np.asarray(taxonomy.level2_names, dtype=object), return_inverse=True)
    level3_names, level3_of_leaf = np.unique(np.asarray(taxonomy.leaf_names, dtype=object), return_inverse=True)
    return {
        "level1": (taxonomy.leaf_level1.astype(np.int64), taxonomy.num_level1),
        "level2": (taxonomy.leaf_level2.astype(np.int64), taxonomy.num_level2),  # (level1, level2) pairs
        "level2_names": (level2_of_group[taxonomy.leaf_level2].astype(np.int64), len(level2_names)),
        "level3": (np.arange(taxonomy.num_classes), taxonomy.num_classes),  # leaves = category ids
        "level3_names": (level3_of_leaf.astype(np.int64), len(level3_names)),
    }


def group_products(taxonomy: Taxonomy, leaf_products: np.ndarray) -> dict[str, np.ndarray]:
    """Products per group at each view of the hierarchy (shape (3, groups): train, val, holdout)."""
    result = {}
    for view, (group_of_leaf, groups) in _level_groups(taxonomy).items():
        rows = [np.bincount(group_of_leaf, weights=row, minlength=groups) for row in leaf_products]
        result[view] = np.rint(np.stack(rows)).astype(np.int64)
    return result


def summarise(taxonomy: Taxonomy, counts: CatalogCounts, top_k: int) -> dict:
    """Every number of the exploration, JSON-ready."""
    leaf_total = counts.leaf_products.sum(axis=0)
    splits = {
        name: {
            "products": int(counts.leaf_products[i].sum()),
            "images": int((counts.images_per_product[name] * np.arange(counts.images_per_product[name].size)).sum()),
        }
        for i, name in enumerate(_SPLITS)
    }
    if counts.test_products is not None:
        splits["test"] = {"products": counts.test_products, "images": counts.test_images}
    labelled = {"products": int(leaf_total.sum()), "images": int(counts.leaf_images.sum())}
    categories = {}
    for view, per_split in group_products(taxonomy, counts.leaf_products).items():
        total = per_split.sum(axis=0)
        categories[view] = {
            "taxonomy": int(total.size),
            "present": int(np.count_nonzero(total)),
            **{f"present_{name}": int(np.count_nonzero(per_split[i])) for i, name in enumerate(_SPLITS)},
            "empty": int(total.size - np.count_nonzero(total)),
        }
    return {
        "products": sum(part["products"] for part in splits.values()),
        "images": sum(part["images"] for part in splits.values()),
        "splits": splits,
        "labelled": labelled,
        "categories": categories,
        "top_k": top_k,
        "largest": ranked_categories(taxonomy, counts, top_k, largest=True),
        "smallest": ranked_categories(taxonomy, counts, top_k, largest=False),
        "images_per_product": {name: _images_histogram(hist) for name, hist in _image_sets(counts).items()},
        "coverage": coverage(leaf_total),
        "level1": _level1_table(taxonomy, counts),
    }


def ranked_categories(taxonomy: Taxonomy, counts: CatalogCounts, top_k: int, largest: bool) -> list[dict]:
    """The `top_k` largest (or smallest non-empty) leaves; ties broken by category id."""
    products = counts.leaf_products.sum(axis=0)
    present = np.flatnonzero(products > 0)
    key = -products[present] if largest else products[present]
    order = present[np.lexsort((taxonomy.category_ids[present], key))][:top_k]
    total = max(int(products.sum()), 1)
    return [
        {
            "rank": rank,
            **taxonomy.describe(int(label)),
            "products": int(products[label]),
            "images": int(counts.leaf_images[label]),
            "share": float(products[label]) / total,
        }
        for rank, label in enumerate(order.tolist(), start=1)
    ]


def _image_sets(counts: CatalogCounts) -> dict[str, np.ndarray]:
    per_split = {name: counts.images_per_product[name] for name in _SPLITS}
    sets = {"labelled": sum(per_split.values()), **per_split}
    if "test" in counts.images_per_product:
        sets["test"] = counts.images_per_product["test"]
    return sets


def _images_histogram(hist: np.ndarray) -> dict:
    products = int(hist.sum())
    images = int((hist * np.arange(hist.size)).sum())
    return {
        "products": {str(k): int(n) for k, n in enumerate(hist) if n or k},
        "shares": {str(k): (int(n) / products if products else 0.0) for k, n in enumerate(hist) if n or k},
        "mean": images / products if products else 0.0,
    }


def coverage(leaf_products: np.ndarray) -> dict:
    """How concentrated products are on few leaves: leaves needed per share, share of the top leaves, Zipf fit."""
    descending = np.sort(np.asarray(leaf_products, dtype=np.int64))[::-1]
    present = descending[descending > 0]
    total = int(present.sum())
    if total == 0:
        return {
            "leaves_for_share": {},
            "top_leaves_share": {},
            "majority_baseline_accuracy": 0.0,
            "imbalance_ratio": None,
            "gini": 0.0,
            "zipf_exponent": None,
        }
    cumulative = np.cumsum(present)
    # Smallest n with cumulative[n-1] >= share * total, in integers: 0.29 * 100 is 28.999... in floats.
    needed = {
        f"{share:g}": int(np.searchsorted(cumulative, -(-round(share * 10_000) * total // 10_000), side="left")) + 1
        for share in COVERAGE_SHARES
    }
    top_share = {str(n): float(cumulative[min(n, present.size) - 1]) / total for n in _TOP_SHARE_RANKS}
    ascending = present[::-1].astype(np.float64)
    ranks = np.arange(1, ascending.size + 1)
    gini = float((2.0 * (ranks * ascending).sum()) / (ascending.size * total) - (ascending.size + 1) / ascending.size)
    return {
        "leaves_for_share": needed,
        "top_leaves_share": top_share,
        "majority_baseline_accuracy": float(present[0]) / total,
        "imbalance_ratio": float(present[0]) / float(present[-1]),
        "gini": gini,
        "zipf_exponent": _zipf_exponent(present),
    }


def _zipf_exponent(descending: np.ndarray) -> float | None:
    """s in products ~ rank^-s, least squares on log-log over the head (top half of the leaves), where it is linear."""
    head = descending[: max(descending.size // 2, 2)]
    if head.size < 2:
        return None
    slope = np.polyfit(np.log(np.arange(1, head.size + 1)), np.log(head.astype(np.float64)), 1)[0]
    return float(-slope)


def _level1_table(taxonomy: Taxonomy, counts: CatalogCounts) -> list[dict]:
    products = counts.leaf_products.sum(axis=0)
    level1 = taxonomy.leaf_level1.astype(np.int64)
    per_products = np.bincount(level1, weights=products, minlength=taxonomy.num_level1)
    per_images = np.bincount(level1, weights=counts.leaf_images, minlength=taxonomy.num_level1)
    leaves = np.bincount(level1, minlength=taxonomy.num_level1)
    leaves_present = np.bincount(level1, weights=products > 0, minlength=taxonomy.num_level1)
    total = max(int(products.sum()), 1)
    order = np.lexsort((np.arange(taxonomy.num_level1), -per_products))
    return [
        {
            "level1": taxonomy.level1_names[i],
            "products": int(round(per_products[i])),
            "images": int(round(per_images[i])),
            "share": float(per_products[i]) / total,
            "leaves": int(leaves[i]),
            "leaves_present": int(round(leaves_present[i])),
        }
        for i in order.tolist()
    ]


# -- figures ----------------------------------------------------------------------------------------------------
_HIST_PANELS = (
    ("level1", "Level 1: {n} categories"),
    ("level2", "Level 2: {n} (level 1, level 2) pairs"),
    ("level3_names", "Level 3: {n} distinct names"),
    ("level3", "Category id (leaf): {n} categories"),
)


def _draw_figures(out: Path, taxonomy: Taxonomy, counts: CatalogCounts, summary: dict) -> None:
    grouped = {
        view: per_split.sum(axis=0) for view, per_split in group_products(taxonomy, counts.leaf_products).items()
    }
    _plot_histograms(out / FIGURES["hist_products_per_category"], grouped)
    _plot_images_per_product(out / FIGURES["images_per_product"], _image_sets(counts))
    _plot_rank_frequency(out / FIGURES["rank_frequency"], grouped["level3"], summary["coverage"])
    _plot_level1(out / FIGURES["products_per_level1"], summary["level1"])


def _plot_histograms(path: Path, grouped: dict[str, np.ndarray]) -> None:
    with figures.png_figure(path, 2, 2, figsize=(10.5, 7.6)) as (figure, axes):
        for ax, (view, title) in zip(axes.flat, _HIST_PANELS, strict=True):
            values = grouped[view]
            present = values[values > 0]
            empty = values.size - present.size
            ax.set_title(title.format(n=f"{present.size:,}") + (f"\n(+ {empty:,} empty, not shown)" if empty else ""))
            _draw_log_histogram(ax, present)
        figure.suptitle("How many products does a category hold?")


def _draw_log_histogram(ax: Axes, present: np.ndarray) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("products per category (log scale)")
    ax.set_ylabel("number of categories (log scale)")
    if present.size:
        heights, _edges, _bars = ax.hist(
            present, bins=figures.log_bins(present), color=figures.PALETTE[0], edgecolor="white", linewidth=0.6
        )
        median = float(np.median(present))
        ax.axvline(
            median,
            color=figures.PALETTE[3],
            linestyle="--",
            linewidth=1.2,
            label=f"median {figures.format_count(median)} product{'' if median == 1 else 's'}",
        )
        # Whole categories only (no 0.5 tick), and headroom above the tallest bar for the legend.
        ax.set_ylim(0.7, max(float(heights.max()), 2.0) * 4.0)
        ax.legend(loc="upper right", frameon=True, framealpha=0.9, edgecolor="none")
    figures.log_count_axis(ax.xaxis)
    figures.log_count_axis(ax.yaxis)


def _plot_images_per_product(path: Path, sets: dict[str, np.ndarray]) -> None:
    shown = {"train.bson (all splits)": sets["labelled"], **({"test": sets["test"]} if "test" in sets else {})}
    size = (4.8 * len(shown) + 0.6, 4.0)
    with figures.png_figure(path, 1, len(shown), figsize=size, squeeze=False) as (figure, axes):
        for ax, (name, hist) in zip(axes[0], shown.items(), strict=True):
            first = 0 if hist[:1].sum() else 1  # products without images only exist in test
            ks = np.arange(first, max(hist.size, 2))
            heights = np.pad(hist, (0, max(0, ks[-1] + 1 - hist.size)))[first:]
            total = max(int(hist.sum()), 1)
            bars = ax.bar(ks, heights, color=figures.PALETTE[0 if name != "test" else 1], width=0.7)
            figures.label_bars(
                ax, bars, [f"{figures.format_count(n)}\n{figures.format_share(n / total)}" for n in heights]
            )
            ax.set_xticks(ks)
            ax.set_xlabel("images per product")
            ax.set_ylabel("products")
            ax.yaxis.set_major_formatter(figures.count_formatter())
            ax.grid(axis="x", visible=False)
            ax.set_title(f"{name}: {int(hist.sum()):,} products")
        figure.suptitle("Images per product")


def _plot_rank_frequency(path: Path, leaf_products: np.ndarray, cover: dict) -> None:
    descending = np.sort(leaf_products)[::-1]
    descending = descending[descending > 0]
    with figures.png_figure(path, 1, 2, figsize=(11, 4.3)) as (figure, (left, right)):
        if descending.size:
            _draw_zipf(left, descending, cover.get("zipf_exponent"))
            _draw_coverage(right, descending, cover)
        left.set_title("Rank-frequency of leaf categories")
        left.set_xlabel("rank of the category (1 = largest, log scale)")
        left.set_ylabel("products (log scale)")
        right.set_title("Share of products held by the k largest leaves")
        right.set_xlabel("k, number of largest leaves (log scale)")
        right.set_ylabel("cumulative share of products")
        figure.suptitle("Class imbalance")


def _draw_zipf(ax: Axes, descending: np.ndarray, exponent: float | None) -> None:
    ranks = np.arange(1, descending.size + 1)
    ax.loglog(ranks, descending, color=figures.PALETTE[0], linewidth=1.6, label="leaf categories")
    if exponent:
        head = ranks[: max(descending.size // 2, 2)]  # the fit's range, so the line is not extrapolated
        scale = np.exp(np.mean(np.log(descending[: head.size]) + exponent * np.log(head)))
        ax.loglog(
            head,
            scale * head**-exponent,
            color=figures.PALETTE[3],
            linestyle="--",
            linewidth=1.1,
            label=f"Zipf fit on the top half, exponent {exponent:.2f}",
        )
        ax.legend(loc="lower left")
    ax.set_ylim(descending.min() / 1.6, descending.max() * 1.6)
    figures.log_count_axis(ax.xaxis)
    figures.log_count_axis(ax.yaxis)


def _draw_coverage(ax: Axes, descending: np.ndarray, cover: dict) -> None:
    ranks = np.arange(1, descending.size + 1)
    ax.step(ranks, np.cumsum(descending) / descending.sum(), where="post", color=figures.PALETTE[2], linewidth=1.6)
    ax.set_xscale("log")
    lines = []
    for share, color in ((0.5, figures.PALETTE[1]), (0.9, figures.PALETTE[4])):
        needed = cover["leaves_for_share"][f"{share:g}"]
        ax.axhline(share, color=color, linestyle=":", linewidth=1.1)
        ax.axvline(needed, color=color, linestyle=":", linewidth=1.1)
        ax.plot([needed], [share], "o", color=color, markersize=4)
        lines.append(f"{share:.0%} of products: top {needed:,} leaves")
    lines.append(f"({descending.size:,} non-empty leaves)")
    # Top left stays empty: the curve is convex at small k.
    ax.text(
        0.03,
        0.97,
        "\n".join(lines),
        transform=ax.transAxes,
        va="top",
        ha="left",
        fontsize=8.5,
        bbox={"boxstyle": "round,pad=0.4", "facecolor": "white", "edgecolor": "#cccccc"},
    )
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(lambda value, _position: f"{value:.0%}")
    figures.log_count_axis(ax.xaxis)


def _plot_level1(path: Path, rows: list[dict]) -> None:
    shown = [row for row in rows if row["products"] > 0]  # an empty level 1 would be a bare label
    empty = len(rows) - len(shown)
    height = max(3.2, 1.3 + 0.24 * len(shown))
    with figures.png_figure(path, figsize=(10, height)) as (_figure, ax):
        positions = np.arange(len(shown))
        bars = ax.barh(positions, [row["products"] for row in shown], color=figures.PALETTE[0], height=0.72)
        labels = [f"{figures.format_count(row['products'])} ({figures.format_share(row['share'])})" for row in shown]
        figures.label_bars(ax, bars, labels, horizontal=True, fontsize=7.5)
        ax.set_yticks(positions, labels=[row["level1"].strip() or "(blank)" for row in shown], fontsize=7.5)
        ax.set_ylim(max(len(shown), 1) - 0.5, -0.5)  # largest on top
        ax.grid(axis="y", visible=False)
        ax.xaxis.set_major_formatter(figures.count_formatter())
        ax.set_xlabel("products")
        note = f" (+ {empty} empty, not shown)" if empty else ""
        ax.set_title(f"Products per level-1 category: {len(shown)} categories{note}")


# -- HTML -------------------------------------------------------------------------------------------------------
def render_html(summary: dict, out: Path) -> str:
    """The exploration page: headline numbers, tables, and the PNG figures beside it in `out` (linked by name)."""
    sections = [
        _html_headline(summary),
        _html_categories(summary),
        _html_figure(
            summary,
            out,
            "hist_products_per_category",
            "Products per category at each level, log-log. Level 3 groups leaves that share a name; the category "
            "id panel is the leaf classes the models predict.",
        ),
        _html_ranked(summary),
        _html_images(summary, out),
        _html_coverage(summary, out),
        _html_level1(summary, out),
        _html_duplicates(summary),
    ]
    body = (
        "<h1>Catalog exploration</h1>\n"
        + "\n".join(sections)
        + f"\n<p><small>Numbers from <code>summary.json</code>; computed in {esc(summary.get('seconds', '?'))} s."
        "</small></p>"
    )
    return page("prodcat: catalog exploration", body)


def _html_headline(summary: dict) -> str:
    cards = [
        ("products", summary["products"]),
        ("images", summary["images"]),
        ("leaf categories present", summary["categories"]["level3"]["present"]),
    ]
    rows = [
        [
            esc(name),
            num(part["products"]),
            num(part["images"]),
            num(part["images"] / part["products"]) if part["products"] else "–",
        ]
        for name, part in summary["splits"].items()
    ]
    rows.append(
        [
            "<b>total</b>",
            f"<b>{num(summary['products'])}</b>",
            f"<b>{num(summary['images'])}</b>",
            num(summary["images"] / summary["products"]) if summary["products"] else "–",
        ]
    )
    return (
        html_cards([(k, num(v)) for k, v in cards])
        + "\n<h2>Products and images per split</h2>\n"
        + table(["split", "products", "images", "images / product"], rows, numeric={1, 2, 3})
    )


def _html_categories(summary: dict) -> str:
    labels = {
        "level1": "level 1",
        "level2": "level 2 (level-1, level-2 pairs)",
        "level2_names": "level 2 names",
        "level3": "level 3 = category id (leaf)",
        "level3_names": "level 3 names",
    }
    rows = [
        [
            esc(labels.get(view, view)),
            num(part["present"]),
            num(part["taxonomy"]),
            num(part["present_train"]),
            num(part["present_val"]),
            num(part["present_holdout"]),
            num(part["empty"]),
        ]
        for view, part in summary["categories"].items()
    ]
    header = ["level", "present", "in taxonomy", "present in train", "present in val", "present in holdout", "empty"]
    return "<h2>Categories per level</h2>\n" + table(header, rows, numeric={1, 2, 3, 4, 5, 6})


def _html_figure(summary: dict, out: Path, key: str, caption: str) -> str:
    return figure(out / summary["files"][key], caption, embed=False)


def _html_ranked(summary: dict) -> str:
    parts = []
    for key, title in (("largest", "largest"), ("smallest", "smallest non-empty")):
        rows = [
            [
                num(r["rank"]),
                esc(r["category_id"]),
                esc(r["level1"]),
                esc(r["level2"]),
                esc(r["level3"]),
                num(r["products"]),
                num(r["images"]),
                share_text(r["share"]),
            ]
            for r in summary[key]
        ]
        parts.append(
            f"<h2>The {len(rows)} {title} leaf categories</h2>\n"
            + table(
                ["#", "category id", "level 1", "level 2", "level 3", "products", "images", "share"],
                rows,
                numeric={0, 1, 5, 6, 7},
            )
        )
    return "\n".join(parts)


def _html_images(summary: dict, out: Path) -> str:
    sets = summary["images_per_product"]
    ks = sorted({int(k) for part in sets.values() for k in part["products"]})
    rows = [
        [esc(name)]
        + [f"{num(part['products'].get(str(k), 0))} ({share_text(part['shares'].get(str(k), 0.0))})" for k in ks]
        + [num(part["mean"])]
        for name, part in sets.items()
    ]
    caption = "Products by number of images (bar labels: count and share)."
    return (
        "<h2>Images per product</h2>\n"
        + table(
            ["set"] + [f"{k} image{'s' if k != 1 else ''}" for k in ks] + ["mean"],
            rows,
            numeric=set(range(1, len(ks) + 2)),
        )
        + _html_figure(summary, out, "images_per_product", caption)
    )


def _html_coverage(summary: dict, out: Path) -> str:
    cover = summary["coverage"]
    rows = [[f"{float(share):.0%} of products", num(n)] for share, n in cover["leaves_for_share"].items()]
    rows += [
        [f"share of the top {int(n):,} leaves", share_text(share)] for n, share in cover["top_leaves_share"].items()
    ]
    rows += [
        ["most frequent class (baseline accuracy)", share_text(cover["majority_baseline_accuracy"])],
        ["largest / smallest non-empty leaf", num(cover["imbalance_ratio"])],
        ["Gini coefficient of products over leaves", num(cover["gini"])],
        ["Zipf exponent (head of the rank-frequency curve)", num(cover["zipf_exponent"])],
    ]
    caption = (
        "Left: products per leaf against its rank, log-log. Right: share of all products held by the k largest leaves."
    )
    return (
        "<h2>Imbalance and coverage</h2>\n"
        + table(["", "leaves / value"], rows, numeric={1})
        + _html_figure(summary, out, "rank_frequency", caption)
    )


def _html_level1(summary: dict, out: Path) -> str:
    rows = [
        [
            esc(r["level1"]),
            num(r["products"]),
            share_text(r["share"]),
            num(r["images"]),
            f"{r['leaves_present']:,} / {r['leaves']:,}",
        ]
        for r in summary["level1"]
    ]
    return (
        "<h2>Level-1 categories</h2>\n"
        + _html_figure(summary, out, "products_per_level1", "Products per level-1 category, largest first.")
        + table(["level 1", "products", "share", "images", "leaves present / in taxonomy"], rows, numeric={1, 2, 3, 4})
    )


def _html_duplicates(summary: dict) -> str:
    stats = summary.get("duplicates")
    if not stats:
        return "<h2>Duplicate pictures</h2>\n<p>No <code>catalog/pictures.parquet</code>: re-run ingest.</p>"
    cards = [
        ("train pictures not unique by content", share_text(stats["duplicate_share"])),
        ("distinct train pictures", num(stats["distinct_pictures"])),
        ("duplicate groups (>= 2 products)", num(stats["groups"])),
        ("products in groups", num(stats["products_in_groups"])),
        ("largest group (products)", num(stats["largest_group"])),
        (
            "test pictures with a train twin",
            f"{num(stats['test_pictures_seen_in_train'])} of {num(stats['test_pictures'])}",
        ),
    ]
    sizes = table(
        ["products per group", "groups"], [[esc(k), num(v)] for k, v in stats["group_sizes"].items()], numeric={1}
    )
    rows = []
    for rank, entry in enumerate(stats["most_reused"], start=1):
        image = f'<img src="{esc(entry["thumbnail"])}" alt="picture {rank}">' if entry.get("thumbnail") else "–"
        leaves = "<br>".join(f"{esc(leaf['level3'])} ({num(leaf['products'])})" for leaf in entry["top_leaves"])
        rows.append([image, num(entry["copies"]), num(entry["products"]), num(entry.get("categories")), leaves])
    return (
        "<h2>Duplicate pictures</h2>\n<p>Byte-identical pictures (XXH3-128 of the stored bytes). Share not unique = "
        "1 &minus; distinct / pictures. Products sharing any picture, transitively, form a group; each group lies in "
        "one split.</p>\n"
        + html_cards(cards)
        + sizes
        + f"\n<h3>The {len(rows)} most reused train pictures</h3>\n<p>Placeholders show up here: one picture across "
        "many categories.</p>\n"
        + table(["picture", "copies", "products", "leaves", "top leaves (products)"], rows, numeric={1, 2, 3})
    )
