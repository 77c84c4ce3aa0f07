"""`prodcat evaluate`: every metric against a brute-force numpy computation on a tiny trained run; files written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from prodcat.config import EvalConfig, ExtractConfig, TrainConfig, save_config
from prodcat.data.taxonomy import Taxonomy
from prodcat.evaluate import (
    FIGURES,
    choose_threshold,
    confidence_curve,
    confusions,
    evaluate,
    frequency_groups,
    top_k,
)
from prodcat.features.store import FeatureStore, write_store
from prodcat.paths import WorkPaths
from prodcat.predict import AGGREGATIONS, Predictor

ROWS = [
    (10, "MAISON & <JARDIN>", "ABRI", "ABRI DE JARDIN"),
    (11, "MAISON & <JARDIN>", "ABRI", "CARTE PRÉPAYÉE "),
    (12, "MAISON & <JARDIN>", "OUTIL", "GROS ŒUVRE"),
    (13, "SPORT", "CYCLES", "VÉLO"),
    (14, "SPORT", "CYCLES", "CASQUE"),
    (15, "SPORT", "ABRI", "ABRI DE JARDIN"),  # same level-2 name under another level 1: another group
    (16, "LIBRAIRIE", "LIVRE", "ROMAN"),
    (17, "LIBRAIRIE", "PAPETERIE", "CAHIER"),
]
COUNTS = {10: 40, 11: 30, 12: 25, 13: 20, 14: 12, 15: 8, 16: 5, 17: 3}
DIM = 8
STORE = "toy"


def build_workdir(root: Path, seed: int = 0) -> tuple[Taxonomy, FeatureStore]:
    """Taxonomy + a feature store of products with 1-4 images whose features are noisy class centres."""
    rng = np.random.default_rng(seed)
    taxonomy = Taxonomy.from_rows(ROWS, COUNTS)
    paths = WorkPaths(root)
    taxonomy.save(paths.taxonomy)
    centres = rng.normal(size=(taxonomy.num_classes, DIM)) * 1.2
    features, product_id, image_index, label, split = [], [], [], [], []
    next_id = 5000
    for name, products in (("train", 120), ("val", 64)):
        for i in range(products):
            leaf = int(rng.integers(taxonomy.num_classes))
            for j in range(i % 4 + 1):
                features.append(centres[leaf] + rng.normal(size=DIM) * 1.4)
                product_id.append(next_id)
                image_index.append(j)
                label.append(leaf)
                split.append(name)
            next_id -= 7  # ids decrease in store order: evaluate must not assume sorted ids
    label_array = np.array(label)
    store = write_store(
        paths.feature_store(STORE),
        np.array(features, np.float32),
        product_id=np.array(product_id),
        image_index=np.array(image_index),
        label=label_array,
        level1=taxonomy.leaf_level1[label_array],
        level2=taxonomy.leaf_level2[label_array],
        split=np.array(split),
        shard_size=50,
    )
    # Predictor.load reads the store's ExtractConfig; no backbone is ever built on cached features.
    save_config(
        ExtractConfig(workdir=str(root), backbone="arrays", name=STORE, random_init=True),
        paths.feature_store(STORE) / "config.json",
    )
    return taxonomy, store


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from prodcat.train import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("evalwork")
    taxonomy, store = build_workdir(root)
    common = dict(
        workdir=str(root),
        features=STORE,
        lr=0.05,
        warmup_steps=0,
        epochs=12,
        batch_size=32,
        eval_every=40,
        device="cpu",
        hidden_dim=16,
        dropout=0.0,
    )
    runs = {
        "flat": train(TrainConfig(head="linear", loss="softmax", run_name="flat", **common)),
        "hier": train(TrainConfig(head="hier", loss="softmax", run_name="hier", **common)),
    }
    return {"root": root, "taxonomy": taxonomy, "store": store, "runs": runs}


def _val_log_probs(run: Path, store: FeatureStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, Predictor]:
    predictor = Predictor.load(run)
    rows = store.split_indices("val")
    log_probs = predictor.log_probs_from_features(store.read(rows))
    return log_probs, store.column("label")[rows].astype(np.int64), store.column("product_id")[rows], predictor


def _brute_products(log_probs: np.ndarray, product_ids: np.ndarray) -> dict:
    """Per product and aggregation: (top-1 label, top-5 labels, log-prob of every class), by loops."""
    result: dict = {method: {} for method in AGGREGATIONS}
    for pid in np.unique(product_ids):
        lp = log_probs[product_ids == pid].astype(np.float64)
        probs = np.exp(lp)
        mean_prob = probs.mean(axis=0)
        mean_log = lp.mean(axis=0)
        votes = np.bincount(lp.argmax(axis=1), minlength=lp.shape[1])
        vote_order = sorted(range(lp.shape[1]), key=lambda c: (-votes[c], -mean_prob[c]))
        normalised_log = mean_log - np.log(np.exp(mean_log).sum())
        result["mean_prob"][int(pid)] = (np.argsort(-mean_prob)[:5], np.log(mean_prob))
        result["mean_logprob"][int(pid)] = (np.argsort(-mean_log)[:5], normalised_log)
        result["vote"][int(pid)] = (np.array(vote_order[:5]), None)
    return result


def test_metrics_match_brute_force(workdir: dict) -> None:
    taxonomy, store = workdir["taxonomy"], workdir["store"]
    metrics = evaluate(EvalConfig(run=str(workdir["runs"]["flat"]), target_accuracy=0.9))
    log_probs, labels, product_ids, _ = _val_log_probs(workdir["runs"]["flat"], store)
    pred = log_probs.argmax(axis=1)
    assert metrics["images"] == len(labels) and metrics["products"] == len(np.unique(product_ids)) == 64
    assert metrics["image"]["top1"] == pytest.approx(np.mean(pred == labels))
    top5 = np.argsort(-log_probs, axis=1)[:, :5]
    assert metrics["image"]["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(axis=1)))
    assert metrics["image"]["loss"] == pytest.approx(-np.mean(log_probs[np.arange(len(labels)), labels]), rel=1e-5)
    assert 0.3 < metrics["image"]["top1"] < 1.0  # learned something, still makes errors to analyse

    brute = _brute_products(log_probs, product_ids)
    pids = np.unique(product_ids)
    product_label = np.array([labels[product_ids == p][0] for p in pids])
    num_images = np.array([(product_ids == p).sum() for p in pids])
    assert sorted(num_images.tolist()) == sorted([i % 4 + 1 for i in range(64)])
    best = None
    for method in AGGREGATIONS:
        tops = np.array([brute[method][int(p)][0] for p in pids])
        block = metrics["product"]["methods"][method]
        assert block["top1"] == pytest.approx(np.mean(tops[:, 0] == product_label)), method
        assert block["top5"] == pytest.approx(np.mean((tops == product_label[:, None]).any(axis=1))), method
        if method == "vote":
            assert block["loss"] is None
        else:
            loss = -np.mean([brute[method][int(p)][1][y] for p, y in zip(pids, product_label, strict=True)])
            assert block["loss"] == pytest.approx(loss, rel=1e-5), method
        for k in (1, 2, 3, 4):
            entry = metrics["product"]["by_num_images"][method][str(k)]
            assert entry["products"] == int((num_images == k).sum()) == 16
            assert entry["top1"] == pytest.approx(np.mean((tops[:, 0] == product_label)[num_images == k]))
        key = (block["top1"], block["top5"])
        if best is None or key > best[0]:
            best = (key, method)
    assert metrics["product"]["aggregation"] == best[1]
    chosen_top1 = np.array([brute[best[1]][int(p)][0][0] for p in pids])
    assert metrics["product"]["top1"] == pytest.approx(np.mean(chosen_top1 == product_label))
    _check_taxonomy(metrics["taxonomy"], taxonomy, pred, labels, chosen_top1, product_label)


def _check_taxonomy(
    block: dict,
    taxonomy: Taxonomy,
    image_pred: np.ndarray,
    image_label: np.ndarray,
    product_pred: np.ndarray,
    product_label: np.ndarray,
) -> None:
    names = {label: taxonomy.names(label) for label in range(taxonomy.num_classes)}
    for unit, pred, truth in (("image", image_pred, image_label), ("product", product_pred, product_label)):
        same1 = np.array([names[p][0] == names[t][0] for p, t in zip(pred, truth, strict=True)])
        same2 = np.array([names[p][:2] == names[t][:2] for p, t in zip(pred, truth, strict=True)])
        wrong = pred != truth
        assert block[unit]["level1"] == pytest.approx(same1.mean())
        assert block[unit]["level2"] == pytest.approx(same2.mean())
        assert block[unit]["leaf"] == pytest.approx(1 - wrong.mean())
        severity = block[unit]["severity"]
        assert severity["errors"] == int(wrong.sum()) > 0
        assert severity["same_level2"] == pytest.approx(same2[wrong].mean())
        assert severity["same_level1"] == pytest.approx(same1[wrong].mean())
        assert severity["other_level1"] == pytest.approx(1 - same1[wrong].mean())
    # Terciles of the 8 leaves by train count (labels are already by decreasing count): 3 head, 3 torso, 2 tail.
    frequency = block["frequency"]
    assert [frequency[g]["categories"] for g in ("head", "torso", "tail")] == [3, 3, 2]
    assert sum(frequency[g]["products"] for g in ("head", "torso", "tail")) == len(product_label)
    head = product_label < 3
    assert frequency["head"]["products"] == int(head.sum())
    assert frequency["head"]["product_top1"] == pytest.approx(np.mean(product_pred[head] == product_label[head]))
    pairs: dict = {}
    for p, t in zip(product_pred, product_label, strict=True):
        if p != t:
            pairs[(int(t), int(p))] = pairs.get((int(t), int(p)), 0) + 1
    expected = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:10]
    got = [((c["true"]["label"], c["predicted"]["label"]), c["count"]) for c in block["confusions"]]
    assert got == expected
    first = block["confusions"][0]
    assert (first["true"]["level1"], first["true"]["level2"], first["true"]["level3"]) == names[expected[0][0][0]]


def test_threshold_and_files(workdir: dict) -> None:
    run = workdir["runs"]["flat"]
    target = 0.9
    metrics = evaluate(EvalConfig(run=str(run), target_accuracy=target))
    out = run / "eval"
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert saved["product"]["top1"] == metrics["product"]["top1"]
    for name in FIGURES.values():
        assert (out / name).stat().st_size > 1000, name
    table = pq.read_table(out / "predictions.parquet").to_pandas()
    assert len(table) == metrics["products"]
    assert {"product_id", "num_images", "label", "top1_label", "top1_prob", "top3_label", "top3_prob"} <= set(table)
    assert (table["top1_prob"] >= table["top2_prob"]).all() and (table["top2_prob"] >= table["top3_prob"]).all()
    assert table["correct"].mean() == pytest.approx(metrics["product"]["top1"])
    # Threshold semantics, brute force: accept prob >= t. Reached at t; no lower score reaches it with more coverage.
    prob, correct = table["top1_prob"].to_numpy(), table["correct"].to_numpy()
    confidence = metrics["confidence"]
    for score in np.unique(prob):
        accepted = prob >= score
        if confidence["threshold"] is not None and score < confidence["threshold"]:
            assert correct[accepted].mean() < target
    if confidence["threshold"] is not None:
        accepted = prob >= confidence["threshold"] - 1e-7  # float32 storage of the float64 score
        assert correct[accepted].mean() >= target
        assert confidence["coverage"] == pytest.approx(accepted.mean())
    else:
        assert all(correct[prob >= score].mean() < target for score in np.unique(prob))
    predictor = Predictor.load(run)
    assert predictor.aggregation == metrics["product"]["aggregation"]
    assert predictor.accept_threshold == confidence["threshold"]


def test_unreachable_target_and_fixed_aggregation(workdir: dict) -> None:
    metrics = evaluate(EvalConfig(run=str(workdir["runs"]["flat"]), aggregation="vote", target_accuracy=1.0))
    assert metrics["product"]["aggregation"] == "vote"
    assert metrics["product"]["top1"] == metrics["product"]["methods"]["vote"]["top1"]
    table = pq.read_table(workdir["runs"]["flat"] / "eval" / "predictions.parquet").to_pandas()
    correct = table.sort_values("top1_prob", ascending=False)["correct"].to_numpy()
    if not correct[0]:  # the most confident product is wrong: 100 % is out of reach at every threshold
        assert metrics["confidence"]["threshold"] is None and metrics["confidence"]["note"]
    assert "hier" not in metrics


def test_hier_heads(workdir: dict) -> None:
    run, store, taxonomy = workdir["runs"]["hier"], workdir["store"], workdir["taxonomy"]
    metrics = evaluate(EvalConfig(run=str(run)))
    assert metrics["head"] == "hier"
    predictor = Predictor.load(run)
    rows = store.split_indices("val")
    with torch.no_grad():
        own = predictor.model.head_log_probs(torch.from_numpy(store.read(rows)))
    labels = store.column("label")[rows].astype(np.int64)
    level1 = own["level1"].argmax(dim=1).numpy()
    level2 = own["level2"].argmax(dim=1).numpy()
    assert metrics["hier"]["level1_head"]["image"] == pytest.approx(np.mean(level1 == taxonomy.leaf_level1[labels]))
    assert metrics["hier"]["level2_head"]["image"] == pytest.approx(np.mean(level2 == taxonomy.leaf_level2[labels]))
    assert 0.0 <= metrics["hier"]["level1_head"]["product"] <= 1.0


def test_missing_split_is_a_clear_error(workdir: dict) -> None:
    with pytest.raises(ValueError, match="no valid 'test' images"):
        evaluate(EvalConfig(run=str(workdir["runs"]["flat"]), split="test"))


# -- the small exact pieces -------------------------------------------------------------------------------------------
def test_top_k_orders_and_breaks_ties_by_label() -> None:
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 2.0, 1.0, 0.0]])
    labels, values = top_k(scores, 3)
    assert labels.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert values.tolist() == [[0.5, 0.5, 0.2], [3.0, 2.0, 1.0]]
    assert top_k(scores, 10)[0].shape == (2, 4)


def test_confidence_curve_ties_and_threshold_choice() -> None:
    score = np.array([0.9, 0.9, 0.8, 0.7, 0.6, 0.6])
    correct = np.array([True, True, False, True, True, False])
    curve = confidence_curve(score, correct)
    assert curve["threshold"].tolist() == [0.9, 0.8, 0.7, 0.6]  # tied scores are accepted together
    assert curve["coverage"].tolist() == pytest.approx([2 / 6, 3 / 6, 4 / 6, 1.0])
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 2 / 3, 3 / 4, 4 / 6])
    picked = choose_threshold(curve, 0.75)  # 0.7 reaches 75 % with more coverage than 0.9
    assert (picked["threshold"], picked["coverage"], picked["accuracy"]) == (0.7, pytest.approx(4 / 6), 0.75)
    assert choose_threshold(curve, 1.0)["threshold"] == 0.9
    missed = choose_threshold(confidence_curve(score, np.zeros(6, bool)), 0.95)
    assert missed["threshold"] is None and missed["coverage"] == 0.0 and "95.0%" in missed["note"]


def test_frequency_groups_and_confusions() -> None:
    rows = ROWS + [(18, "VIDE", "RIEN", "JAMAIS VENDU")]
    taxonomy = Taxonomy.from_rows(rows, COUNTS)  # category 18 has no training product
    group = frequency_groups(taxonomy)
    assert group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, -1]
    pred = np.array([1, 1, 2, 0, 0, 3])
    label = np.array([0, 0, 2, 1, 1, 3])
    pairs = confusions(pred, label, taxonomy)
    assert [(p["true"]["label"], p["predicted"]["label"], p["count"]) for p in pairs] == [(0, 1, 2), (1, 0, 2)]
    assert pairs[0]["same_level2"] and pairs[0]["share_of_errors"] == 0.5 and pairs[0]["share_of_true"] == 1.0
