"""In-group KL distillation from teacher scores (reference 2.5(2), the non-stable path)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from embedder.losses.contrastive import _fp32, _group_size, _in_group_scores


def _check_teacher(teacher_scores: Tensor | None, batch: int, group_size: int, loss_name: str) -> Tensor:
    """Fail early and clearly when the teacher scores are missing or do not match the ``(B, G)`` key layout."""
    if teacher_scores is None:
        raise ValueError(
            f"{loss_name} needs teacher_scores of shape (B, G) but got None: the task enables distillation but its "
            "records have no teacher_scores; set the task's distill_weight to 0 (contrastive only) or run score.py")
    if tuple(teacher_scores.shape) != (batch, group_size):
        raise ValueError(f"{loss_name}: teacher_scores has shape {tuple(teacher_scores.shape)}, expected (B, G) = "
                         f"({batch}, {group_size})")
    return teacher_scores


class KLDistillLoss(nn.Module):
    """KL(teacher || student) over each query's own group of G keys, with no in-batch negatives.

    The student distribution is ``softmax(q_b . K_b^T / temperature / student_temperature)`` over query b's G keys,
    the teacher distribution ``softmax(t_b / teacher_temperature)``. The loss is ``KL(Q || P)`` averaged over the
    queries (``batchmean``). Cross-device gathering is pointless here (only own keys are scored), so there is no
    such option. Used by the reference for chat and lrlm (``teacher_temperature=0.1``).

    Args:
        temperature: similarity temperature, ``q @ k.T / temperature`` (0.01 for cos, 1.0 for ip).
        teacher_temperature: divides the teacher scores before their softmax (reference default 1.0).
        student_temperature: divides the (already temperature-scaled) student scores before log_softmax.

    Inputs:
        +-----------------+----------+---------------------------------------------------------------+
        | name            | shape    | meaning                                                       |
        +=================+==========+===============================================================+
        | q               | (B, d)   | local query embeddings                                        |
        | k               | (B*G, d) | local key embeddings, query b's group at rows b*G..b*G+G-1     |
        | teacher_scores  | (B, G)   | teacher scores (e.g. LM log-likelihoods) in the same key order |
        | return          | ()       | batchmean KL(Q || P) over the B local queries                  |
        +-----------------+----------+---------------------------------------------------------------+

    Raises:
        ValueError: when ``teacher_scores`` is None or not ``(B, G)``.

    Reference:
        Zhang et al., "Retrieve Anything To Augment Large Language Models" (LLM-Embedder), 2023, eq. for reward
        distillation; Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.

    Example:
        >>> import torch
        >>> q, k = torch.eye(1, 2), torch.eye(2)  # B=1, G=2: student scores [1, 0]
        >>> loss = KLDistillLoss(temperature=1.0)(q, k, teacher_scores=torch.tensor([[1.0, 0.0]]))
        >>> abs(loss.item()) < 1e-6  # teacher and student agree
        True
    """

    uses_teacher_scores = True  # every record of a kind with this loss must carry teacher_scores
    sorts_negatives_by_teacher = False

    def __init__(self, temperature: float = 0.01, teacher_temperature: float = 1.0, student_temperature: float = 1.0):
        super().__init__()
        for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature),
                            ("student_temperature", student_temperature)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.student_temperature = float(student_temperature)

    def forward(self, q: Tensor, k: Tensor, teacher_scores: Tensor | None = None) -> Tensor:
        group_size = _group_size(q, k)
        teacher = _check_teacher(teacher_scores, q.size(0), group_size, type(self).__name__)  # (B, G)
        scores = _fp32(_in_group_scores(q, k, group_size)) / self.temperature  # (B, G)
        log_p = F.log_softmax(scores / self.student_temperature, dim=-1)  # (B, G) student log-probs
        log_q = F.log_softmax(_fp32(teacher) / self.teacher_temperature, dim=-1)  # (B, G) teacher log-probs
        # log_target avoids 0 * log 0 = nan when a teacher probability underflows to zero.
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
                f"student_temperature={self.student_temperature}")
