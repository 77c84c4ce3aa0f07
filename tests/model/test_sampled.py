"""Sampled softmax and samplers against TensorFlow's definitions, written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prodcat.model import create_loss, create_sampler, list_samplers
from prodcat.model.samplers import Candidates

torch.set_num_threads(2)

COUNTS = np.array([50, 30, 30, 20, 9, 7, 5, 4, 3, 3, 2, 2, 1, 1, 1, 0, 1, 1, 2, 1], dtype=np.float64)


def _probability(name: str, num_classes: int, alpha: float = 0.75) -> np.ndarray:
    """P(k) straight from the definitions (TF log-uniform: Zipf over ids; unigram: count^alpha, zero -> 1)."""
    k = np.arange(num_classes, dtype=np.float64)
    if name == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    if name == "log_uniform":
        return (np.log(k + 2) - np.log(k + 1)) / np.log(num_classes + 1)
    weights = np.maximum(COUNTS[:num_classes], 1.0) ** alpha
    return weights / weights.sum()


def _sampler(name: str, num_classes: int = 20, unique: bool = True):
    extra = {"class_counts": COUNTS[:num_classes], "unigram_alpha": 0.75} if name == "unigram" else {}
    return create_sampler(name, num_classes, unique=unique, **extra)


def _tf_expected_count(p: np.ndarray, num_sampled: int, num_tries: int) -> np.ndarray:
    """TF range_sampler.cc ExpectedCountHelper."""
    if num_tries == num_sampled:
        return p * num_sampled
    return -np.expm1(num_tries * np.log1p(-p))


@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("name", list_samplers())
def test_sampler_expected_counts_match_tf(name: str, unique: bool) -> None:
    sampler = _sampler(name, unique=unique)
    p = _probability(name, 20)
    np.testing.assert_allclose(p.sum(), 1.0)
    np.testing.assert_allclose(sampler.probability(torch.arange(20)).numpy(), p, rtol=1e-12)
    generator = torch.Generator().manual_seed(0)
    saw_duplicates = False
    for _ in range(20):
        candidates = sampler.sample(8, generator)
        ids = candidates.ids.numpy()
        assert ids.shape == (8,) and ids.min() >= 0 and ids.max() < 20
        if unique:
            assert len(set(ids.tolist())) == 8 and candidates.num_tries >= 8
        else:
            assert candidates.num_tries == 8
        saw_duplicates |= candidates.num_tries > 8
        want = _tf_expected_count(p[ids], 8, candidates.num_tries)
        np.testing.assert_allclose(candidates.expected_count.numpy(), want, rtol=1e-6)
        extras = torch.tensor([0, 3, 19])
        np.testing.assert_allclose(
            sampler.expected_count(extras, candidates.num_tries, 8).numpy(),
            _tf_expected_count(p[[0, 3, 19]], 8, candidates.num_tries),
            rtol=1e-6,
        )
    assert saw_duplicates == unique  # the unique branch of the formula was exercised


@pytest.mark.parametrize("name", list_samplers())
def test_unique_sampling_follows_tf_sequential_algorithm(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = _sampler(name)
    stream = torch.randint(0, 20, (400,), generator=torch.Generator().manual_seed(1))
    position = 0

    def draw(count: int, generator: torch.Generator | None) -> torch.Tensor:
        nonlocal position
        position += count
        return stream[position - count : position]

    monkeypatch.setattr(sampler, "_draw", draw)
    candidates = sampler.sample(12, None)
    picked, tries = [], 0  # TF: draw until num_sampled distinct values came out, keep first-appearance order
    for value in stream.tolist():
        tries += 1
        if value not in picked:
            picked.append(value)
        if len(picked) == 12:
            break
    assert candidates.ids.tolist() == picked and candidates.num_tries == tries


@pytest.mark.parametrize("name", list_samplers())
def test_sampling_frequencies_match_probability(name: str) -> None:
    sampler = _sampler(name, unique=False)
    draws = 200_000
    counts = np.bincount(sampler.sample(draws, torch.Generator().manual_seed(2)).ids.numpy(), minlength=20)
    expected = draws * _probability(name, 20)
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    degrees = 19
    assert chi_square < degrees + 5 * math.sqrt(2 * degrees), chi_square  # ~ p < 1e-4 under the null


def _reference_loss(
    embedding: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    candidates: Candidates,
    p: np.ndarray,
    num_sampled: int,
    logq: bool,
    remove_hits: bool,
):
    """Per-row sampled softmax straight from TF's formula, one row and one candidate at a time (float64)."""
    losses = []
    for row, true_class in enumerate(target.tolist()):
        q_true = _tf_expected_count(p[[true_class]], num_sampled, candidates.num_tries)[0]
        true_logit = embedding[row] @ weight[true_class] + bias[true_class] - (math.log(q_true) if logq else 0.0)
        logits = [true_logit]
        for sampled, q in zip(candidates.ids.tolist(), candidates.expected_count.tolist(), strict=True):
            if remove_hits and sampled == true_class:
                continue  # exp(-FLOAT_MAX) == 0: the term drops out of the softmax
            logits.append(embedding[row] @ weight[sampled] + bias[sampled] - (math.log(q) if logq else 0.0))
        losses.append(torch.logsumexp(torch.stack(logits), 0) - true_logit)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("with_replacement", [False, True])
