"""Optimizers, by name, including a row-wise one for huge output layers.

The name (`TrainConfig.optimizer`, `--optimizer`) alone decides the update rule, for every loss and head:

- `adamw` / `sgd`: the same dense rule on every parameter (AdamW; SGD with momentum), the output layers included,
  whatever the loss (the sampled loss then gets dense gradients).
- `rowwise_adamw` / `rowwise_sgd`: the output layers (every `OutputLoss` in the model: the leaf output, and the
  level outputs of the hier head) are updated row by row as below; everything else gets AdamW / SGD. With the sampled
  loss their gradients are sparse (only the batch's true and sampled rows), which is what makes 1 M classes fit;
  with softmax or adaptive every row has a gradient each step and every row is updated.

Why row-wise: with C = 1,000,000 classes and H = 1280 the output weight alone is 5.1 GB of float32. Dense AdamW
would add a dense gradient (5.1 GB) and two moment buffers (10.2 GB) and touch all 20 GB every step, although a
sampled-softmax step only reads (batch + K) rows. The row-wise rule keeps state for rows, not elements:

- `RowWiseAdamW`: Adam without first moment and with ONE second-moment scalar per row (the mean of the squared
  row gradient, as FBGEMM's row-wise Adagrad does) plus a per-row step count for the bias correction:
  state is 2 * C floats (8 MB at C = 1M) instead of 2 * C * H. Touched rows only:
      v_r <- beta2 * v_r + (1 - beta2) * mean(g_r^2);  t_r <- t_r + 1
      w_r <- w_r * (1 - lr * weight_decay) - lr * g_r / (sqrt(v_r / (1 - beta2^t_r)) + eps)
  With H = 1 and every row touched each step this is exactly AdamW with betas = (0, beta2). It is a different
  optimizer from AdamW, not an implementation detail: compare them as a factor (`prodcat compare --optimizers`).
- `RowWiseSGD`: plain lazy SGD on touched rows (no momentum: a momentum buffer would be dense again).

A row is touched when the sparse gradient holds it; a dense gradient touches every row, except for the parameters in
`optimizer.skip_zero_rows` (the sampled loss under DDP, which cannot all-reduce sparse gradients): there a row whose
gradient is exactly zero was not sampled and is left alone, so the update is the one a single process makes.
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

from prodcat.model._registry import Registry
from prodcat.model.losses import OutputLoss

__all__ = [
    "RowWiseAdamW",
    "RowWiseSGD",
    "build_optimizer",
    "register_optimizer",
    "list_optimizers",
    "rowwise_output",
]


def _touched_rows(
    param: torch.Tensor, grad: torch.Tensor, skip_zero_rows: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique row ids, their summed gradient rows) from a sparse gradient; a dense gradient touches every row, or
    with `skip_zero_rows` every row with a nonzero gradient (a dense stand-in for a sparse one)."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1:  # e.g. dense.to_sparse(): make it row-sparse like an embedding gradient
            grad = grad.to_dense().to_sparse(sparse_dim=1)
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    if skip_zero_rows:
        rows = grad.reshape(grad.shape[0], -1).ne(0).any(dim=1).nonzero().squeeze(1)
        return rows, grad.index_select(0, rows)
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
    skip_zero_rows: frozenset[int] = frozenset()  # ids of params whose dense gradient stands in for a sparse one

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
        rows, values = _touched_rows(param, grad, id(param) in self.skip_zero_rows)
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
        rows, values = _touched_rows(param, grad, id(param) in self.skip_zero_rows)
        lr, weight_decay = group["lr"], group["weight_decay"]
        updated = param.index_select(0, rows)
        if weight_decay:
            updated.mul_(1.0 - lr * weight_decay)
        updated.add_(values.to(param.dtype), alpha=-lr)
        param.index_copy_(0, rows, updated)


# -- the registry: one name, one update rule ----------------------------------------------------------------------
OptimizerFactory = Callable[..., torch.optim.Optimizer]
_OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")
_ROWWISE: dict[str, bool] = {}


def register_optimizer(name: str, *, rowwise_output: bool) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: register `fn(groups, lr, weight_decay, momentum, betas, eps) -> Optimizer` as `name`;
    `rowwise_output` says whether the output layers get row-wise updates (duplicates refused)."""

    def decorator(factory: OptimizerFactory) -> OptimizerFactory:
        _OPTIMIZERS.register(name)(factory)
        _ROWWISE[name] = rowwise_output
        return factory

    return decorator


def list_optimizers() -> list[str]:
    return _OPTIMIZERS.names()


def rowwise_output(name: str) -> bool:
    """Whether optimizer `name` updates the output layers row by row (ValueError for an unknown name)."""
    _OPTIMIZERS.get(name)
    return _ROWWISE[name]


def _adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float, **adam: Any) -> Any:
    # One fused pass over each dense tensor (the unfused path makes ~8 passes and two full-size temporaries).
    params = [p for group in groups for p in group["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return RowWiseAdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None, **adam)


def _sgd(groups: list[dict[str, Any]], lr: float, weight_decay: float, momentum: float, **adam: Any) -> Any:
    return RowWiseSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


# The row-wise classes with no row-wise group are exactly torch's AdamW / SGD (their step hands every group over).
register_optimizer("adamw", rowwise_output=False)(_adamw)
register_optimizer("sgd", rowwise_output=False)(_sgd)
register_optimizer("rowwise_adamw", rowwise_output=True)(_adamw)
register_optimizer("rowwise_sgd", rowwise_output=True)(_sgd)


def _param_groups(model: nn.Module, weight_decay: float, rowwise: set[int]) -> list[dict[str, Any]]:
    """Decay / no-decay (biases, norms: ndim <= 1, as timm) groups, and the row-wise output weights / biases."""
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
    *,
    sparse_grad: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer registered as `name` over `model` (see the module docstring for what each name means).

    Sets `sparse_grad` on the model's sparse-capable losses: True exactly when `name` is row-wise and `sparse_grad`
    allows it; pass `sparse_grad=False` where sparse gradients cannot be used (DDP): the update rule stays the same.
    """
    factory, rowwise = _OPTIMIZERS.get(name), rowwise_output(name)
    outputs = [m for m in model.modules() if isinstance(m, OutputLoss)]
    for loss in outputs:
        if loss.supports_sparse:
            loss.sparse_grad = rowwise and sparse_grad  # type: ignore[attr-defined]
    rowwise_ids = {id(p) for loss in outputs for p in loss.parameters()} if rowwise else set()
    groups = _param_groups(model, weight_decay, rowwise_ids)
    optimizer = factory(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps)
    if rowwise and not sparse_grad:
        # A property of this session (not saved with the state): resuming with or without DDP keeps the rule.
        sparse_capable = [p for loss in outputs if loss.supports_sparse for p in loss.parameters()]
        optimizer.skip_zero_rows = frozenset(id(p) for p in sparse_capable)
    return optimizer
