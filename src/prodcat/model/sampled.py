"""Sampled softmax, exactly as TensorFlow's `tf.nn.sampled_softmax_loss` (`_compute_sampled_logits`) defines it.

Per step, K negatives are drawn once for the whole batch. For row i with true class t_i, the logits are
  true:    e_i . w_t + b_t       (- log Q(t_i)   with logq_correction)
  sampled: e_i . w_s + b_s       (- log Q(s)     with logq_correction), for each sampled s
where Q is the sampler's expected count of a class in this draw (see samplers.py). A sampled class equal to the
row's true class (an "accidental hit") gets logit -FLOAT_MAX when remove_accidental_hits. The loss is the softmax
cross-entropy of [true, sampled...] with the true one as label, averaged over rows.

Only the rows of the output layer for the batch's true classes and the K sampled classes are read: they are
gathered by index, never the full (N, C) logits, and with `sparse_grad` their gradients come back as sparse COO
tensors of shape (C, H) / (C,) holding just those rows (what the row-wise optimizer in optim.py consumes).

`forward` runs a fused kernel (`_fused.sampled_softmax_cross_entropy`: one (N, K) buffer, gradients written in
place); `sampled_logits` + cross-entropy is the same computation op by op, used under autocast and by the tests.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prodcat.model._fused import sampled_softmax_cross_entropy
from prodcat.model.losses import OutputLoss, _init_output, register_loss
from prodcat.model.samplers import Candidates, Sampler, create_sampler

__all__ = ["SampledSoftmaxLoss"]


class _GatherRowsSparse(torch.autograd.Function):
    """weight[ids], bias[ids] whose backward returns sparse (C, H) / (C,) gradients, like
    F.embedding(sparse=True); a separate function because sparse gradients cannot flow back through a view."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.bias_shape = weight.shape, bias.shape
        return weight.index_select(0, ids), bias.index_select(0, ids)

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor, grad_bias: torch.Tensor):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        indices = ids.unsqueeze(0)
        grad_weight = _sparse_rows(indices, grad_rows, ctx.weight_shape) if ctx.needs_input_grad[1] else None
        grad_b = _sparse_rows(indices, grad_bias, ctx.bias_shape) if ctx.needs_input_grad[2] else None
        return None, grad_weight, grad_b


def _sparse_rows(indices: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Indices come from valid gathers; repeated rows are summed when the optimizer coalesces.
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False, is_coalesced=False)


