"""InfoNCE with hard negatives and in-batch (optionally cross-device) negatives (reference 2.5(3)).

Layout shared by every loss in this package (tevatron's): ``q`` is ``(B, d)``, ``k`` is ``(B*G, d)`` and query b's
group is rows ``b*G .. b*G+G-1`` of ``k``, positive first, then its ``G-1`` hard negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedder.distributed import gather_no_grad, gather_with_grad, rank_offset


def _group_size(q: Tensor, k: Tensor) -> int:
    """Check the ``(B, d)`` / ``(B*G, d)`` layout and return G."""
    if q.dim() != 2 or k.dim() != 2 or q.size(1) != k.size(1):
        raise ValueError(f"expected q of shape (B, d) and k of shape (B*G, d), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.size(0) == 0 or k.size(0) % q.size(0) != 0 or k.size(0) == 0:
        raise ValueError(f"k has {k.size(0)} rows, not a positive multiple of the {q.size(0)} queries "
                         "(B*G rows expected)")
    return k.size(0) // q.size(0)


def _fp32(x: Tensor) -> Tensor:
    """Upcast half precision (fp16/bf16) to float32 before softmax/exp; float32 and float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _keys_and_offset(k: Tensor, local_batch: int, cross_device: bool) -> tuple[Tensor, int]:
    """Keys to score against and the index of this rank's first query in them (0 unless gathered)."""
    if cross_device:
        return gather_with_grad(k), rank_offset(local_batch)  # (B'*G, d), B' = B * world_size
    return k, 0  # (B*G, d)


def _in_group_scores(q: Tensor, k: Tensor, group_size: int) -> Tensor:
    """Each query against its own G keys only: ``(B, d) x (B*G, d) -> (B, G)``."""
    kg = k.view(q.size(0), group_size, q.size(1))  # (B, G, d)
    return torch.einsum("bd,bgd->bg", q, kg)  # (B, G)


