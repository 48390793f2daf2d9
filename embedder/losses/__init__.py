"""Losses as pure functions of embeddings: ``forward(q (B, d), k (B*G, d), teacher_scores (B, G) | None)``.

A record kind lists the losses it trains with (`record_kinds.<kind>.losses`, each a `_target_` naming a class here
or anywhere importable, with a `weight` and its own arguments). A loss class declares two class attributes that the
data pipeline reads: `uses_teacher_scores` (records of the kind must carry teacher_scores) and
`sorts_negatives_by_teacher` (each group's negatives are ordered by teacher score). Adding a loss: its module, and
its export below.
"""

from __future__ import annotations

from embedder.losses.combine import combine_losses
from embedder.losses.contrastive import InfoNCELoss
from embedder.losses.distill import KLDistillLoss
from embedder.losses.stable_distill import StableDistillLoss

__all__ = [
    "InfoNCELoss",
    "KLDistillLoss",
    "StableDistillLoss",
    "combine_losses",
]
