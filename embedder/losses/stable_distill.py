"""Listwise "stable" distillation (reference 2.5(1)), vectorised over the group.

The reference loops over the group: for own-key rank i it adds ``finfo.min`` to the query's own keys ``0..i-1`` and
takes a cross-entropy with target ``b*G + i`` against ALL keys of the (gathered) batch. Written out,

    CE_{b,i} = -S_{b,bG+i} + log( sum_{j >= i} exp S_{b,bG+j}  +  sum_{c not own} exp S_{b,c} )

The first sum is a reverse cumulative logsumexp over the own scores (``logcumsumexp`` of the flipped row), the
second does not depend on i, so both are computed once and merged with ``logaddexp``: no Python loop, no
``(G, B, B'*G)`` mask tensor, and no ``finfo.min`` arithmetic, which is fragile in fp16/bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedder.losses.contrastive import _fp32, _group_size, _keys_and_offset
from embedder.losses.distill import _check_teacher


class StableDistillLoss(nn.Module):
    """Plackett-Luce (ListMLE-style) distillation weighted by the teacher, with in-batch and cross-device negatives.

    For each local query b and each own key i (in the data's order: positive first, then the negatives, which the
    data pipeline sorts by teacher score), the student must pick key i out of the keys "not yet picked": own keys
    ``i..G-1`` plus every other query's keys in the (gathered) batch. Each rank's cross-entropy is weighted by the
    teacher probability ``p_{b,i} = softmax(t_b / teacher_temperature)_i``:

        L = sum_i mean_b p_{b,i} * CE_{b,i}

    The reference (``modeling_dense.py`` L240-268) ignores ``teacher_temperature`` here (reference 8.3); we apply
    it, and the default 1.0 reproduces the reference exactly. The reference computes the loss over the gathered
    queries on every rank; we compute it over the local queries against all gathered keys, which after DDP's
    gradient averaging is the same objective (see :mod:`embedder.distributed`). fp16/bf16 scores are upcast to
    float32 before any exponentiation.

    Args:
        temperature: similarity temperature, ``S = q @ K_all.T / temperature`` (0.01 for cos, 1.0 for ip).
        teacher_temperature: divides the teacher scores before their softmax.
        cross_device: gather the keys of all ranks (autograd-aware) as extra negatives; the own-group columns are
            offset by ``rank * B``. Identity outside a process group.

    Inputs:
        +-----------------+----------+----------------------------------------------------------------+
        | name            | shape    | meaning                                                        |
        +=================+==========+================================================================+
        | q               | (B, d)   | local query embeddings                                         |
        | k               | (B*G, d) | local key embeddings, query b's group at rows b*G..b*G+G-1      |
        | teacher_scores  | (B, G)   | teacher scores in the same key order                           |
        | return          | ()       | sum over ranks i of the p-weighted mean cross-entropy           |
        +-----------------+----------+----------------------------------------------------------------+

    Raises:
        ValueError: when ``teacher_scores`` is None or not ``(B, G)``.

    Reference:
        Zhang et al., "Retrieve Anything To Augment Large Language Models" (LLM-Embedder), 2023, "stabilized
        distillation"; Xia et al., "Listwise Approach to Learning to Rank" (ListMLE), ICML 2008.

    Example:
        >>> import torch
        >>> q, k = torch.randn(4, 8), torch.randn(4 * 3, 8)  # B=4, G=3, d=8
        >>> loss = StableDistillLoss(temperature=1.0)(q, k, teacher_scores=torch.randn(4, 3))
        >>> loss.shape
        torch.Size([])
    """

    uses_teacher_scores = True  # every record of a kind with this loss must carry teacher_scores
    sorts_negatives_by_teacher = True  # the data pipeline orders each group's negatives by teacher score

    def __init__(self, temperature: float = 0.01, teacher_temperature: float = 1.0, cross_device: bool = True):
        super().__init__()
        for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.temperature = float(temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.cross_device = bool(cross_device)

    def forward(self, q: Tensor, k: Tensor, teacher_scores: Tensor | None = None) -> Tensor:
        group_size = _group_size(q, k)
        batch = q.size(0)
        teacher = _check_teacher(teacher_scores, batch, group_size, type(self).__name__)  # (B, G)
        p = F.softmax(_fp32(teacher) / self.teacher_temperature, dim=-1)  # (B, G) teacher weights per rank

        keys, offset = _keys_and_offset(k, batch, self.cross_device)  # (B'*G, d)
        scores = _fp32(q @ keys.T) / self.temperature  # (B, B'*G)
        rows = offset + torch.arange(batch, device=q.device)  # (B,) query index in the gathered batch
        own_cols = rows[:, None] * group_size + torch.arange(group_size, device=q.device)  # (B, G)
        own = scores.gather(1, own_cols)  # (B, G) S_{b, bG+i}

        # log sum_{j >= i} exp own_j: own keys not yet "picked" at rank i, including i itself.
        remaining = torch.logcumsumexp(own.flip(-1), dim=-1).flip(-1)  # (B, G)
        if scores.size(1) > group_size:  # other queries' keys exist (B' > 1): same for every rank i
            own_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, own_cols, True)  # (B, B'*G)
            others = torch.logsumexp(scores.masked_fill(own_mask, float("-inf")), dim=-1, keepdim=True)  # (B, 1)
            log_denominator = torch.logaddexp(remaining, others)  # (B, G)
        else:  # a single query and no other rank: only the own keys compete (avoids logsumexp over all -inf)
            log_denominator = remaining  # (B, G)
        cross_entropy = log_denominator - own  # (B, G) CE_{b,i}
        return (p * cross_entropy).mean(dim=0).sum()

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
                f"cross_device={self.cross_device}")
