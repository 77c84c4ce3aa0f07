"""Heads and losses trained on cached features, with their registries.

Importing the package registers every head (`linear`, `mlp`, `conv`, `hier`, `gated_product`), loss (`softmax`,
`sampled`, `adaptive`), sampler (`uniform`, `log_uniform`, `unigram`) and optimizer (`adamw`, `sgd`, `rowwise_adamw`,
`rowwise_sgd`).
"""

from prodcat.model.classifier import HIER_HEAD, Classifier, HierarchicalClassifier, build_classifier
from prodcat.model.heads import Head, create_head, is_hierarchical_head, is_product_head, list_heads, register_head
from prodcat.model.losses import OutputLoss, create_loss, list_losses, register_loss
from prodcat.model.optim import (
    RowWiseAdamW,
    RowWiseSGD,
    build_optimizer,
    list_optimizers,
    register_optimizer,
    rowwise_output,
)
from prodcat.model.sampled import SampledSoftmaxLoss
from prodcat.model.samplers import create_sampler, list_samplers, register_sampler

__all__ = [
    "HIER_HEAD",
    "Classifier",
    "HierarchicalClassifier",
    "build_classifier",
    "Head",
    "create_head",
    "is_product_head",
    "is_hierarchical_head",
    "list_heads",
    "register_head",
    "OutputLoss",
    "create_loss",
    "list_losses",
    "register_loss",
    "SampledSoftmaxLoss",
    "create_sampler",
    "list_samplers",
    "register_sampler",
    "RowWiseAdamW",
    "RowWiseSGD",
    "build_optimizer",
    "register_optimizer",
    "list_optimizers",
    "rowwise_output",
]
