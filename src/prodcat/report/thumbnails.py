"""Product pictures for the report, read by offset from the train catalog's BSON and embedded as small JPEGs."""

from __future__ import annotations

import base64
import io

from prodcat.paths import WorkPaths
from prodcat.utils import get_logger

__all__ = ["THUMBNAIL_SIZE", "thumbnails", "thumbnail"]

THUMBNAIL_SIZE = 240  # pixels, longest side of the stored JPEG: sharp at the 120 px the page shows, on HiDPI too
log = get_logger("prodcat.report")


def thumbnails(paths: WorkPaths, product_ids: list[int], limit: int | None = None) -> tuple[dict[int, list[str]], str]:
    """product id -> base64 JPEG data URLs of its pictures (at most `limit` each), and a note when there are none."""
    from prodcat.data.bson_index import BsonReader
    from prodcat.data.catalog import catalog_source, load_catalog

    try:
        catalog = load_catalog(paths.root, "train").select(["product_id", "offset", "length"]).to_pandas()
        source = catalog_source(paths.root, "train")
    except (OSError, RuntimeError, KeyError) as error:
        return {}, f"(No thumbnails: {error}.)"
    if not source.is_file():
        return {}, f"(No thumbnails: {source} is not there.)"
    located = catalog[catalog["product_id"].isin(product_ids)].drop_duplicates("product_id").set_index("product_id")
    result: dict[int, list[str]] = {}
    with BsonReader(source) as reader:
        for product_id in dict.fromkeys(product_ids):
            if product_id not in located.index:
                continue
            row = located.loc[product_id]
            try:
                pictures = reader.pictures(int(row["offset"]), int(row["length"]))
            except Exception as error:  # noqa: BLE001 - a damaged document costs its thumbnails, not the report
                log.warning("report: product %d: %s", product_id, error)
                continue
            urls = [url for url in (thumbnail(p) for p in pictures[:limit]) if url]
            result[int(product_id)] = urls
    return result, ""


def thumbnail(picture: bytes) -> str | None:
    from prodcat.data.images import decode_pil

    try:
        image = decode_pil(picture)
    except Exception:  # noqa: BLE001 - undecodable pictures are simply not shown
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
