"""Hashed text features: deterministic, accents kept, case folded, grouped per product."""

from __future__ import annotations

import subprocess
import sys
import unicodedata

import numpy as np
import pyarrow as pa
import pytest

from prodcat.config import ConfigError
from prodcat.ocr.text_features import TextFeatureConfig, analyse, normalise, product_texts, text_features

SMALL = TextFeatureConfig(n_features=2**12)


def test_normalise_folds_case_keeps_accents_and_unifies_composition() -> None:
    decomposed = unicodedata.normalize("NFD", "PÊCHE")
    assert normalise(f"{decomposed} Pêche, PÉCHÉ!") == ["pêche", "pêche", "péché"]


def test_features_are_deterministic_across_processes() -> None:
    texts = ["ROMAN POLICIER", "Bande dessinée TOME 3", ""]
    here = text_features(texts, SMALL)
    code = (
        "from prodcat.ocr.text_features import TextFeatureConfig, text_features\n"
        "m = text_features(['ROMAN POLICIER', 'Bande dessinée TOME 3', ''], TextFeatureConfig(n_features=2**12))\n"
        "print(m.indices.tolist(), [round(x, 6) for x in m.data.tolist()])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=None)
    assert out.stdout.strip() == str(here.indices.tolist()) + " " + str([round(x, 6) for x in here.data.tolist()])
    assert here.shape == (3, 2**12) and here.dtype == np.float32
    assert here[2].nnz == 0  # no words: an all-zero row
    assert np.allclose(np.sqrt(here[:2].multiply(here[:2]).sum(axis=1)).A1, 1.0)


def test_accents_change_features_but_case_does_not() -> None:
    vectors = text_features(["PÊCHE", "pêche", "PECHE"], SMALL).toarray()
    assert np.array_equal(vectors[0], vectors[1])
    assert not np.array_equal(vectors[0], vectors[2])
    assert "w:pêche" in analyse("PÊCHE") and "c: pê" in analyse("PÊCHE")


def test_ocr_slips_still_share_ngrams() -> None:
    a, b, c = text_features(["POLICIER", "POLICIEB", "CUISINE"], SMALL).toarray()
    assert a @ b > 0.5 and a @ c < 0.2


def test_product_texts_filters_confidence_and_keeps_reading_order() -> None:
    words = pa.table(
        {
            "product_id": [7, 7, 7, 8],
            "image_index": [1, 0, 0, 0],
            "word_index": [0, 1, 0, 0],
            "word": ["TOME", "POLICIER", "ROMAN", "zz"],
            "confidence": [0.9, 0.8, 0.95, 0.1],
        }
    )
    assert product_texts(words) == {7: "ROMAN POLICIER TOME"}


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        TextFeatureConfig(min_n=4, max_n=3)
