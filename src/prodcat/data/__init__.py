"""Ingest: BSON indexing, taxonomy and labels, splits, image decoding, demo data."""
