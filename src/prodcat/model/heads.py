"""Heads: map cached backbone features to an embedding. The dense output layer lives in the loss, not here.

Feature rows come from the feature store as (D,) pooled vectors or (h, w, C) channels-last spatial maps (float16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from prodcat.model._registry import Registry

__all__ = [
    "Head",
    "LinearHead",
    "MLPHead",
    "ConvHead",
    "GatedProductHead",
    "HierTrunk",
    "register_head",
    "create_head",
    "list_heads",
    "is_product_head",
    "is_hierarchical_head",
]

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


def is_product_head(head: nn.Module) -> bool:
    """Whether `head` reads a whole product (P, K, *row) plus a (P, K) mask, not one picture per row."""
    return bool(getattr(head, "reads_products", False))


def is_hierarchical_head(head: nn.Module) -> bool:
    """Whether `head` is the trunk of a per-taxonomy-level classifier (`build_classifier` adds the level outputs)."""
    return bool(getattr(head, "hierarchical", False))


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


class HierTrunk(MLPHead):
    """The `hier` head: an mlp trunk whose embedding feeds one output per taxonomy level (level 1, level 2, leaf);
    `build_classifier` puts it in a HierarchicalClassifier, which decodes the three consistently."""

    hierarchical = True


@register_head("hier")
def _hier(
    in_shape: tuple[int, ...],
    hidden_dim: int = 1024,
    dropout: float = 0.2,
    norm: str = "layer",
    activation: str = "relu",
) -> Head:
    return HierTrunk(in_shape, hidden_dim=hidden_dim, dropout=dropout, norm=norm, activation=activation)


@register_head("conv")
def _conv(in_shape: tuple[int, ...], hidden_dim: int = 256, num_layers: int = 2, dropout: float = 0.2) -> Head:
    return ConvHead(in_shape, hidden_dim=hidden_dim, num_layers=num_layers, dropout=dropout)


class GatedProductHead(Head):
    """One embedding per PRODUCT from its 1-4 pictures: a gate scores each picture (attention-based multiple-instance
    pooling, Ilse et al. 2018: w^T tanh(V x)), a softmax over the product's real pictures turns the scores into
    weights, and the product embedding is the weighted sum of the (pooled) picture features, then dropout.

    Input (P, K, *row) with a (P, K) bool mask (True = a real picture; padded slots are ignored exactly, whatever they
    hold). Permutation-invariant over a product's pictures by construction. A single picture gets weight 1, so
    (N, *row) rows without a mask are read as one-picture products: the same embedding as `linear` on that picture.
    """

    reads_products = True

    def __init__(self, in_shape: tuple[int, ...], gate_dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__(in_shape)
        if gate_dim < 1:
            raise ValueError(f"gate_dim must be >= 1, got {gate_dim}")
        self.out_dim = in_shape[-1]
        # No bias on the score: a softmax over the pictures cancels it.
        self.gate = nn.Sequential(nn.Linear(self.out_dim, gate_dim), nn.Tanh(), nn.Linear(gate_dim, 1, bias=False))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def picture_weights(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(P, K) softmax weights of each product's pictures (0 on padded slots)."""
        pictures, mask = self._pictures(features, mask)
        return self._weights(pictures, mask)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pictures, mask = self._pictures(features, mask)
        weights = self._weights(pictures, mask)
        return self.dropout(torch.einsum("pk,pkd->pd", weights, pictures))

    def _pictures(self, features: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, K, D) pooled picture features, padded slots zeroed (a NaN there must not reach the sum), and mask."""
        if features.dim() == len(self.in_shape) + 1:  # one picture per row
            features = features[:, None]
        if features.dim() != len(self.in_shape) + 2 or tuple(features.shape[2:]) != self.in_shape:
            raise ValueError(
                f"{type(self).__name__} expects rows of shape {self.in_shape} as (products, pictures, *row) or "
                f"(pictures, *row), got a batch of shape {tuple(features.shape)}"
            )
        products, slots = features.shape[:2]
        if mask is None:
            mask = torch.ones(products, slots, dtype=torch.bool, device=features.device)
        if tuple(mask.shape) != (products, slots):
            raise ValueError(f"mask must be ({products}, {slots}), got {tuple(mask.shape)}")
        mask = mask.to(device=features.device, dtype=torch.bool)
        if products and not bool(mask.any(dim=1).all()):
            raise ValueError("every product needs at least one picture (a mask row is all False)")
        flat = self._prepare(features.reshape(products * slots, *self.in_shape))
        pictures = _pool(flat).reshape(products, slots, -1)
        return torch.where(mask[..., None], pictures, torch.zeros((), dtype=pictures.dtype)), mask

    def _weights(self, pictures: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.gate(pictures).squeeze(-1).float()
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=1).to(pictures.dtype)


@register_head("gated_product")
def _gated_product(in_shape: tuple[int, ...], gate_dim: int = 128, dropout: float = 0.0) -> Head:
    return GatedProductHead(in_shape, gate_dim=gate_dim, dropout=dropout)
