"""Conclusions in words come from the numbers (holdout product top-1 with paired intervals; val image top-1 for older
files); the loss x optimizer table; sweep ticks; the packaged bench copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prodcat.report import conclusions

REPO = Path(__file__).resolve().parents[2]


def _arm(loss: str, optimizer: str, mean: float, std: float | None, seeds: int = 3, step: float = 0.004) -> dict:
    return {
        "loss": loss,
        "optimizer": optimizer,
        "seeds": seeds,
        "val_top1_mean": mean,
        "val_top1_std": std,
        "val_top1_ci95": None,
        "step_seconds_mean": step,
    }


def _compare(*arms: dict, num_sampled: int = 16) -> dict:
    optimizers = list(dict.fromkeys(arm["optimizer"] for arm in arms))
    return {
        "settings": {"num_sampled": num_sampled, "optimizers": optimizers},
        "losses": {f"{arm['loss']}, {arm['optimizer']}": arm for arm in arms},
    }


def test_sampled_below_full_softmax_says_below_with_the_optimizer_held_fixed() -> None:
    data = _compare(_arm("softmax", "adamw", 0.726, 0.004), _arm("sampled", "adamw", 0.712, 0.005))
    sentences = conclusions.compare_conclusions(data, num_classes=60)
    first = sentences[0]
    assert first.startswith("Sampled softmax with 16 negatives is 1.4 points below full softmax at equal optimizer")
    assert "(adamw)" in first and "72.6%" in first and "71.2%" in first and "mean of 3 seeds" in first
    assert "larger than the seed spread (std 0.5 and 0.4 points over 3 seeds)" in first
    text = " ".join(sentences)
    assert "At 60 classes" in text and "cannot save time here" in text
    bench = {r["num_classes"]: r["speedup"] for r in conclusions.bench_results()}  # the packaged make-bench copy
    assert (
        f"training step {bench[5270]:.1f}x faster at 5,270 classes and {bench[500000]:.1f}x faster at 500,000 classes"
        in text
    )


def test_difference_inside_the_spread_and_above() -> None:
    data = _compare(_arm("softmax", "adamw", 0.70, 0.02), _arm("sampled", "adamw", 0.71, 0.02))
    sentence = conclusions.compare_conclusions(data, num_classes=60)[0]
    assert "1.0 point above full softmax" in sentence and "within the seed spread" in sentence


def test_one_seed_has_no_spread_to_judge_by() -> None:
    data = _compare(_arm("softmax", "adamw", 0.70, None, seeds=1), _arm("adaptive", "adamw", 0.65, None, seeds=1))
    sentence = conclusions.compare_conclusions(data, num_classes=None)[0]
    assert sentence.startswith("Adaptive softmax is 5.0 points below full softmax at equal optimizer (adamw)")
    assert "one seed, so no seed spread" in sentence and "mean of 1 seed;" in sentence
    assert "val image top-1 after the last step" in sentence and "it may be noise" in sentence  # an older file


def _holdout_arm(loss: str, mean: float, std: float | None, seeds: int = 3) -> dict:
    arm = _arm(loss, "adamw", 0.5, 0.01, seeds)
    interval = [mean - 0.04, mean + 0.04]
    return {**arm, "holdout_top1_mean": mean, "holdout_top1_std": std, "holdout_top1_ci95": interval,
            "holdout_products": 353, "holdout_split": "holdout"}  # fmt: skip


def test_holdout_numbers_and_paired_interval_make_the_sentence() -> None:
    data = _compare(_holdout_arm("softmax", 0.76, 0.004), _holdout_arm("sampled", 0.74, 0.005))
    data["differences"] = {
        "sampled, adamw vs softmax, adamw": {"change": -0.02, "ci95": [-0.035, -0.006], "n": 353, "split": "holdout"}
    }
    first = conclusions.compare_conclusions(data, num_classes=60)[0]
    assert "2.0 points below full softmax at equal optimizer (adamw): 74.0% vs 76.0% holdout product top-1" in first
    assert "(n = 353 products), mean of 3 seeds" in first and "50.0%" not in first  # never the val numbers
    assert "paired 95% interval over the 353 holdout products [-3.5, -0.6] points, excludes 0" in first
    # Stored once as "A vs B": the other way round is the same difference turned round.
    data["differences"] = {
        "softmax, adamw vs sampled, adamw": {"change": 0.02, "ci95": [-0.01, 0.05], "n": 353, "split": "holdout"}
    }
    first = conclusions.compare_conclusions(data, num_classes=60)[0]
    assert "[-5.0, +1.0] points, holds 0: no clear difference" in first
    del data["differences"]
    assert "their 95% intervals over products overlap" in conclusions.compare_conclusions(data, 60)[0]
    grid = conclusions.loss_optimizer_table(data)
    assert "76.0% ± 0.4" in grid and "50.0%" not in grid


def test_sweep_on_the_holdout_reaches_where_the_paired_interval_reaches_zero() -> None:
    def point(k: int, mean: float, low: float, high: float) -> dict:
        paired = {"change": mean - 0.70, "ci95": [low, high], "n": 300, "split": "holdout"}
        return {"num_sampled": k, "val_top1_mean": 0.1, "seeds": 1, "holdout_top1_mean": mean,
                "holdout_top1_std": None, "holdout_products": 300, "vs_reference": paired}  # fmt: skip

    reference = {"val_top1_mean": 0.1, "seeds": 1, "holdout_top1_mean": 0.70, "holdout_top1_ci95": [0.65, 0.75]}
    reference["holdout_products"] = 300
    data = {"settings": {"optimizer": "adamw"}, "reference": reference}
    data["points"] = [point(2, 0.60, -0.15, -0.05), point(8, 0.68, -0.05, 0.01), point(32, 0.70, -0.02, 0.02)]
    first, second = conclusions.sweep_conclusions(data)
    assert first.startswith("Holdout product top-1 (n = 300 products) against the number of sampled negatives")
    assert "K = 2: 60.0%, K = 8: 68.0%, K = 32: 70.0%; full softmax 70.0% [65.0, 75.0]" in first
    assert "reaches the full softmax (not clearly below: its paired 95% interval over products reaches 0) is K = 8" in (
        second
    )


def test_optimizer_factor_compared_at_equal_loss() -> None:
    data = _compare(
        _arm("softmax", "adamw", 0.70, 0.01),
        _arm("sampled", "adamw", 0.69, 0.01),
        _arm("sampled", "rowwise_adamw", 0.72, 0.01),
    )
    sentences = conclusions.compare_conclusions(data, num_classes=5270)
    optimizer = [s for s in sentences if s.startswith("Optimizer rowwise_adamw")]
    assert (
        len(optimizer) == 1
        and "3.0 points above adamw at equal loss (sampled softmax with 16 negatives)" in (optimizer[0])
    )
    # Sampled with rowwise_adamw has no full-softmax arm at rowwise_adamw: no sentence crosses optimizers.
    assert not any("rowwise_adamw)" in s and "full softmax at equal optimizer" in s for s in sentences)
    assert not any("cannot save time" in s for s in sentences)  # 5,270 classes: the bench numbers apply


def test_loss_optimizer_table_rows_loss_columns_optimizer() -> None:
    data = _compare(
        _arm("softmax", "adamw", 0.70, 0.01),
        _arm("sampled", "adamw", 0.69, None, seeds=1),
        _arm("sampled", "rowwise_adamw", 0.72, 0.012),
    )
    html = conclusions.loss_optimizer_table(data)
    header = html[html.index("<thead>") : html.index("</thead>")]
    assert header.index("adamw") < header.index("rowwise_adamw")
    rows = html[html.index("<tbody>") :].split("<tr>")[1:]
    assert "full softmax" in rows[0] and "70.0% ± 1.0" in rows[0] and "<td>–</td>" in rows[0]
    assert "sampled softmax with 16 negatives" in rows[1] and "69.0% ± n/a" in rows[1] and "72.0% ± 1.2" in rows[1]


def test_old_compare_files_without_optimizer_fields() -> None:
    data = {"settings": {"optimizer": "adamw"}, "losses": {"softmax": _arm("softmax", "x", 0.5, None)}}
    del data["losses"]["softmax"]["loss"], data["losses"]["softmax"]["optimizer"]
    arm = conclusions.compare_arms(data)[0]
    assert arm["loss"] == "softmax" and arm["optimizer"] == "adamw"


def test_sweep_conclusions() -> None:
    points = [
        {"num_sampled": k, "val_top1_mean": mean, "val_top1_std": None, "seeds": 1}
        for k, mean in ((2, 0.40), (8, 0.60), (32, 0.695))
    ]
    data = {"settings": {"optimizer": "adamw"}, "points": points, "reference": {"val_top1_mean": 0.70, "seeds": 1}}
    first, second = conclusions.sweep_conclusions(data)
    assert "all with adamw: K = 2: 40.0%, K = 8: 60.0%, K = 32: 69.5%; full softmax 70.0%" in first
    assert "smallest K that reaches the full softmax (to within 1 point (one seed: no spread)) is K = 32" in second
    data["reference"]["val_top1_mean"] = 0.80
    assert (
        "No K tried reaches the full softmax: the best, K = 32, is 10.5 points below it"
        in (conclusions.sweep_conclusions(data)[1])
    )


def test_sweep_ticks_at_the_values_tried(tmp_path: Path) -> None:
    from prodcat.report.experiments import plot_sweep

    ks = [2, 4, 8, 16, 32]
    points = [{"num_sampled": k, "val_top1_mean": 0.5, "val_top1_std": None, "step_seconds_mean": 0.01} for k in ks]
    reference = {"val_top1_mean": 0.6, "step_seconds_mean": 0.02}
    data = {"settings": {"optimizer": "adamw"}, "points": points, "reference": reference}
    figure = plot_sweep(tmp_path / "sweep.png", data)
    assert (tmp_path / "sweep.png").is_file()
    for axes in figure.axes:
        assert list(axes.get_xticks()) == ks
        assert [label.get_text() for label in axes.get_xticklabels()] == ["2", "4", "8", "16", "32"]
        assert not axes.xaxis.get_minorticklocs().size


@pytest.mark.parametrize("name", ["softmax_speedup_5k", "softmax_speedup_500k"])
def test_packaged_bench_copy_matches_the_results(name: str) -> None:
    source = REPO / "benchmarks" / "results" / f"{name}.json"
    if not source.is_file():
        pytest.skip(f"{source} is not in this checkout")
    measured = json.loads(source.read_text())
    copy = {r["name"]: r for r in conclusions.bench_results()}[name]
    assert copy["speedup"] == measured["value"] and copy["num_classes"] == measured["details"]["num_classes"]
    assert copy["when"] == measured["when"]


def test_reliability_bins() -> None:
    from prodcat.report.figures import reliability_bins

    confidence = np.array([0.05, 0.15, 0.95, 0.95, 0.95, 0.95, 1.0])
    correct = np.array([0, 1, 1, 1, 1, 0, 1])
    bins = reliability_bins(confidence, correct, bins=10)
    assert bins["count"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 4 + 1]
    assert bins["accuracy"][9] == pytest.approx(4 / 5) and np.isnan(bins["accuracy"][5])
    assert bins["confidence"][9] == pytest.approx((0.95 * 4 + 1.0) / 5)
    expected = (abs(0 - 0.05) + abs(1 - 0.15) + 5 * abs(0.8 - 0.96)) / 7
    assert bins["ece"] == pytest.approx(expected)