def _gather_output_rows(
    ids: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, sparse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `weight[ids]` and `bias[ids]`; with `sparse`, their gradients are sparse (only the gathered rows)."""
    if sparse:
        return _GatherRowsSparse.apply(ids, weight, bias)
    return weight.index_select(0, ids), bias.index_select(0, ids)


@register_loss("sampled")  # the class is its own factory: same (in_dim, num_classes, **options) signature
class SampledSoftmaxLoss(OutputLoss):
    """Output layer (weight (C, H), bias (C,)) trained with TF-style sampled softmax; scored with the full softmax.

    `seed` gives the loss its own CPU generator for the negatives; None (default) draws from torch's global RNG,
    so seeding and checkpointing the global RNG reproduces the draws. `sparse_grad` (set by
    `optim.build_optimizer` for a row-wise optimizer) makes the weight and bias gradients sparse.
    """

    supports_sparse = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_sampled: int = 256,
        sampler: str = "log_uniform",
        class_counts: object = None,
        unigram_alpha: float = 0.75,
        with_replacement: bool = False,
        remove_accidental_hits: bool = True,
        logq_correction: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if num_sampled < 1:
            raise ValueError(f"num_sampled must be >= 1, got {num_sampled}")
        if not with_replacement and num_sampled > num_classes:
            # TF would loop forever; drawing every class once is the closest meaningful thing.
            warnings.warn(
                f"num_sampled={num_sampled} > num_classes={num_classes} without replacement; using {num_classes}",
                stacklevel=2,
            )
            num_sampled = num_classes
        self.num_sampled = int(num_sampled)
        self.with_replacement = bool(with_replacement)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.logq_correction = bool(logq_correction)
        sampler_kwargs = {"class_counts": class_counts, "unigram_alpha": unigram_alpha} if sampler == "unigram" else {}
        self.sampler: Sampler = create_sampler(sampler, num_classes, unique=not with_replacement, **sampler_kwargs)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.sparse_grad = False
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        self.bias = nn.Parameter(torch.empty(num_classes))
        _init_output(self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, num_classes={self.num_classes}, num_sampled={self.num_sampled}, "
            f"sampler={type(self.sampler).__name__}, with_replacement={self.with_replacement}, "
            f"remove_accidental_hits={self.remove_accidental_hits}, logq_correction={self.logq_correction}, "
            f"sparse_grad={self.sparse_grad}"
        )

    def sample(self) -> Candidates:
        """Draw this step's negatives (CPU)."""
        return self.sampler.sample(self.num_sampled, self.generator)

    def sampled_logits(self, embedding: torch.Tensor, target: torch.Tensor, candidates: Candidates) -> torch.Tensor:
        """(N, 1 + K) logits: column 0 the true class, then the K sampled classes (TF's `_compute_sampled_logits`)."""
        sampled = candidates.ids.to(embedding.device)
        num_rows = target.shape[0]
        rows, row_bias = _gather_output_rows(torch.cat([target, sampled]), self.weight, self.bias, self.sparse_grad)
        true_bias, sampled_bias = row_bias[:num_rows], row_bias[num_rows:]
        true_shift, sampled_shift = self._log_q(target, candidates, true_bias)
        if true_shift is not None and sampled_shift is not None:
            true_bias = true_bias - true_shift
            sampled_bias = sampled_bias - sampled_shift
        true_logits = (embedding * rows[:num_rows]).sum(1, keepdim=True) + true_bias.unsqueeze(1)
        sampled_logits = torch.addmm(sampled_bias, embedding, rows[num_rows:].t())
        if self.remove_accidental_hits:
            hits = target.unsqueeze(1) == sampled.unsqueeze(0)
            sampled_logits = sampled_logits.masked_fill(hits, torch.finfo(sampled_logits.dtype).min)
        return torch.cat([true_logits, sampled_logits], dim=1)

    def forward(
        self, embedding: torch.Tensor, target: torch.Tensor, candidates: Candidates | None = None
    ) -> torch.Tensor:
        """Mean sampled-softmax loss; `candidates` fixes the negatives (default: draw new ones)."""
        if target.dtype != torch.int64 or target.shape != embedding.shape[:1]:
            raise ValueError(
                f"target must be int64 of shape ({embedding.shape[0]},), got {target.dtype} {tuple(target.shape)}"
            )
        candidates = self.sample() if candidates is None else candidates
        if torch.is_autocast_enabled(embedding.device.type):
            # Autocast's casting rules (bf16 matmul, fp32 softmax) need the op-by-op path.
            logits = self.sampled_logits(embedding, target, candidates)
            return F.cross_entropy(logits, torch.zeros_like(target))
        true_shift, sampled_shift = self._log_q(target, candidates, embedding)
        sampled = candidates.ids.to(embedding.device)
        return sampled_softmax_cross_entropy(
            embedding,
            self.weight,
            self.bias,
            target,
            sampled,
            true_shift,
            sampled_shift,
            self.remove_accidental_hits,
            self.sparse_grad,
        )

    def _log_q(
        self, target: torch.Tensor, candidates: Candidates, like: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """log expected counts of the true classes and of the sampled ones (None without logq_correction)."""
        if not self.logq_correction:
            return None, None
        true_count = self.sampler.expected_count(target, candidates.num_tries, self.num_sampled)
        return true_count.log().to(like), candidates.expected_count.log().to(like)

    def log_probs(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(F.linear(embedding, self.weight, self.bias), dim=1)

    def full_loss(self, embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(F.linear(embedding, self.weight, self.bias), target)
