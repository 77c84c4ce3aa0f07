"""The classifier that training, evaluation and the predictor share: a head plus an output loss.

`forward(features)` is always the full (N, C) log-softmax over leaf categories, whatever loss trains the model;
`loss(features, targets)` is the training objective; `level_log_probs(features)` adds the two upper taxonomy levels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prodcat.model.heads import _HEADS, Head, create_head, is_hierarchical_head, is_product_head
from prodcat.model.losses import _LOSSES, OutputLoss, SoftmaxLoss, create_loss

__all__ = ["Classifier", "HierarchicalClassifier", "build_classifier", "group_log_probs", "HIER_HEAD"]

HIER_HEAD = "hier"  # the registered head whose mlp trunk gets one output per taxonomy level (HierarchicalClassifier)


def group_log_probs(log_probs: torch.Tensor, parent: torch.Tensor, num_parents: int) -> torch.Tensor:
    """log sum_{leaf in parent} p(leaf): (N, C) leaf log-probs -> (N, num_parents), computed stably."""
    shift = log_probs.amax(dim=1, keepdim=True).detach()
    probs = (log_probs - shift).exp()
    sums = probs.new_zeros(probs.shape[0], num_parents).index_add_(1, parent, probs)
    return sums.log() + shift


def _level_map(values: Any, num_classes: int, name: str) -> torch.Tensor | None:
    if values is None:
        return None
    array = np.asarray(values)
    if array.shape != (num_classes,) or not np.issubdtype(array.dtype, np.integer) or (array < 0).any():
        raise ValueError(
            f"{name} must be {num_classes} non-negative ints (one parent per leaf), "
            f"got shape {array.shape} dtype {array.dtype}"
        )
    return torch.as_tensor(array, dtype=torch.int64)


class Classifier(nn.Module):
    """head -> embedding -> output loss. Optional leaf -> level-1 / level-2 maps give taxonomy-level scores."""

    def __init__(self, head: Head, output: OutputLoss, leaf_level1: Any = None, leaf_level2: Any = None) -> None:
        super().__init__()
        self.head = head
        self.output = output
        # Non-persistent: the taxonomy is saved with the data, state_dict keeps only learned weights.
        self.register_buffer("leaf_level1", _level_map(leaf_level1, output.num_classes, "leaf_level1"), False)
        self.register_buffer("leaf_level2", _level_map(leaf_level2, output.num_classes, "leaf_level2"), False)

    @property
    def num_classes(self) -> int:
        return self.output.num_classes

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full (N, C) log-probabilities over leaf categories. A product head reads (P, K, *row) features with a
        (P, K) picture mask and answers (P, C); given plain rows it reads each as a one-picture product."""
        return self.output.log_probs(self._embed(features, mask))

    def loss(self, features: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean training loss; `targets["leaf"]` holds the (N,) leaf class ids (and `targets["mask"]` the picture
        mask of a product batch)."""
        return self.output(self._embed(features, targets.get("mask")), targets["leaf"])

    @property
    def reads_products(self) -> bool:
        return is_product_head(self.head)

    def _embed(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return self.head(features)
        if not self.reads_products:
            raise ValueError(f"a picture mask was given, but the {type(self.head).__name__} reads single pictures")
        return self.head(features, mask)

    def level_log_probs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"leaf", "level1", "level2"} log-probs; upper levels sum leaf probabilities per parent (and are left out
        when the classifier was built without the maps)."""
        return self._with_levels(self(features))

    def _with_levels(self, leaf: torch.Tensor) -> dict[str, torch.Tensor]:
        levels = {"leaf": leaf}
        for name in ("level1", "level2"):
            parent = getattr(self, f"leaf_{name}")
            if parent is not None:
                levels[name] = group_log_probs(leaf, parent, int(parent.max()) + 1)
        return levels


class HierarchicalClassifier(Classifier):
    """Shared trunk with three outputs (level 1, level 2, leaf); trained on a weighted sum of their losses.

    Decoding is hierarchy-consistent: score(leaf) = log p(leaf) + log p(level2(leaf)) + log p(level1(leaf)),
    renormalised with a log-softmax over leaves, so a leaf only ranks high when its parents do too.
    """

    def __init__(
        self,
        trunk: Head,
        output: OutputLoss,
        leaf_level1: Any,
        leaf_level2: Any,
        hier_weights: tuple[float, float, float] = (0.25, 0.25, 1.0),
        label_smoothing: float = 0.0,
    ) -> None:
        if leaf_level1 is None or leaf_level2 is None:
            raise ValueError("the hier head needs leaf_level1 and leaf_level2 (parent of each leaf)")
        super().__init__(trunk, output, leaf_level1, leaf_level2)
        if len(hier_weights) != 3:
            raise ValueError("hier_weights needs three values (level1, level2, leaf)")
        self.hier_weights = tuple(float(w) for w in hier_weights)
        num_level1, num_level2 = int(self.leaf_level1.max()) + 1, int(self.leaf_level2.max()) + 1
        self.level1_output = SoftmaxLoss(trunk.out_dim, max(num_level1, 2), label_smoothing=label_smoothing)
        self.level2_output = SoftmaxLoss(trunk.out_dim, max(num_level2, 2), label_smoothing=label_smoothing)

    def head_log_probs(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each output's own log-probs, before hierarchical decoding."""
        embedding = self.head(features)
        return {
            "leaf": self.output.log_probs(embedding),
            "level1": self.level1_output.log_probs(embedding),
            "level2": self.level2_output.log_probs(embedding),
        }

    def decode(self, leaf: torch.Tensor, level1: torch.Tensor, level2: torch.Tensor) -> torch.Tensor:
        score = leaf + level1[:, self.leaf_level1] + level2[:, self.leaf_level2]
        return F.log_softmax(score, dim=1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("the hier classifier reads single pictures, not products with a picture mask")
        raw = self.head_log_probs(features)
        return self.decode(raw["leaf"], raw["level1"], raw["level2"])

    def loss(self, features: torch.Tensor, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of level-1, level-2 and leaf losses; missing level targets are derived from the leaf."""
        leaf = targets["leaf"]
        level1 = targets.get("level1", self.leaf_level1[leaf])
        level2 = targets.get("level2", self.leaf_level2[leaf])
        embedding = self.head(features)
        w1, w2, w_leaf = self.hier_weights
        return (
            w1 * self.level1_output(embedding, level1)
            + w2 * self.level2_output(embedding, level2)
            + w_leaf * self.output(embedding, leaf)
        )


def _accepted(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of `kwargs` that `factory` takes: build_classifier passes one flat set of options to any head/loss."""
    parameters = inspect.signature(factory).parameters
    return {key: value for key, value in kwargs.items() if key in parameters}


def build_classifier(
    head: str,
    loss: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden_dim: int = 1024,
    dropout: float = 0.2,
    num_sampled: int = 256,
    sampler: str = "log_uniform",
    class_counts: Any = None,
    prior_counts: Any = None,
    unigram_alpha: float = 0.75,
    with_replacement: bool = False,
    remove_accidental_hits: bool = True,
    logq_correction: bool = True,
    label_smoothing: float = 0.0,
    leaf_level1: Any = None,
    leaf_level2: Any = None,
    hier_weights: tuple[float, float, float] = (0.25, 0.25, 1.0),
) -> Classifier:
    """Head `head` (a registered head) + loss `loss` for feature rows of shape `in_shape`; a hierarchical head
    ("hier") becomes a HierarchicalClassifier with one output per taxonomy level.

    Each option goes to the head or loss that takes it (hidden_dim/dropout to heads, num_sampled/sampler/... to the
    sampled loss, label_smoothing to softmax); the others are ignored. `prior_counts` (the balanced softmax's
    train-split counts) defaults to `class_counts`.
    """
    head_kwargs = {"hidden_dim": hidden_dim, "dropout": dropout}
    loss_kwargs = {
        "num_sampled": num_sampled,
        "sampler": sampler,
        "class_counts": class_counts,
        "prior_counts": class_counts if prior_counts is None else prior_counts,
        "unigram_alpha": unigram_alpha,
        "with_replacement": with_replacement,
        "remove_accidental_hits": remove_accidental_hits,
        "logq_correction": logq_correction,
        "label_smoothing": label_smoothing,
    }
    trunk = create_head(head, in_shape, **_accepted(_HEADS.get(head), head_kwargs))
    output = create_loss(loss, trunk.out_dim, num_classes, **_accepted(_LOSSES.get(loss), loss_kwargs))
    if is_hierarchical_head(trunk):
        return HierarchicalClassifier(
            trunk, output, leaf_level1, leaf_level2, hier_weights, label_smoothing=label_smoothing
        )
    return Classifier(trunk, output, leaf_level1, leaf_level2)
