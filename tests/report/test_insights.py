"""Per-category precision / recall / support, the majority baseline and the auto-accept sentence."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from prodcat.data.taxonomy import Taxonomy
from prodcat.report.insights import BestRun, auto_accept_sentence, majority_baseline, per_category_table

ROWS = [(1, "A", "A1", "apple"), (2, "A", "A1", "pear"), (3, "B", "B1", "bolt"), (4, "B", "B2", "nail")]


def _best() -> BestRun:
    taxonomy = Taxonomy.from_rows(ROWS, counts={1: 50, 2: 30, 3: 20, 4: 5})  # label 0 = most frequent (apple)
    names = {taxonomy.names(label)[2]: label for label in range(taxonomy.num_classes)}
    apple, pear, bolt = names["apple"], names["pear"], names["bolt"]
    truth = [apple, apple, apple, apple, pear, pear, bolt]
    guess = [apple, apple, apple, pear, pear, apple, apple]
    frame = pd.DataFrame({"label": truth, "top1_label": guess})
    frame["correct"] = frame["label"] == frame["top1_label"]
    return BestRun(Path("run"), {"split": "holdout"}, frame, taxonomy)


def _row(html: str, leaf: str) -> list[str]:
    row = next(r for r in html.split("<tr>") if f"<b>{leaf}</b>" in r)
    return re.findall(r"<td[^>]*>(.*?)</td>", row)


def test_per_category_table() -> None:
    html = per_category_table(_best())
    assert "sortable" in html and "Per category (holdout, products)" in html
    # apple: 4 products, 3 right (recall 75%); predicted 5 times, 3 right (precision 60%); F1 = 2*.6*.75/1.35
    assert _row(html, "apple")[3:] == ["50", "4", "75.0%", "60.0%", "66.7%"]
    assert _row(html, "pear")[3:] == ["30", "2", "50.0%", "50.0%", "50.0%"]
    assert _row(html, "bolt")[3:] == ["20", "1", "0.0%", "–", "0.0%"]  # never predicted: no precision
    assert "<b>nail</b>" not in html  # no holdout product
    assert 'data-sort="-1"' in html  # the missing precision sorts below 0%


def test_majority_baseline_is_the_most_frequent_train_leaf_on_the_split() -> None:
    assert majority_baseline(_best()) == 4 / 7


def test_auto_accept_sentence() -> None:
    metrics = {
        "split": "holdout",
        "confidence": {"threshold": 0.9512, "target_accuracy": 0.95, "chosen_on": "val", "coverage": 0.54,
                       "accuracy": 0.95, "accuracy_ci95": [0.93, 0.97], "accepted": 168},
    }  # fmt: skip
    text = re.sub("<[^>]+>", "", auto_accept_sentence(metrics))
    assert text.startswith("Products whose top probability is ≥ 0.951 are 95.0% correct [93.0, 97.0] on holdout: 54%")
    assert "(n = 168); the rest go to a person (threshold chosen on val as the lowest reaching 95% there)." in text
    metrics["confidence"] = {"threshold": None, "note": "no threshold reaches 95% on val"}
    assert auto_accept_sentence(metrics) == "Auto-accept: no threshold reaches 95% on val."


def test_calibration_block_is_rendered_when_evaluation_writes_one() -> None:
    from prodcat.report.insights import _calibration

    html = _calibration({"calibration": {"method": "temperature", "temperature": 1.7321, "ece": {"before": 0.081}}})
    assert "<h3>Calibration</h3>" in html and "temperature" in html and "1.732" in html and "ece · before" in html
    assert _calibration({}) == ""


def test_gallery_thumbnails_are_large_enough_to_judge() -> None:
    from prodcat.report.markup import CSS
    from prodcat.report.thumbnails import THUMBNAIL_SIZE

    assert THUMBNAIL_SIZE >= 120 and ".thumbs img { width: 120px; height: 120px;" in CSS