@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("logq", [True, False])
def test_sampled_softmax_equals_brute_force_reference(logq: bool, remove_hits: bool, with_replacement: bool) -> None:
    torch.manual_seed(0)
    num_classes, num_sampled = 12, 5
    loss_fn = create_loss(
        "sampled",
        6,
        num_classes,
        num_sampled=num_sampled,
        sampler="log_uniform",
        with_replacement=with_replacement,
        remove_accidental_hits=remove_hits,
        logq_correction=logq,
        seed=4,
    ).double()
    with torch.no_grad():
        loss_fn.bias.normal_()
    candidates = loss_fn.sample()
    ids = candidates.ids.tolist()
    target = torch.tensor([ids[0], ids[1], ids[0], 11 if 11 not in ids else 10, ids[-1], 7])  # accidental hits
    assert (target.unsqueeze(1) == candidates.ids.unsqueeze(0)).any(1).sum() >= 3
    embedding = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(embedding, target, candidates)
    (grad,) = torch.autograd.grad(loss, embedding)
    reference = _reference_loss(
        embedding,
        loss_fn.weight,
        loss_fn.bias,
        target,
        candidates,
        _probability("log_uniform", num_classes),
        num_sampled,
        logq,
        remove_hits,
    )
    (reference_grad,) = torch.autograd.grad(reference, embedding)
    # log Q is float32 in both (TF's expected counts are float), hence float32-level tolerances.
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-6, atol=1e-6)


def test_sampled_draws_are_reproducible_with_a_seed() -> None:
    first = create_loss("sampled", 4, 50, num_sampled=7, seed=11)
    second = create_loss("sampled", 4, 50, num_sampled=7, seed=11)
    assert all(torch.equal(first.sample().ids, second.sample().ids) for _ in range(3))


def test_too_many_negatives_without_replacement_is_clamped() -> None:
    with pytest.warns(UserWarning, match="num_sampled"):
        loss_fn = create_loss("sampled", 4, 7, num_sampled=256)
    assert loss_fn.num_sampled == 7
    assert torch.isfinite(loss_fn(torch.randn(3, 4), torch.tensor([0, 1, 6])))


def test_sparse_gradients_equal_dense_gradients() -> None:
    torch.manual_seed(0)
    loss_fn = create_loss("sampled", 5, 40, num_sampled=6, seed=0)
    embedding = torch.randn(4, 5)
    target = torch.tensor([1, 1, 30, 2])
    candidates = loss_fn.sample()
    grads = {}
    for sparse in (False, True):
        loss_fn.zero_grad(set_to_none=True)
        loss_fn.sparse_grad = sparse
        loss_fn(embedding, target, candidates).backward()
        grads[sparse] = (loss_fn.weight.grad, loss_fn.bias.grad)
    assert grads[True][0].is_sparse and grads[True][1].is_sparse
    torch.testing.assert_close(grads[True][0].to_dense(), grads[False][0])
    torch.testing.assert_close(grads[True][1].to_dense(), grads[False][1])


def test_many_negatives_gradient_approaches_full_softmax() -> None:
    """K close to C, uniform, logQ: the sampled gradient w.r.t. the embedding points where the full one does."""
    torch.manual_seed(0)
    num_classes = 40
    loss_fn = create_loss("sampled", 8, num_classes, num_sampled=36, sampler="uniform", logq_correction=True, seed=5)
    with torch.no_grad():
        loss_fn.weight.mul_(4.0)  # sharper softmax so that gradients are not all near zero
    embedding = torch.randn(8, 8, requires_grad=True)
    target = torch.randint(0, num_classes, (8,))
    (full_grad,) = torch.autograd.grad(loss_fn.full_loss(embedding, target), embedding)
    draws = [torch.autograd.grad(loss_fn(embedding, target), embedding)[0] for _ in range(30)]
    cosines = [F.cosine_similarity(g.flatten(), full_grad.flatten(), dim=0).item() for g in draws]
    mean_grad = torch.stack(draws).mean(0)
    assert np.mean(cosines) > 0.95, cosines
    assert F.cosine_similarity(mean_grad.flatten(), full_grad.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_sampled_path_equals_op_by_op_path(sparse: bool) -> None:
    """forward() runs a fused kernel; `sampled_logits` + cross-entropy is the plain autograd version of it."""
    torch.manual_seed(0)
    loss_fn = create_loss("sampled", 5, 30, num_sampled=6, seed=2).double()
    loss_fn.sparse_grad = sparse
    embedding = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    candidates = loss_fn.sample()
    target = torch.tensor([int(candidates.ids[0]), 3, 3, 29, int(candidates.ids[2])])
    results = []
    for fused in (True, False):
        loss_fn.zero_grad(set_to_none=True)
        embedding.grad = None
        if fused:
            loss = loss_fn(embedding, target, candidates)
        else:
            loss = F.cross_entropy(loss_fn.sampled_logits(embedding, target, candidates), torch.zeros_like(target))
        (2.0 * loss).backward()
        grads = [loss_fn.weight.grad, loss_fn.bias.grad]
        assert all(grad.is_sparse == sparse for grad in grads)
        results.append([loss.detach(), embedding.grad.clone(), *[g.to_dense() if sparse else g for g in grads]])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
