"""Fused linear + cross-entropy for the full softmax: one (N, C) buffer, reused as the gradient.

`F.cross_entropy(F.linear(x, W, b), y)` keeps the logits, writes log-softmax into a second (N, C) tensor and builds
a third in backward; at C = 500,000 and N = 1024 each is 2 GB of memory traffic. Here the logits are computed by
one matmul, turned into the gradient (softmax - one-hot) / N in place, row block by row block so each block is still
in cache, and saved; backward is just the two matmuls. Only the small (N, D) / scalar factors are scaled by the
incoming gradient, never the big tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["linear_cross_entropy", "sampled_softmax_cross_entropy"]

# Elements per row block of the in-place softmax pass (~1 MB of float32: stays in L2).
_BLOCK_ELEMENTS = 1 << 18


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        embedding: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target: torch.Tensor,
        label_smoothing: float,
    ) -> torch.Tensor:
        logits = torch.mm(embedding, weight.t())
        rows, num_classes = logits.shape
        losses = torch.empty(rows, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        # Row blocks keep the elementwise passes in CPU cache; a GPU gains nothing from them but kernel launches.
        block = rows if logits.is_cuda else max(1, _BLOCK_ELEMENTS // num_classes)
        for start in range(0, rows, block):
            stop = min(rows, start + block)
            losses[start:stop] = _softmax_grad_block(
                logits[start:stop], bias, target[start:stop], label_smoothing, rows
            )
        ctx.save_for_backward(logits, embedding, weight)
        ctx.has_bias = bias is not None
        return losses.mean()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        grad_logits, embedding, weight = ctx.saved_tensors
        grad_embedding = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_embedding = torch.mm(grad_logits, weight).mul_(grad_output)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad_logits.t(), embedding * grad_output)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.sum(0).mul_(grad_output)
        return grad_embedding, grad_weight, grad_bias, None, None


def _softmax_grad_block(
    block: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, label_smoothing: float, rows: int
) -> torch.Tensor:
    """Turn a block of logits into d(mean loss)/d(logits) in place; return the block's per-row losses."""
    dtype = torch.promote_types(block.dtype, torch.float32)  # reductions at least in float32
    if bias is not None:
        block.add_(bias)
    target = target.unsqueeze(1)
    target_logit = block.gather(1, target).squeeze(1).to(dtype)
    mean_logit = block.mean(1, dtype=dtype) if label_smoothing else None
    row_max = block.amax(1, keepdim=True)
    block.sub_(row_max).exp_()
    row_sum = block.sum(1, keepdim=True, dtype=dtype)
    log_sum_exp = (row_max.to(dtype) + row_sum.log()).squeeze(1)
    block.mul_((1.0 / rows) / row_sum)
    block.scatter_add_(1, target, torch.full_like(target, -(1.0 - label_smoothing) / rows, dtype=block.dtype))
    loss = log_sum_exp - target_logit
    if label_smoothing:
        block.sub_(label_smoothing / (rows * block.shape[1]))
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_sum_exp - mean_logit)
    return loss


