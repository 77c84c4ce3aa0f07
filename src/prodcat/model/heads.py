"""Heads: map cached backbone features to an embedding. The dense output layer lives in the loss, not here.

Feature rows come from the feature store as (D,) pooled vectors or (h, w, C) channels-last spatial maps (float16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prodcat.model._registry import Registry

__all__ = ["Head", "LinearHead", "MLPHead", "ConvHead", "register_head", "create_head", "list_heads"]

_HEADS: Registry[Callable[..., Head]] = Registry("head")


def register_head(name: str) -> Callable[[Callable[..., Head]], Callable[..., Head]]:
    """Decorator: register a head factory `fn(in_shape, **kwargs) -> Head` under `name` (duplicates refused)."""
    return _HEADS.register(name)


def create_head(name: str, in_shape: tuple[int, ...], **kwargs: object) -> Head:
    """Build the head registered as `name` for feature rows of shape `in_shape`."""
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) not in (1, 3) or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (D,) or (h, w, C) with positive sizes, got {in_shape}")
    return _HEADS.get(name)(in_shape, **kwargs)


def list_heads() -> list[str]:
    return _HEADS.names()


class Head(nn.Module):
    """Base: checks the input shape, casts float16 store rows to the compute dtype; `out_dim` is the embedding size."""

    out_dim: int

    def __init__(self, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        if tuple(features.shape[1:]) != self.in_shape:
            raise ValueError(
                f"{type(self).__name__} expects rows of shape {self.in_shape}, "
                f"got a batch of shape {tuple(features.shape)}"
            )
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        # The store keeps float16; matmuls and norms want the parameters' dtype (autocast still applies on top).
        return features if features.dtype == dtype else features.to(dtype)


def _pool(features: torch.Tensor) -> torch.Tensor:
    """Global average pool over (h, w) of channels-last maps; pooled rows pass through."""
    return features.mean(dim=(1, 2)) if features.dim() == 4 else features


class LinearHead(Head):
    """Identity on pooled features (global average pool first for spatial ones), then dropout, as timm's
    `forward_head` does before its classifier; the linear layer itself is the output loss."""

    def __init__(self, in_shape: tuple[int, ...], dropout: float = 0.0) -> None:
        super().__init__(in_shape)
        self.out_dim = in_shape[-1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(_pool(self._prepare(features)))


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    raise ValueError(f"norm must be 'layer' or 'batch', got {kind!r}")


def _activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', got {kind!r}")


class MLPHead(Head):
    """Linear(D, hidden) + norm + activation + dropout (spatial features are average-pooled first)."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        hidden_dim: int = 1024,
        dropout: float = 0.2,
        norm: str = "layer",
        activation: str = "relu",
    ) -> None:
        super().__init__(in_shape)
        self.out_dim = int(hidden_dim)
        self.fc = nn.Linear(in_shape[-1], self.out_dim)
        self.norm = _norm(norm, self.out_dim)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.act(self.norm(self.fc(_pool(self._prepare(features))))))


class ConvHead(Head):
    """A few Conv2d(3x3) + BatchNorm + ReLU on the spatial map, global average pool, dropout.

    Pooled (D,) rows are accepted as 1x1 maps so the head can be compared on either store layout.
    """

    def __init__(
        self, in_shape: tuple[int, ...], hidden_dim: int = 256, num_layers: int = 2, dropout: float = 0.2
    ) -> None:
        super().__init__(in_shape)
        if num_layers < 1:
            raise ValueError("num_layers must be >= 1")
        layers: list[nn.Module] = []
        channels = in_shape[-1]
        for _ in range(num_layers):
            # No conv bias: BatchNorm's shift does that job.
            layers += [
                nn.Conv2d(channels, hidden_dim, 3, padding=1, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            channels = hidden_dim
        self.convs = nn.Sequential(*layers)
        self.out_dim = int(hidden_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self._prepare(features)
        x = x[:, None, None, :] if x.dim() == 2 else x
        x = self.convs(x.permute(0, 3, 1, 2))  # channels-last store rows -> NCHW for Conv2d
        return self.dropout(x.mean(dim=(2, 3)))


@register_head("linear")
def _linear(in_shape: tuple[int, ...], dropout: float = 0.0) -> Head:
    return LinearHead(in_shape, dropout=dropout)


@register_head("mlp")
def _mlp(
    in_shape: tuple[int, ...],
    hidden_dim: int = 1024,
    dropout: float = 0.2,
    norm: str = "layer",
    activation: str = "relu",
) -> Head:
    return MLPHead(in_shape, hidden_dim=hidden_dim, dropout=dropout, norm=norm, activation=activation)


@register_head("conv")
def _conv(in_shape: tuple[int, ...], hidden_dim: int = 256, num_layers: int = 2, dropout: float = 0.2) -> Head:
    return ConvHead(in_shape, hidden_dim=hidden_dim, num_layers=num_layers, dropout=dropout)
