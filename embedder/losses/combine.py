"""Which losses a batch uses and how they are added (reference 2.5 ``_compute_loss``, 2.6 and 8.3).

Activation (identical to the reference, per batch and task):
    - distillation is on when the batch has teacher scores and ``distill_weight > 0``;
    - the contrastive loss is on when ``contrastive_weight > 0``.

Combination, chosen by ``rule``:
    - ``"reference"`` reproduces LLM-Embedder: both on -> ``w_c * L_con + w_d * L_dis``; only one on -> that loss
      **unweighted** (so a weight acts only as an on/off switch unless both losses are on; reference 8.3 "a loss
      weight applies only when both losses are active"). In the paper's multi-task recipe no task combines the two
      losses, so there the weights are pure switches (reference 2.6).
    - ``"weighted"`` always multiplies each active loss by its weight, which is what most users expect from the
      name "weight" (e.g. ``contrastive_weight=0.2`` alone scales the loss, and so the effective learning rate).

In both rules no active loss is an error naming the task settings to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

RULES = ("reference", "weighted")


@dataclass
class LossWeights:
    """Per-task loss settings, the reference's ``TASK_CONFIG[...]["training"]`` keys with their CLI defaults.

    Args:
        contrastive_weight: weight of the InfoNCE loss; 0 turns it off.
        distill_weight: weight of the distillation loss; 0 turns it off (it is also off without teacher scores).
        teacher_temperature: teacher softmax temperature (KL and, unlike the reference, stable distillation).
        student_temperature: student softmax temperature (KL distillation only).
        stable_distill: use :class:`StableDistillLoss` (listwise, with in-batch negatives) instead of
            :class:`KLDistillLoss` (in-group KL).
    """

    contrastive_weight: float = 0.2
    distill_weight: float = 1.0
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    stable_distill: bool = False

    def __post_init__(self) -> None:
        if self.contrastive_weight < 0 or self.distill_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got contrastive_weight={self.contrastive_weight}, "
                             f"distill_weight={self.distill_weight}")
        if self.teacher_temperature <= 0 or self.student_temperature <= 0:
            raise ValueError(f"temperatures must be > 0, got teacher_temperature={self.teacher_temperature}, "
                             f"student_temperature={self.student_temperature}")


def active_losses(weights: LossWeights, has_teacher_scores: bool) -> tuple[bool, bool]:
    """Return ``(do_contrastive, do_distill)`` for a batch, exactly as the reference decides them."""
    do_contrastive = weights.contrastive_weight > 0
    do_distill = bool(has_teacher_scores) and weights.distill_weight > 0
    return do_contrastive, do_distill


def combine_losses(contrastive: Tensor | None, distill: Tensor | None, weights: LossWeights,
                   rule: str = "reference", task: str | None = None) -> Tensor:
    """Add the active losses (``None`` = inactive) following ``rule``; see the module docstring.

    ``task`` only makes the error message more precise.
    """
    if rule not in RULES:
        raise ValueError(f"unknown loss combination rule {rule!r}; expected one of {RULES}")
    if contrastive is None and distill is None:
        where = f"task {task!r}" if task else "this batch's task"
        raise ValueError(
            f"no loss is active for {where}: contrastive_weight={weights.contrastive_weight} and distillation is off "
            f"(distill_weight={weights.distill_weight}, or the records have no teacher_scores). Set the task's "
            "contrastive_weight > 0, or distill_weight > 0 with scored data (run score.py).")
    if rule == "reference" and (contrastive is None or distill is None):
        return contrastive if distill is None else distill  # a lone loss is NOT weighted (reference quirk)
    total = None
    if contrastive is not None:
        total = weights.contrastive_weight * contrastive
    if distill is not None:
        term = weights.distill_weight * distill
        total = term if total is None else total + term
    return total