def linear_cross_entropy(
    embedding: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of `embedding @ weight.T + bias` against `target`; same value and gradients as
    `F.cross_entropy(F.linear(...), target, label_smoothing=...)` with less memory traffic."""
    fused = torch.is_grad_enabled() and not torch.is_autocast_enabled(embedding.device.type)
    if not fused or embedding.dim() != 2:
        # Autocast wants its own casting rules (bf16 matmul, fp32 softmax); no-grad has nothing to save.
        logits = F.linear(embedding, weight, bias)
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if target.dtype != torch.int64 or target.shape != embedding.shape[:1]:
        raise ValueError(
            f"target must be int64 of shape ({embedding.shape[0]},), got {target.dtype} {tuple(target.shape)}"
        )
    return _LinearCrossEntropy.apply(embedding, weight, bias, target, float(label_smoothing))


class _SampledSoftmax(torch.autograd.Function):
    """TF's sampled softmax loss (mean over rows) in one pass over a single (N, K) buffer.

    Forward gathers the true and sampled rows, writes the sampled logits with one addmm, and turns them in place
    into d(loss)/d(logits); the true logit's gradient is an (N,) vector. Backward is two matmuls plus row-scaled
    copies, written straight into the (N + K, H) gradient rows, returned sparse or scattered into a dense gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        embedding: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        target: torch.Tensor,
        sampled: torch.Tensor,
        true_shift: torch.Tensor | None,
        sampled_shift: torch.Tensor | None,
        remove_accidental_hits: bool,
        sparse: bool,
    ) -> torch.Tensor:
        rows_count = target.shape[0]
        ids = torch.cat([target, sampled])
        rows = weight.index_select(0, ids)
        row_bias = bias.index_select(0, ids)
        true_rows, sampled_rows = rows[:rows_count], rows[rows_count:]
        true_logit = torch.einsum("nd,nd->n", embedding, true_rows) + row_bias[:rows_count]
        sampled_bias = row_bias[rows_count:]
        if true_shift is not None:
            true_logit = true_logit - true_shift
        if sampled_shift is not None:
            sampled_bias = sampled_bias - sampled_shift
        logits = torch.addmm(sampled_bias, embedding, sampled_rows.t())
        if remove_accidental_hits:
            hits = target.unsqueeze(1) == sampled.unsqueeze(0)
            logits.masked_fill_(hits, torch.finfo(logits.dtype).min)  # TF adds -FLOAT_MAX: exp() gives 0
        row_max = torch.maximum(logits.amax(1), true_logit)
        logits.sub_(row_max.unsqueeze(1)).exp_()
        true_exp = (true_logit - row_max).exp()
        row_sum = logits.sum(1) + true_exp
        loss = (row_max + row_sum.log() - true_logit).mean()
        scale = 1.0 / (rows_count * row_sum)
        logits.mul_(scale.unsqueeze(1))  # softmax / N
        true_grad = true_exp * scale - 1.0 / rows_count
        ctx.save_for_backward(logits, true_grad, embedding, rows, ids)
        ctx.weight_shape, ctx.bias_shape, ctx.sparse = weight.shape, bias.shape, sparse
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):  # type: ignore[override]
        grad_logits, true_grad, embedding, rows, ids = ctx.saved_tensors
        rows_count = true_grad.shape[0]
        true_rows, sampled_rows = rows[:rows_count], rows[rows_count:]
        grad_embedding = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_embedding = torch.addmm(true_rows * true_grad.unsqueeze(1), grad_logits, sampled_rows)
            grad_embedding.mul_(grad_output)
        if ctx.needs_input_grad[1]:
            scaled_embedding = embedding * grad_output
            grad_rows = torch.empty_like(rows)
            torch.mul(scaled_embedding, true_grad.unsqueeze(1), out=grad_rows[:rows_count])
            torch.mm(grad_logits.t(), scaled_embedding, out=grad_rows[rows_count:])
            grad_weight = _row_gradient(ids, grad_rows, ctx.weight_shape, ctx.sparse)
        if ctx.needs_input_grad[2]:
            grad_row_bias = torch.cat([true_grad, grad_logits.sum(0)]).mul_(grad_output)
            grad_bias = _row_gradient(ids, grad_row_bias, ctx.bias_shape, ctx.sparse)
        return grad_embedding, grad_weight, grad_bias, None, None, None, None, None, None


def _row_gradient(ids: torch.Tensor, values: torch.Tensor, shape: torch.Size, sparse: bool) -> torch.Tensor:
    if sparse:  # repeated ids are summed when the optimizer coalesces
        return torch.sparse_coo_tensor(ids.unsqueeze(0), values, shape, check_invariants=False, is_coalesced=False)
    return values.new_zeros(shape).index_add_(0, ids, values)


def sampled_softmax_cross_entropy(
    embedding: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    sampled: torch.Tensor,
    true_shift: torch.Tensor | None,
    sampled_shift: torch.Tensor | None,
    remove_accidental_hits: bool,
    sparse: bool,
) -> torch.Tensor:
    """Mean sampled-softmax loss; logits true = e.w_t + b_t - true_shift, sampled = e.w_s + b_s - sampled_shift.

    The weight / bias gradients hold only the rows of `target` and `sampled`, as sparse COO tensors if `sparse`.
    """
    return _SampledSoftmax.apply(
        embedding, weight, bias, target, sampled, true_shift, sampled_shift, remove_accidental_hits, sparse
    )
