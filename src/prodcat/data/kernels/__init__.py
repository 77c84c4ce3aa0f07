"""The numba-compiled loops of ingest, apart from the Python that decides when to run them.

- `bson_scan`: frame a BSON file's documents and parse Kaggle's fields in one pass; find every picture's bytes.
- `xxh3`: XXH3-128 of byte ranges (the `xxhash` package is the reference and the fallback for short inputs).
- `pictures`: per document, find its pictures and hash them while its pages are hot (what ingest runs).
- `union`: union-find of products sharing a picture hash.

Each kernel reads numpy arrays and writes into arrays its caller owns, releases the GIL (callers run one per
thread), and is None where numba is missing (`union` falls back to its Python source); `data/bson_index.py` and
`data/dedupe.py` hold the orchestration and the Python/numpy paths for everything a kernel flags.
"""
