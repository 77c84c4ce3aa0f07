"""Text features for the head: the words read on a product's pictures, hashed into a fixed-size sparse vector.

Features are the normalised words ("w:policier") and their character 3-5-grams with word boundaries ("c: po", ...),
so OCR slips (POLICIEB) still share most n-grams with the right word. Normalisation: Unicode NFC (one code point per
accented letter, whatever the engine emitted), case folded, accents kept (PÊCHE and PÉCHÉ stay apart). Hashing uses
scikit-learn's HashingVectorizer (MurmurHash3, the same on every run and machine; no vocabulary to fit or store).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from prodcat.config import TextFeatureConfig  # re-exported: it lives with the other configs

__all__ = ["TextFeatureConfig", "normalise", "analyse", "text_features", "product_texts"]

_TOKEN = re.compile(r"\w+")


def normalise(text: str) -> list[str]:
    """Words of `text`: NFC, case folded, accents kept; runs of letters and digits."""
    return _TOKEN.findall(unicodedata.normalize("NFC", text).casefold())


def analyse(text: str, config: TextFeatureConfig = TextFeatureConfig()) -> list[str]:
    """The features of one product's text: its words and their character n-grams."""
    features = []
    for word in normalise(text):
        if len(word) < config.min_length:
            continue
        features.append(f"w:{word}")
        padded = f" {word} "
        for n in range(config.min_n, config.max_n + 1):
            features += [f"c:{padded[i : i + n]}" for i in range(len(padded) - n + 1)]
    return features


def text_features(texts: Sequence[str], config: TextFeatureConfig = TextFeatureConfig()) -> Any:
    """(len(texts), config.n_features) float32 CSR matrix, rows L2-normalised (all-zero for a text with no words)."""
    import numpy as np
    from sklearn.feature_extraction.text import HashingVectorizer

    vectorizer = HashingVectorizer(
        analyzer=lambda text: analyse(text, config),
        n_features=config.n_features,
        alternate_sign=False,
        norm="l2",
        dtype=np.float32,
    )
    return vectorizer.transform(list(texts))


def product_texts(words: pa.Table, min_confidence: float = TextFeatureConfig.min_confidence) -> dict[int, str]:
    """product_id -> the words read on its pictures (from W/ocr/words.parquet), in picture and reading order."""
    table = words.filter(pc.greater_equal(words["confidence"], min_confidence))
    table = table.sort_by([("product_id", "ascending"), ("image_index", "ascending"), ("word_index", "ascending")])
    texts: dict[int, list[str]] = {}
    for product, word in zip(table["product_id"].to_pylist(), table["word"].to_pylist(), strict=True):
        texts.setdefault(int(product), []).append(word)
    return {product: " ".join(found) for product, found in texts.items()}
