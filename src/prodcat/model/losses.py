"""Output losses: each owns the output layer (embedding -> C classes) and knows how to train and score it.

Every loss gives three things: `forward(embedding, target)`, the (mean) training loss, which may be an estimate
(sampled softmax); `log_probs(embedding)`, the full (N, C) log-softmax over all classes, which validation and every
reported metric use; `full_loss(embedding, target)`, the exact cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prodcat.model._fused import linear_cross_entropy
from prodcat.model._registry import Registry

__all__ = [
    "OutputLoss",
    "SoftmaxLoss",
    "AdaptiveSoftmaxLoss",
    "BalancedSoftmaxLoss",
    "adaptive_cutoffs",
    "register_loss",
    "create_loss",
    "list_losses",
]

_LOSSES: Registry[Callable[..., OutputLoss]] = Registry("loss")


def register_loss(name: str) -> Callable[[Callable[..., OutputLoss]], Callable[..., OutputLoss]]:
    """Decorator: register a loss factory `fn(in_dim, num_classes, **kwargs) -> OutputLoss` (duplicates refused)."""
    return _LOSSES.register(name)


def create_loss(name: str, in_dim: int, num_classes: int, **kwargs: object) -> OutputLoss:
    """Build the loss registered as `name` for embeddings of size `in_dim` and `num_classes` classes."""
    if in_dim < 1 or num_classes < 2:
        raise ValueError(f"need in_dim >= 1 and num_classes >= 2, got {in_dim} and {num_classes}")
    return _LOSSES.get(name)(int(in_dim), int(num_classes), **kwargs)


def list_losses() -> list[str]:
    return _LOSSES.names()


class OutputLoss(nn.Module):
    """Base class. `supports_sparse` marks losses whose output rows can get sparse gradients (see optim.py)."""

    supports_sparse = False

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes

    def log_probs(self, embedding: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def full_loss(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(self.log_probs(embedding), target)


def _init_output(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    # nn.Linear's default init, done in place: a 1M x 1280 weight must not be copied.
    bound = 1.0 / weight.shape[1] ** 0.5
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.zero_()


class SoftmaxLoss(OutputLoss):
    """Dense output layer (weight (C, H) + bias, as nn.Linear) with full softmax cross-entropy.

    Training uses a fused linear + cross-entropy (see `_fused.py`) that is close to the matmul FLOP floor.
    """

    def __init__(self, in_dim: int, num_classes: int, label_smoothing: float = 0.0, bias: bool = True) -> None:
        super().__init__(in_dim, num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        _init_output(self.weight, self.bias)

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(embedding, self.weight, self.bias)

    def forward(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(embedding, self.weight, self.bias, target, self.label_smoothing)

    def log_probs(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.logits(embedding), dim=1)

    def full_loss(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embedding), target)


class BalancedSoftmaxLoss(SoftmaxLoss):
    """Balanced softmax (Ren et al. 2020): trains on softmax(logits + log prior), predicts with plain logits.

    Adding the train split's log label frequencies during training lets the weights model p(x | y) rather than
    p(y | x) under the train prior, so at inference the plain logits score every leaf as if leaves were equally
    frequent: more macro accuracy, usually less top-1 on a train-distributed test set. The prior is a persistent
    buffer, saved with the weights, so a loaded run predicts the same without its training data.
    `prior_counts` (training pictures per class) None gives a uniform prior: plain softmax.
    """

    def __init__(
        self, in_dim: int, num_classes: int, prior_counts: object = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__(in_dim, num_classes, label_smoothing=label_smoothing)
        counts = np.ones(num_classes) if prior_counts is None else np.asarray(prior_counts, dtype=np.float64)
        if counts.shape != (num_classes,) or not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError(f"prior_counts must be {num_classes} finite counts >= 0, got shape {counts.shape}")
        counts = np.maximum(counts, 1.0)  # an unseen leaf counts as 1, as the unigram sampler: log prior stays finite
        self.register_buffer("log_prior", torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32))

    def forward(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logits + log prior = W e + (b + log prior): the fused kernel with a shifted bias, no (N, C) copy.
        prior = self.log_prior.to(self.weight.dtype)
        shifted = prior if self.bias is None else self.bias + prior
        return linear_cross_entropy(embedding, self.weight, shifted, target, self.label_smoothing)

    def training_logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """The logits the training loss sees (plain logits + log prior)."""
        return self.logits(embedding) + self.log_prior


def adaptive_cutoffs(num_classes: int) -> list[int]:
    """Cluster boundaries for classes sorted by decreasing frequency: about [C/20, C/5], strictly increasing, and
    every tail cluster keeps >= 2 classes (a one-class cluster has a constant log-softmax and never learns);
    tiny C gets a single split (C = 8 -> [2], C = 12 -> [1])."""
    cutoffs: list[int] = []
    for cutoff in sorted({round(num_classes / 20), round(num_classes / 5)}):
        if cutoff >= 1 and num_classes - cutoff >= 2 and (not cutoffs or cutoff - cutoffs[-1] >= 2):
            cutoffs.append(cutoff)
    return cutoffs or [max(1, num_classes // 2)]


class AdaptiveSoftmaxLoss(OutputLoss):
    """torch.nn.AdaptiveLogSoftmaxWithLoss (Grave et al. 2017): frequent classes in a full head, rarer ones in
    smaller tail clusters with reduced projections."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        cutoffs: list[int] | None = None,
        div_value: float = 4.0,
        head_bias: bool = True,
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.cutoffs = list(cutoffs) if cutoffs is not None else adaptive_cutoffs(num_classes)
        # Tail cluster i projects to in_dim // div_value**(i+1) dims; never let the last one reach zero width.
        while div_value > 1.0 and in_dim // div_value ** len(self.cutoffs) < 1:
            div_value = max(1.0, div_value / 2.0)
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(
            in_dim, num_classes, self.cutoffs, div_value=div_value, head_bias=head_bias
        )

    # torch's AdaptiveLogSoftmaxWithLoss mixes dtypes under autocast (index_copy_ of float32 into bfloat16), so it
    # always runs in float32.
    def forward(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embedding.device.type, enabled=False):
            return self.adaptive(embedding.float(), target).loss

    def log_probs(self, embedding: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embedding.device.type, enabled=False):
            return self.adaptive.log_prob(embedding.float())


@register_loss("softmax")
def _softmax(in_dim: int, num_classes: int, label_smoothing: float = 0.0) -> OutputLoss:
    return SoftmaxLoss(in_dim, num_classes, label_smoothing=label_smoothing)


@register_loss("balanced_softmax")
def _balanced_softmax(
    in_dim: int, num_classes: int, prior_counts: object = None, label_smoothing: float = 0.0
) -> OutputLoss:
    return BalancedSoftmaxLoss(in_dim, num_classes, prior_counts=prior_counts, label_smoothing=label_smoothing)


@register_loss("adaptive")
def _adaptive(in_dim: int, num_classes: int, cutoffs: list[int] | None = None, div_value: float = 4.0) -> OutputLoss:
    return AdaptiveSoftmaxLoss(in_dim, num_classes, cutoffs=cutoffs, div_value=div_value)
