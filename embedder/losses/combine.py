"""How the losses a record kind lists are added (reference 2.5 ``_compute_loss``, 2.6 and 8.3).

A record kind lists its losses with weights (`record_kinds.<kind>.losses`). Per batch, a loss that needs teacher
scores is active only when the batch has them; every other listed loss is active. The active ones are added by
``rule``:

- ``"reference"`` reproduces LLM-Embedder: several active losses -> ``sum_i w_i * L_i``; a single active loss is
  used **unweighted** (a weight acts only as an on/off switch unless two losses are on; reference 8.3 "a loss
  weight applies only when both losses are active"). In the paper's multi-task recipe no kind combines two losses,
  so there the weights are pure switches (reference 2.6).
- ``"weighted"`` always multiplies each active loss by its weight, which is what most users expect from the name
  "weight" (e.g. a contrastive weight of 0.2 alone scales the loss, and so the effective learning rate).

No active loss is an error naming the kind's settings to change.
"""

from __future__ import annotations

from torch import Tensor

RULES = ("reference", "weighted")


def combine_losses(terms: list[tuple[float, Tensor]], rule: str = "reference", task: str | None = None) -> Tensor:
    """Add the active losses, each a ``(weight, loss ())`` pair, following ``rule`` (see the module docstring).

    ``task`` (the batch's record kind) only makes the error message more precise.
    """
    if rule not in RULES:
        raise ValueError(f"unknown loss combination rule {rule!r}; expected one of {RULES}")
    if not terms:
        where = f"record kind {task!r}" if task else "this batch's record kind"
        raise ValueError(
            f"no loss is active for {where}: it lists no loss with weight > 0, or only distillation losses and the "
            f"records have no teacher_scores. List a contrastive loss (record_kinds.{task or '<kind>'}.losses), or "
            "score the data with score.py.")
    if rule == "reference" and len(terms) == 1:
        return terms[0][1]  # a lone loss is NOT weighted (reference quirk)
    total = terms[0][0] * terms[0][1]
    for weight, loss in terms[1:]:
        total = total + weight * loss
    return total