class InfoNCELoss(nn.Module):
    """InfoNCE (softmax cross-entropy) over each query's positive, its hard negatives and in-batch negatives.

    Every local query is scored against the keys of the whole batch (all ranks' keys when ``cross_device`` and a
    process group is initialised); the target is the query's own positive. This is the reference's contrastive
    loss (``modeling_dense.py`` ``_compute_loss``, contrastive branch) and sentence-transformers'
    MultipleNegativesRankingLoss with hard negatives.

    Args:
        temperature: scores are ``q @ k.T / temperature``. Pass 0.01 (the reference's ``cos_temperature``) for
            L2-normalised embeddings and 1.0 for raw inner products (``dense_metric=ip``).
        cross_device: gather the keys of all ranks (autograd-aware) and use them as extra negatives. The local
            queries' targets are offset by ``rank * B``. Identity outside a process group.
        in_batch_negatives: when False each query sees only its own G keys (target 0), like FlagEmbedding's
            ``no_in_batch_neg`` folders; ``cross_device`` is then irrelevant.
        mask_duplicate_keys: leave out of a query's candidates every other key whose text equals its positive's
            (given ``key_ids``): another query's positive or hard negative that is the same document would be a
            false negative. sentence-transformers' NO_DUPLICATES batch sampler avoids the same by batch
            composition; masking keeps the batches as drawn and also covers the keys of other ranks.
        mask_known_positives: leave out of a query's candidates every key whose text is one of its labelled
            positives (given ``positive_ids``; its target excepted): with several relevant documents per query
            (graded or multi-label qrels) another group's positive, or a copy of the query's own, is often one of
            them (one query in 6 on NFCorpus, one in 4 on ToolLens, in batches of 16 x 4 keys). Covers what
            ``mask_duplicate_keys`` masks in the query-to-key scores (the drawn positive is a labelled one).
        directions: the similarities in the softmax's denominator, as sentence-transformers' MNRL names them
            (``partition_mode="joint"``): ``query_to_doc`` (always: the query against every key), and optionally
            ``query_to_query`` (against the other queries), ``doc_to_query`` (the positive against every query) and
            ``doc_to_doc`` (the positive against the keys of other groups). All four are GTE's "improved
            contrastive loss" (Li et al., 2023): the positive must also stand out from the batch as seen from the
            document side. Needs ``in_batch_negatives``. With ``mask_duplicate_keys``, the queries that share
            query b's positive are left out of its query_to_query and doc_to_query blocks (not negatives).

    Inputs:
        +-----------------+---------------+-------------------------------------------------------------+
        | name            | shape         | meaning                                                     |
        +=================+===============+=============================================================+
        | q               | (B, d)        | local query embeddings                                      |
        | k               | (B*G, d)      | local key embeddings; rows b*G..b*G+G-1 are query b's group, |
        |                 |               | positive first                                              |
        | teacher_scores  | (B, G) / None | ignored (accepted so all losses share one signature)        |
        | key_ids         | (B*G,) / None | int64, equal for equal key texts (mask_duplicate_keys)      |
        | positive_ids    | (B, P) / None | int64 ids of each local query's labelled positives          |
        |                 |               | (mask_known_positives; rows padded with a repeated id)      |
        | return          | ()            | mean cross-entropy over the B local queries                  |
        +-----------------+---------------+-------------------------------------------------------------+

    With every direction, query b's softmax runs over ``[q_b.K^T (B'*G) | q_b.Q^T (B') | p_b.Q^T (B') |
    p_b.K^T (B'*G)]``, where ``Q`` (B', d) and ``K`` (B'*G, d) are the (gathered) queries and keys and ``p_b`` is its
    positive; ``q_b.q_b`` and ``p_b`` against its own group are left out.

    Each query sees ``1`` positive, ``G-1`` hard negatives and ``(B*world_size - 1)*G`` in-batch negatives.

    Reference:
        Zhang et al., "Retrieve Anything To Augment Large Language Models" (LLM-Embedder), 2023;
        van den Oord et al., "Representation Learning with Contrastive Predictive Coding" (InfoNCE), 2018.

    Example:
        >>> q = torch.eye(2, 4)  # B=2, d=4
        >>> k = torch.eye(4)[[0, 2, 1, 3]]  # G=2: query 0 owns rows 0-1, query 1 owns rows 2-3
        >>> round(InfoNCELoss(temperature=1.0)(q, k).item(), 4)  # -log(e / (e + 3))
        0.7437
    """

    uses_teacher_scores = False  # a record kind with this loss needs no teacher_scores
    sorts_negatives_by_teacher = False
    uses_key_ids = True  # the module passes the batch's key_ids

    def __init__(self, temperature: float = 0.01, cross_device: bool = True, in_batch_negatives: bool = True,
                 mask_duplicate_keys: bool = False, directions: Sequence[str] | None = ("query_to_doc",),
                 mask_known_positives: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        directions = tuple(directions or ("query_to_doc",))
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or "query_to_doc" not in directions or len(set(directions)) != len(directions):
            raise ValueError(f"directions={list(directions)}: each of {list(DIRECTIONS)} at most once, query_to_doc "
                             "included")
        if len(directions) > 1 and not in_batch_negatives:
            raise ValueError(f"directions={list(directions)} contrast against the batch: needs in_batch_negatives")
        self.directions = directions
        self.temperature = float(temperature)
        self.cross_device = bool(cross_device)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.mask_duplicate_keys = bool(mask_duplicate_keys)
        self.mask_known_positives = bool(mask_known_positives)

    def forward(self, q: Tensor, k: Tensor, teacher_scores: Tensor | None = None, key_ids: Tensor | None = None,
                positive_ids: Tensor | None = None) -> Tensor:
        group_size = _group_size(q, k)
        batch = q.size(0)
        mask = self.mask_duplicate_keys and key_ids is not None
        known = self.mask_known_positives and key_ids is not None and positive_ids is not None
        if not self.in_batch_negatives:
            scores = _fp32(_in_group_scores(q, k, group_size)) / self.temperature  # (B, G)
            target = torch.zeros(batch, dtype=torch.long, device=q.device)  # (B,) positive is column 0
            ids = key_ids.view(batch, group_size).to(q.device) if mask or known else None  # (B, G)
            if mask:
                scores = _mask_listed(scores, ids, ids[:, :1], target)  # column 0: each query's positive
            if known:
                scores = _mask_listed(scores, ids, positive_ids, target)
            return F.cross_entropy(scores, target)
        keys, offset = _keys_and_offset(k, batch, self.cross_device)  # (B'*G, d)
        scores = _fp32(q @ keys.T) / self.temperature  # (B, B'*G)
        target = (offset + torch.arange(batch, device=q.device)) * group_size  # (B,) own positive column
        same_text = query_positive_ids = ids = None
        if mask or known:
            ids = gather_no_grad(key_ids.to(q.device)) if self.cross_device else key_ids.to(q.device)  # (B'*G,)
        if mask:
            scores, same_text = _mask_listed(scores, ids.unsqueeze(0).expand(batch, -1),
                                             ids[target].unsqueeze(1), target, True)  # (B, B'*G), (B, B'*G)
            query_positive_ids = ids[::group_size]  # (B',) the text of every query's positive
        if known:
            scores = _mask_listed(scores, ids.unsqueeze(0).expand(batch, -1), positive_ids, target)
        if len(self.directions) > 1:
            scores = torch.cat([scores, *self._other_directions(q, k, keys, offset, group_size, same_text,
                                                                query_positive_ids)], dim=1)
        return F.cross_entropy(scores, target)  # the extra blocks follow the (B, B'*G) one: target is unchanged

    def _other_directions(self, q: Tensor, k: Tensor, keys: Tensor, offset: int, group_size: int,
                          same_text: Tensor | None, query_positive_ids: Tensor | None) -> list[Tensor]:
        """The denominator's blocks beyond query_to_doc, each (B, B') or (B, B'*G), in DIRECTIONS' order. Masking
        (`query_positive_ids`, (B',): the text of every query's drawn positive) also leaves out the queries whose
        positive is the same text as query b's: on data where many queries share a document (ToolLens: 1,400 train
        queries, 446 positives) they are not negatives."""
        batch, rows = q.size(0), torch.arange(q.size(0), device=q.device)
        queries = gather_with_grad(q) if self.cross_device else q  # (B', d)
        positives = k.view(batch, group_size, -1)[:, 0]  # (B, d) each local query's positive
        own = offset + rows  # (B,) each local query's row in `queries`
        shared = None if query_positive_ids is None else \
            query_positive_ids[own].unsqueeze(1) == query_positive_ids.unsqueeze(0)  # (B, B')
        blocks = []
        if "query_to_query" in self.directions:
            block = _fp32(q @ queries.T) / self.temperature  # (B, B')
            block = block.index_put((rows, own), block.new_tensor(float("-inf")))  # not q_b . q_b
            blocks.append(block if shared is None else block.masked_fill(shared, float("-inf")))
        if "doc_to_query" in self.directions:
            block = _fp32(positives @ queries.T) / self.temperature  # (B, B'), own query included (as ST)
            if shared is not None:
                block = block.masked_fill(shared.index_put((rows, own), torch.tensor(False, device=q.device)),
                                          float("-inf"))  # other queries of the same positive
            blocks.append(block)
        if "doc_to_doc" in self.directions:
            block = _fp32(positives @ keys.T) / self.temperature  # (B, B'*G)
            cols = torch.arange(keys.size(0), device=q.device) // group_size  # (B'*G,) the group of each key
            drop = cols.unsqueeze(0) == own.unsqueeze(1)  # (B, B'*G) the positive's own group
            if same_text is not None:
                drop = drop | same_text  # the same text as the positive in another group: a copy, not a negative
            blocks.append(block.masked_fill(drop, float("-inf")))
        return blocks

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, cross_device={self.cross_device}, "
                f"in_batch_negatives={self.in_batch_negatives}, mask_duplicate_keys={self.mask_duplicate_keys}, "
                f"mask_known_positives={self.mask_known_positives}, "
                f"directions={list(self.directions)}")


DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")  # InfoNCELoss(directions=...)


def _mask_listed(scores: Tensor, ids: Tensor, listed: Tensor, target: Tensor, return_mask: bool = False):
    """scores (B, C), ids (B, C) of each candidate's text, listed (B, P) text ids per query, target (B,): every
    candidate whose text is one of its query's listed ones, other than the target itself, gets -inf (left out of the
    softmax). With `return_mask`, also that (B, C) mask. `mask_duplicate_keys` lists each query's positive (P = 1),
    `mask_known_positives` its labelled positives. A batched binary search over each row's sorted list: memory
    B x (C + P), where a (B, C, P) comparison would hold 128 x 8,192 x 100 booleans under 8 ranks."""
    rows = torch.arange(scores.size(0), device=scores.device)
    listed = listed.to(scores.device).sort(dim=1).values  # (B, P)
    ids = ids.contiguous()  # searchsorted wants contiguous values: `ids` may be an expanded (1, C) row
    at = torch.searchsorted(listed, ids).clamp_(max=listed.size(1) - 1)  # (B, C) where each id would sit
    hit = listed.gather(1, at) == ids  # (B, C) the id is in its row's list
    hit[rows, target] = False
    masked = scores.masked_fill(hit, float("-inf"))
    return (masked, hit) if return_mask else masked
