"""Losses as pure functions of embeddings: ``forward(q (B, d), k (B*G, d), teacher_scores (B, G) | None)``."""

from __future__ import annotations

from embedder.losses.combine import LossWeights, active_losses, combine_losses
from embedder.losses.contrastive import InfoNCELoss
from embedder.losses.distill import KLDistillLoss
from embedder.losses.stable_distill import StableDistillLoss

__all__ = [
    "InfoNCELoss",
    "KLDistillLoss",
    "StableDistillLoss",
    "LossWeights",
    "combine_losses",
    "active_losses",
]
