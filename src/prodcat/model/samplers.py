"""Candidate samplers for sampled softmax, matching TensorFlow's `*_candidate_sampler` ops.

Each sampler draws `num_sampled` negatives shared by a whole batch and reports expected counts the way TF's
`RangeSampler::SampleBatchGetExpectedCount` does (`tensorflow/core/kernels/range_sampler.cc`):

- with replacement, or when no duplicate was drawn: expected_count(k) = K * P(k);
- unique (without replacement): keep drawing until K distinct classes came out; with `num_tries` the number of
  draws that took, expected_count(k) = 1 - (1 - P(k))^num_tries = -expm1(num_tries * log1p(-P(k))).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from prodcat.model._registry import Registry

__all__ = [
    "Candidates",
    "Sampler",
    "UniformSampler",
    "LogUniformSampler",
    "UnigramSampler",
    "register_sampler",
    "create_sampler",
    "list_samplers",
]

_SAMPLERS: Registry[Callable[..., Sampler]] = Registry("sampler")


def register_sampler(name: str) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    return _SAMPLERS.register(name)


def create_sampler(name: str, num_classes: int, **kwargs: object) -> Sampler:
    """Build the sampler registered as `name` over classes 0..num_classes-1."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return _SAMPLERS.get(name)(num_classes, **kwargs)


def list_samplers() -> list[str]:
    return _SAMPLERS.names()


class Candidates(NamedTuple):
    """One draw of negatives: ids (K,), their expected counts (K,) and the number of raw draws it took."""

    ids: torch.Tensor
    expected_count: torch.Tensor
    num_tries: int


class Sampler:
    """Draws class ids from a fixed distribution P over 0..num_classes-1 (computed in float64)."""

    def __init__(self, num_classes: int, unique: bool = True) -> None:
        self.num_classes = int(num_classes)
        self.unique = bool(unique)

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """P(k) for each id, float64."""
        raise NotImplementedError

    def _draw(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        """`count` independent draws (with replacement), int64 on CPU."""
        raise NotImplementedError

    def sample(self, num_sampled: int, generator: torch.Generator | None = None) -> Candidates:
        """Draw `num_sampled` ids (distinct when `unique`) and their expected counts."""
        if num_sampled < 1:
            raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
        if self.unique:
            if num_sampled > self.num_classes:
                raise ValueError(f"cannot draw {num_sampled} distinct classes out of {self.num_classes}")
            ids, num_tries = self._draw_unique(num_sampled, generator)
        else:
            ids, num_tries = self._draw(num_sampled, generator), num_sampled
        return Candidates(ids, self.expected_count(ids, num_tries, num_sampled), num_tries)

    def expected_count(self, ids: torch.Tensor, num_tries: int, num_sampled: int | None = None) -> torch.Tensor:
        """Expected count (float32) of each id in a draw that took `num_tries` raw draws, as TF's ExpectedCountHelper.

        With replacement num_tries is K and the count is K * P(k). Unique: 1 - (1 - P(k))^num_tries, except that TF
        takes K * P(k) when no duplicate came up (num_tries == num_sampled).
        """
        probability = self.probability(ids.detach().cpu().to(torch.int64))
        if not self.unique or num_tries == num_sampled:
            return (probability * num_tries).to(torch.float32)
        return (-torch.expm1(num_tries * torch.log1p(-probability))).to(torch.float32)

    def _draw_unique(self, num_sampled: int, generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
        """TF's unique sampling, vectorised: the stream of raw draws is read until `num_sampled` distinct ids came
        out; ids keep the order of their first appearance and num_tries counts the draws read."""
        draws = self._draw(max(2 * num_sampled, 16), generator)
        while True:
            values, inverse = torch.unique(draws, return_inverse=True)
            if values.numel() >= num_sampled:
                break
            draws = torch.cat([draws, self._draw(draws.numel(), generator)])
        positions = torch.arange(draws.numel())
        first = torch.full((values.numel(),), draws.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, positions, reduce="amin")
        first_sorted, order = torch.sort(first)
        num_tries = int(first_sorted[num_sampled - 1]) + 1
        return values[order[:num_sampled]], num_tries


@register_sampler("uniform")
class UniformSampler(Sampler):
    """P(k) = 1 / C."""

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full(ids.shape, 1.0 / self.num_classes, dtype=torch.float64)

    def _draw(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (count,), generator=generator, dtype=torch.int64)


@register_sampler("log_uniform")
class LogUniformSampler(Sampler):
    """TF's Zipfian sampler over ids sorted by decreasing frequency: P(k) = (log(k+2) - log(k+1)) / log(C+1)."""

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(torch.float64)
        return torch.log1p(1.0 / (ids + 1.0)) / math.log1p(self.num_classes)

    def _draw(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        # Inverse CDF, as TF's LogUniformSampler::Sample: floor(exp(u * log(C+1))) - 1, folded into range.
        uniform = torch.rand(count, generator=generator, dtype=torch.float64)
        values = torch.exp(uniform * math.log1p(self.num_classes)).floor().to(torch.int64) - 1
        return values.remainder_(self.num_classes)


@register_sampler("unigram")
class UnigramSampler(Sampler):
    """P(k) proportional to count(k) ** alpha (TF's fixed_unigram_candidate_sampler with distortion = alpha).

    Classes with a zero count are treated as count 1, so every class can be drawn and log Q stays finite.
    """

    def __init__(
        self, num_classes: int, class_counts: object = None, unigram_alpha: float = 0.75, unique: bool = True
    ) -> None:
        super().__init__(num_classes, unique)
        if class_counts is None:
            raise ValueError("the unigram sampler needs class_counts (one count per class)")
        counts = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
        if counts.shape != (self.num_classes,):
            raise ValueError(f"class_counts must have shape ({self.num_classes},), got {tuple(counts.shape)}")
        if not torch.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("class_counts must be finite and >= 0")
        weights = counts.clamp_min(1.0) ** float(unigram_alpha)
        self._probs = weights / weights.sum()
        self._cdf = torch.cumsum(self._probs, 0)

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        return self._probs[ids]

    def _draw(self, count: int, generator: torch.Generator | None) -> torch.Tensor:
        uniform = torch.rand(count, generator=generator, dtype=torch.float64) * self._cdf[-1]
        return torch.searchsorted(self._cdf, uniform, right=True).clamp_max_(self.num_classes - 1)
