"""Optimizers, including a sparse row-wise one for huge output layers.

Why row-wise: with C = 1,000,000 classes and H = 1280 the output weight alone is 5.1 GB of float32. Dense AdamW
would add a dense gradient (5.1 GB) and two moment buffers (10.2 GB) and touch all 20 GB every step, although a
sampled-softmax step only reads (batch + K) rows. So with `sparse_output=True` the sampled loss returns sparse
gradients holding just those rows, and the output layer is updated lazily, row by row:

- `RowWiseAdamW`: Adam without first moment and with ONE second-moment scalar per row (the mean of the squared
  row gradient, as FBGEMM's row-wise Adagrad does) plus a per-row step count for the bias correction:
  state is 2 * C floats (8 MB at C = 1M) instead of 2 * C * H. Touched rows only:
      v_r <- beta2 * v_r + (1 - beta2) * mean(g_r^2);  t_r <- t_r + 1
      w_r <- w_r * (1 - lr * weight_decay) - lr * g_r / (sqrt(v_r / (1 - beta2^t_r)) + eps)
  With H = 1 and every row touched each step this is exactly AdamW with betas = (0, beta2).
- `RowWiseSGD`: plain lazy SGD on touched rows (no momentum: a momentum buffer would be dense again).

Weight decay on the output rows is lazy too: a row decays only on steps that touch it. Everything else in the model
(heads, dense outputs) gets ordinary AdamW / SGD through the same optimizer object, so LR schedulers, `zero_grad`
and `state_dict()` / `load_state_dict()` work as usual; every state value is a plain tensor (safetensors-ready: the
checkpoint format in `prodcat.checkpoint` stores them). Note: gradient clipping utilities do not accept sparse
gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prodcat.model.losses import OutputLoss

__all__ = [
    "RowWiseAdamW",
    "RowWiseSGD",
    "build_optimizer",
]


def _touched_rows(param: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique row ids, their summed gradient rows) from a sparse gradient; a dense gradient touches every row."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1:  # e.g. dense.to_sparse(): make it row-sparse like an embedding gradient
            grad = grad.to_dense().to_sparse(sparse_dim=1)
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    return torch.arange(param.shape[0], device=param.device), grad


def _unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """The plain function behind a (bound) optimizer `step`: torch wraps each optimizer class's `step` once with its
    hook runner, and our own `step` has already run the hooks."""
    step = getattr(step, "__func__", step)
    while getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    return step


class _RowWiseMixin:
    """Param groups with `rowwise=True` are updated row by row from sparse gradients; the other groups by the
    parent optimizer (AdamW or SGD) unchanged."""

    param_groups: list[dict[str, Any]]
    state: dict[torch.Tensor, dict[str, Any]]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                if group.get("rowwise"):
                    for param in group["params"]:
                        if param.grad is not None:
                            self._row_update(param, param.grad, group)
        dense_groups = [group for group in self.param_groups if not group.get("rowwise")]
        if dense_groups:
            all_groups = self.param_groups
            self.param_groups = dense_groups  # the parent's step walks self.param_groups
            try:
                _unhooked(super().step)(self)  # type: ignore[misc]
            finally:
                self.param_groups = all_groups
        return loss

    def _row_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError


class RowWiseAdamW(_RowWiseMixin, torch.optim.AdamW):
    """AdamW for dense groups; row-wise Adam (one second moment per row, lazy) for groups with `rowwise=True`."""

    def _row_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        rows, values = _touched_rows(param, grad)
        state = self.state[param]
        if not state:
            # "step" (updates of this tensor) is kept because AdamW's load_state_dict expects it in every state.
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["row_sq"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
            state["row_step"] = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
        state["step"] += 1
        lr, beta2, eps, weight_decay = group["lr"], group["betas"][1], group["eps"], group["weight_decay"]
        flat = values.reshape(rows.numel(), -1).float()
        step = state["row_step"].index_select(0, rows).add_(1.0)
        state["row_step"].index_copy_(0, rows, step)
        row_sq = state["row_sq"].index_select(0, rows).mul_(beta2).add_(flat.square().mean(1), alpha=1.0 - beta2)
        state["row_sq"].index_copy_(0, rows, row_sq)
        bias_correction = 1.0 - torch.pow(beta2, step)
        denom = (row_sq / bias_correction).sqrt_().add_(eps).to(param.dtype)
        updated = param.index_select(0, rows)
        if weight_decay:
            updated.mul_(1.0 - lr * weight_decay)
        updated.addcdiv_(values.to(param.dtype), denom.view(-1, *([1] * (param.dim() - 1))), value=-lr)
        param.index_copy_(0, rows, updated)


class RowWiseSGD(_RowWiseMixin, torch.optim.SGD):
    """SGD for dense groups; lazy SGD without momentum on the touched rows of groups with `rowwise=True`."""

    def _row_update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        rows, values = _touched_rows(param, grad)
        lr, weight_decay = group["lr"], group["weight_decay"]
        updated = param.index_select(0, rows)
        if weight_decay:
            updated.mul_(1.0 - lr * weight_decay)
        updated.add_(values.to(param.dtype), alpha=-lr)
        param.index_copy_(0, rows, updated)


def _param_groups(model: nn.Module, weight_decay: float, rowwise: set[int]) -> list[dict[str, Any]]:
    """Decay / no-decay (biases, norms: ndim <= 1, as timm) groups, and the row-wise output weight / bias."""
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not name.endswith(".bias")
        buckets.setdefault((id(param) in rowwise, decay), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "rowwise": is_rowwise}
        for (is_rowwise, decay), params in sorted(buckets.items())
    ]


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    sparse_output: bool = False,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW or SGD over `model`; with `sparse_output`, the sampled loss's output layer gets sparse gradients and
    row-wise updates (see the module docstring). Sets `sparse_grad` on the model's sparse-capable losses."""
    if name not in ("adamw", "sgd"):
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")
    sparse_losses = [m for m in model.modules() if isinstance(m, OutputLoss) and m.supports_sparse]
    if sparse_output and not sparse_losses:
        raise ValueError("sparse_output needs an output loss with sparse rows (loss='sampled')")
    for loss in sparse_losses:
        loss.sparse_grad = sparse_output  # type: ignore[attr-defined]
    rowwise = {id(p) for loss in sparse_losses for p in loss.parameters()} if sparse_output else set()
    groups = _param_groups(model, weight_decay, rowwise)
    params = [p for group in groups for p in group["params"]]
    if name == "adamw":
        # One fused pass over each dense tensor (the unfused path makes ~8 passes and two full-size temporaries).
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return RowWiseAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    return RowWiseSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
