"""Single-process checks of the losses: hand-computed values, the reference's looped stable distillation, rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedder.losses import InfoNCELoss, KLDistillLoss, StableDistillLoss, combine_losses


def _one_hot_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """B=2, G=2, d=4: query 0 = e0 owns keys [e0, e2], query 1 = e1 owns keys [e1, e3]."""
    q = torch.eye(2, 4)  # (B, d)
    k = torch.eye(4)[[0, 2, 1, 3]]  # (B*G, d)
    return q, k


def _random_batch(batch: int, group: int, dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1).requires_grad_()  # (B, d)
    k = F.normalize(torch.randn(batch * group, dim, generator=g, dtype=dtype), dim=-1).requires_grad_()  # (B*G, d)
    t = torch.randn(batch, group, generator=g, dtype=dtype) * 3  # (B, G)
    return q, k, t


def naive_stable_distill(q, k, teacher_scores, temperature, teacher_temperature=1.0):
    """Reference 2.5(1) as written in modeling_dense.py: a loop over ranks with an accumulating finfo.min mask."""
    p = F.softmax(teacher_scores / teacher_temperature, dim=-1)  # (B, G)
    scores = q @ k.T / temperature  # (B, B*G)
    group = k.size(0) // q.size(0)
    labels = torch.arange(q.size(0)) * group  # (B,)
    mask = torch.zeros_like(scores)  # (B, B*G)
    loss = 0
    for i in range(group):
        target = labels + i  # (B,)
        ce = F.cross_entropy(scores + mask, target, reduction="none")  # (B,)
        loss = loss + torch.mean(p[:, i] * ce)
        mask = torch.scatter(mask, dim=-1, index=target.unsqueeze(-1), value=torch.finfo(scores.dtype).min)
    return loss


# --------------------------------------------------------------------------------------------------- InfoNCE


def test_infonce_one_hot_hand_value():
    q, k = _one_hot_batch()
    # each query: positive score 1/T, the other three keys score 0
    for temperature in (1.0, 0.5):
        expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + 3))
        loss = InfoNCELoss(temperature=temperature)(q, k)
        assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_infonce_without_in_batch_negatives_sees_only_own_group():
    q, k = _one_hot_batch()
    expected = -math.log(math.e / (math.e + 1))  # own positive scores 1, own negative 0
    loss = InfoNCELoss(temperature=1.0, in_batch_negatives=False)(q, k)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # a key of the other query that matches query 0 perfectly must not matter without in-batch negatives
    k2 = k.clone()
    k2[3] = torch.tensor([5.0, 0, 0, 0])
    assert InfoNCELoss(temperature=1.0, in_batch_negatives=False)(q, k2).item() == pytest.approx(expected, abs=1e-6)
    assert InfoNCELoss(temperature=1.0)(q, k2).item() > expected + 1.0


def test_infonce_matches_cross_entropy_with_group_targets():
    q, k, _ = _random_batch(5, 3, 8, seed=0)
    expected = F.cross_entropy(q @ k.T / 0.05, torch.arange(5) * 3)
    assert torch.allclose(InfoNCELoss(temperature=0.05)(q, k), expected)


@pytest.mark.parametrize("directions", [
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),  # GTE's improved contrastive loss
])
def test_infonce_directions_equal_sentence_transformers(directions):
    """InfoNCE with extra directions equals sentence-transformers' MNRL (`directions`, joint partition) on the same
    embeddings, loss and gradients, with hard negatives (ST lays keys out [positives, negatives 1, ...], we by
    group); and differs from the query_to_doc loss (the comparison has power)."""
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    batch, group, temperature = 5, 3, 0.05
    q, k, _ = _random_batch(batch, group, 8, seed=3)
    ours = InfoNCELoss(temperature=temperature, cross_device=False, directions=directions)(q, k)
    grads = torch.autograd.grad(ours, (q, k))
    from sentence_transformers.util import dot_score  # on unit vectors: cos_sim's values; InfoNCE's gradients

    st = MultipleNegativesRankingLoss(None, scale=1 / temperature, similarity_fct=dot_score, directions=directions)
    columns = [k.view(batch, group, -1)[:, g] for g in range(group)]  # (B, d) each: positives, then negatives
    theirs = st.compute_loss_from_embeddings([q, *columns], None)
    st_grads = torch.autograd.grad(theirs, (q, k))
    assert torch.allclose(ours, theirs, atol=1e-10)
    for a, b in zip(grads, st_grads):
        assert torch.allclose(a, b, atol=1e-10)
    plain = InfoNCELoss(temperature=temperature, cross_device=False)(q, k)
    assert ours.item() > plain.item() + 1e-3  # more terms in the denominator


def test_masking_leaves_queries_that_share_the_positive_out_of_the_query_blocks():
    """With mask_duplicate_keys, query_to_query and doc_to_query leave out the queries whose positive is the same
    text (ToolLens: one tool is the positive of 301 train queries): the loss equals the hand-built softmax without
    those columns; without masking they count as negatives."""
    q, k, _ = _random_batch(3, 2, 8, seed=7)
    k = k.detach().clone()
    k[2] = k[0]  # query 1's positive is query 0's
    ids = torch.tensor([0, 1, 0, 3, 4, 5])
    gte = ["query_to_doc", "query_to_query", "doc_to_query"]
    loss = InfoNCELoss(temperature=0.05, cross_device=False, mask_duplicate_keys=True, directions=gte)(q, k, key_ids=ids)
    inf = float("-inf")
    qd = q @ k.T / 0.05  # (3, 6): positives in columns 0, 2, 4; columns 0 and 2 are the same text
    qd[0, 2] = qd[1, 0] = inf
    qq = q @ q.T / 0.05  # (3, 3)
    qq.fill_diagonal_(inf)
    qq[0, 1] = qq[1, 0] = inf  # queries 0 and 1 share their positive
    dq = k[[0, 2, 4]] @ q.T / 0.05  # (3, 3) positive b against every query; its own query stays
    dq[0, 1] = dq[1, 0] = inf
    expected = F.cross_entropy(torch.cat([qd, qq, dq], dim=1), torch.tensor([0, 2, 4]))
    assert torch.allclose(loss, expected)
    unmasked = InfoNCELoss(temperature=0.05, cross_device=False, directions=gte)(q, k, key_ids=ids)
    assert unmasked.item() > loss.item() + 1e-3


def test_the_config_check_knows_the_same_directions():
    from embedder.config_check import LOSS_DIRECTIONS
    from embedder.losses.contrastive import DIRECTIONS

    assert LOSS_DIRECTIONS == DIRECTIONS


def test_infonce_directions_are_checked():
    for bad in (["doc_to_query"], ["query_to_doc", "query_to_doc"], ["query_to_doc", "doc_to_passage"]):
        with pytest.raises(ValueError, match="directions"):
            InfoNCELoss(directions=bad)
    with pytest.raises(ValueError, match="needs in_batch_negatives"):
        InfoNCELoss(directions=["query_to_doc", "doc_to_doc"], in_batch_negatives=False)


def test_doc_to_doc_leaves_out_copies_of_the_positive_when_masking():
    """With mask_duplicate_keys, a key whose text is the positive's (another group's copy) scores 1 against the
    positive in doc_to_doc; it is left out there too, so the loss equals that of the batch without the copy's
    column."""
    q, k, _ = _random_batch(3, 2, 8, seed=5)
    k = k.detach().clone()
    k[3] = k[0]  # query 1's hard negative is query 0's positive
    ids = torch.arange(6)
    ids[3] = ids[0]
    loss = InfoNCELoss(temperature=0.05, cross_device=False, mask_duplicate_keys=True,
                       directions=["query_to_doc", "doc_to_doc"])(q, k, key_ids=ids)
    scores = q @ k.T / 0.05  # (3, 6)
    qd = scores.clone()
    qd[0, 3] = float("-inf")  # query 0: the copy of its positive is masked in query_to_doc
    dd = (k[[0, 2, 4]] @ k.T / 0.05)  # (3, 6) each positive against every key
    for b in range(3):
        dd[b, 2 * b:2 * b + 2] = float("-inf")  # its own group
    dd[0, 3] = float("-inf")  # the copy
    expected = F.cross_entropy(torch.cat([qd, dd], dim=1), torch.arange(3) * 2)
    assert torch.allclose(loss, expected)


def test_infonce_rejects_bad_layout():
    with pytest.raises(ValueError, match="multiple"):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(7, 4))


# -------------------------------------------------------------------------------------------------------- KL


def test_kl_is_zero_when_student_equals_teacher():
    q, k, _ = _random_batch(4, 3, 6, seed=1)
    student = torch.einsum("bd,bgd->bg", q, k.view(4, 3, 6)) / 0.05  # (B, G)
    loss = KLDistillLoss(temperature=0.05, teacher_temperature=2.0, student_temperature=2.0)(
        q, k, teacher_scores=student.detach())
    assert abs(loss.item()) < 1e-10


def test_kl_hand_formula():
    q, k = _one_hot_batch()  # in-group student scores: [1, 0] for both queries
    teacher = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    t_s, t_t = 0.5, 2.0
    expected = 0.0
    for row in teacher.tolist():
        z_p = math.exp(1 / t_s) + math.exp(0)
        log_p = [1 / t_s - math.log(z_p), 0 - math.log(z_p)]
        z_q = sum(math.exp(x / t_t) for x in row)
        probs = [math.exp(x / t_t) / z_q for x in row]
        expected += sum(pq * (math.log(pq) - lp) for pq, lp in zip(probs, log_p))
    expected /= 2  # batchmean
    loss = KLDistillLoss(temperature=1.0, teacher_temperature=t_t, student_temperature=t_s)(q, k, teacher)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("loss_cls", [KLDistillLoss, StableDistillLoss])
def test_distill_requires_teacher_scores(loss_cls):
    q, k = _one_hot_batch()
    with pytest.raises(ValueError, match="teacher_scores"):
        loss_cls()(q, k)
    with pytest.raises(ValueError, match=r"\(B, G\)"):
        loss_cls()(q, k, teacher_scores=torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------- stable distill


@pytest.mark.parametrize(
    "batch,group,dim,temperature,teacher_temperature,seed",
    [
        (4, 3, 8, 0.05, 1.0, 0),
        (3, 5, 16, 0.01, 1.0, 1),  # the recipe's cos temperature: scores up to 100
        (6, 2, 4, 1.0, 0.1, 2),  # teacher_temperature != 1 (the reference ignores it; we apply it)
        (5, 4, 8, 0.05, 3.0, 3),
        (4, 1, 8, 0.05, 1.0, 4),  # G=1: plain InfoNCE weighted by p=1
        (1, 3, 8, 0.05, 1.0, 5),  # B=1: no other query, only own keys compete
        (1, 1, 8, 0.05, 1.0, 6),  # a single key: loss 0
    ],
)
def test_stable_distill_matches_naive_loop(batch, group, dim, temperature, teacher_temperature, seed):
    q, k, t = _random_batch(batch, group, dim, seed)
    loss = StableDistillLoss(temperature=temperature, teacher_temperature=teacher_temperature, cross_device=False)
    value = loss(q, k, t)
    grad_q, grad_k = torch.autograd.grad(value, (q, k))
    naive = naive_stable_distill(q, k, t, temperature, teacher_temperature)
    naive_q, naive_k = torch.autograd.grad(naive, (q, k))
    assert torch.allclose(value, naive, atol=1e-10, rtol=1e-8)
    assert torch.allclose(grad_q, naive_q, atol=1e-10, rtol=1e-8)
    assert torch.allclose(grad_k, naive_k, atol=1e-10, rtol=1e-8)
    if batch == 1 and group == 1:
        assert value.item() == pytest.approx(0.0, abs=1e-12)


def test_stable_distill_default_reproduces_reference_raw_softmax():
    """teacher_temperature=1 (default) is the reference's untempered softmax over the raw scores."""
    q, k, t = _random_batch(4, 3, 8, seed=7)
    assert torch.allclose(StableDistillLoss(temperature=0.05)(q, k, t), naive_stable_distill(q, k, t, 0.05))


def test_stable_distill_group_one_is_infonce():
    q, k, t = _random_batch(5, 1, 8, seed=8)
    assert torch.allclose(StableDistillLoss(temperature=0.05)(q, k, t), InfoNCELoss(temperature=0.05)(q, k))


def test_stable_distill_float32_gradients_match_naive():
    q, k, t = _random_batch(8, 4, 32, seed=9, dtype=torch.float32)
    value = StableDistillLoss(temperature=0.01)(q, k, t)
    grads = torch.autograd.grad(value, (q, k))
    naive = naive_stable_distill(q, k, t, 0.01)
    naive_grads = torch.autograd.grad(naive, (q, k))
    assert torch.allclose(value, naive, atol=1e-5, rtol=1e-5)
    for g, n in zip(grads, naive_grads):
        assert torch.allclose(g, n, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stable_distill_half_precision_inputs_are_safe(dtype):
    q, k, t = _random_batch(8, 4, 32, seed=10, dtype=torch.float32)
    reference = StableDistillLoss(temperature=0.01)(q, k, t)
    qh, kh = q.detach().to(dtype).requires_grad_(), k.detach().to(dtype).requires_grad_()
    value = StableDistillLoss(temperature=0.01)(qh, kh, t.to(dtype))
    assert value.dtype == torch.float32 and torch.isfinite(value)
    grads = torch.autograd.grad(value, (qh, kh))
    assert all(torch.isfinite(g).all() for g in grads)
    assert value.item() == pytest.approx(reference.item(), rel=0.05)


# ------------------------------------------------------------------------------------------------- combine


def test_which_losses_are_active(tiny_bert):
    """A kind's listed losses are all active, except a teacher-score loss on a batch without scores (reference)."""
    from embedder.lit_module import RetrieverModule
    from embedder.modeling.encoder import DualEncoder
    from embedder.record_kinds import build_record_kinds

    tasks = build_record_kinds({"qa": {"losses": [{"_target_": "embedder.losses.InfoNCELoss", "weight": 0.2},
                                                   {"_target_": "embedder.losses.KLDistillLoss", "weight": 0.5}]}}, 2)
    module = RetrieverModule(DualEncoder(tiny_bert), tasks, temperature=1.0, cross_device=False)
    q, k = _one_hot_batch()
    ts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    both = module.compute_loss(q, k, ts, "qa")
    con, dis = InfoNCELoss(module.temperature, False)(q, k), KLDistillLoss(module.temperature)(q, k, ts)
    assert set(both) == {"loss", "loss_contrastive", "loss_distill"}
    assert both["loss"].item() == pytest.approx(0.2 * con.item() + 0.5 * dis.item())
    alone = module.compute_loss(q, k, None, "qa")  # no teacher scores: the KL term is off, InfoNCE unweighted
    assert set(alone) == {"loss", "loss_contrastive"} and alone["loss"].item() == pytest.approx(con.item())


def test_combine_reference_rule():
    lc, ld = torch.tensor(2.0), torch.tensor(3.0)
    assert combine_losses([(0.2, lc), (0.5, ld)], "reference").item() == pytest.approx(0.2 * 2 + 0.5 * 3)
    assert combine_losses([(0.2, lc)], "reference").item() == pytest.approx(2.0)  # lone loss: unweighted
    assert combine_losses([(0.5, ld)], "reference").item() == pytest.approx(3.0)


def test_combine_weighted_rule():
    lc, ld = torch.tensor(2.0), torch.tensor(3.0)
    assert combine_losses([(0.2, lc), (0.5, ld)], "weighted").item() == pytest.approx(0.2 * 2 + 0.5 * 3)
    assert combine_losses([(0.2, lc)], "weighted").item() == pytest.approx(0.4)
    assert combine_losses([(0.5, ld)], "weighted").item() == pytest.approx(1.5)


@pytest.mark.parametrize("rule", ["reference", "weighted"])
def test_combine_neither_active_names_task_settings(rule):
    with pytest.raises(ValueError, match="(?s)'tool'.*record_kinds.tool.losses.*score.py"):
        combine_losses([], rule, task="tool")


def test_combine_rejects_unknown_rule_and_bad_loss_lists():
    from embedder.record_kinds import build_record_kinds

    with pytest.raises(ValueError, match="rule"):
        combine_losses([(1.0, torch.tensor(1.0))], "sum")
    bad = {"weight -1": ([{"_target_": "embedder.losses.InfoNCELoss", "weight": -1}], r"losses\[0\]\.weight=-1"),
           "no target": ([{"weight": 1}], r"losses\[0\]: each loss needs `_target_`"),
           "not a class": ([{"_target_": "embedder.losses.NoSuchLoss"}], r"losses\[0\]\._target_=.*NoSuchLoss"),
           "bad argument": ([{"_target_": "embedder.losses.KLDistillLoss", "teacher_temp": 0.1}],
                            r"losses\[0\]: embedder.losses.KLDistillLoss takes no argument \['teacher_temp'\]")}
    for name, (losses, message) in bad.items():
        with pytest.raises(ValueError, match="record_kinds.qa." + message):
            build_record_kinds({"qa": {"losses": losses}}, 4)
    with pytest.raises(ValueError, match="temperatures? must be > 0|teacher_temperature must be > 0"):
        KLDistillLoss(teacher_temperature=0)


def test_old_loss_block_folds_into_the_list():
    """`loss: {contrastive_weight, distill_weight, ...}` (before 0.2) builds the same losses as the list."""
    from embedder.record_kinds import build_record_kinds

    old = build_record_kinds({
        "qa": {"loss": {"contrastive_weight": 0.0, "distill_weight": 1.0, "stable_distill": True}},
        "chat": {"loss": {"contrastive_weight": 0, "distill_weight": 1, "teacher_temperature": 0.1}},
        "tool": {"loss": {"contrastive_weight": 0.2, "distill_weight": 0.0}},
        "both": {}}, 4)
    assert [(s.target, s.weight, dict(s.kwargs)) for s in old["qa"].losses] == [
        ("embedder.losses.StableDistillLoss", 1.0, {"teacher_temperature": 1.0})]
    assert old["qa"].needs_teacher_scores and old["qa"].sampling.stable_distill
    assert [(s.target, dict(s.kwargs)) for s in old["chat"].losses] == [
        ("embedder.losses.KLDistillLoss", {"teacher_temperature": 0.1, "student_temperature": 1.0})]
    assert not old["chat"].sampling.stable_distill
    assert [(s.target, s.weight) for s in old["tool"].losses] == [("embedder.losses.InfoNCELoss", 0.2)]
    assert not old["tool"].needs_teacher_scores
    assert [(s.target, s.weight) for s in old["both"].losses] == [  # the reference's defaults: 0.2 and 1.0
        ("embedder.losses.InfoNCELoss", 0.2), ("embedder.losses.KLDistillLoss", 1.0)]

class MarginRankingLoss(torch.nn.Module):
    """A loss from outside the package, as a user adds one: each query's positive must beat its own negatives by
    `margin` (cosine scores). Listed by `_target_` alone; the module passes it no shared argument it does not take."""

    uses_teacher_scores = False
    calls = 0

    def __init__(self, margin: float = 0.2):
        super().__init__()
        self.margin = margin

    def forward(self, q, k, teacher_scores=None):  # q (B, d), k (B*G, d) -> ()
        MarginRankingLoss.calls += 1
        scores = torch.einsum("bd,bgd->bg", q, k.view(q.size(0), -1, q.size(1)))  # (B, G)
        return F.relu(self.margin - scores[:, :1] + scores[:, 1:]).mean()


def test_a_loss_of_ones_own_is_a_config_entry(tmp_path, tiny_bert):
    """A new loss touches its own module and the config that lists it: a real fit trains with it, combined with a
    built-in one under the weighted rule, and its own argument reaches it."""
    import csv

    from embedder.training import run_train
    from tests.conftest import compose, quick_overrides, toy_path

    MarginRankingLoss.calls = 0
    losses = ("[{_target_:tests.test_losses.MarginRankingLoss,weight:0.5,margin:0.3},"
              "{_target_:embedder.losses.InfoNCELoss,weight:1.0}]")
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "export=false", "report=false",
        f"record_kinds.tool.losses={losses}", "loss.combine_rule=weighted"])))
    assert MarginRankingLoss.calls == 2  # both training steps
    rows = [r for p in (tmp_path / "out").rglob("metrics.csv") for r in csv.DictReader(open(p))]
    parts = [(float(r["train/loss"]), float(r["train/loss_contrastive"]), float(r["train/loss_contrastive_2"]))
             for r in rows if r.get("train/loss")]
    assert parts and all(math.isclose(total, 0.5 * margin + nce, rel_tol=1e-4) for total, margin, nce in parts)


def test_matryoshka_loss_is_the_weighted_sum_over_prefixes(tiny_bert):
    """With matryoshka_dims each prefix is normalised again and scored with the kind's loss; the total is the
    weighted sum, and every prefix's gradient reaches the encoder."""
    from embedder.lit_module import RetrieverModule
    from embedder.modeling.encoder import DualEncoder
    from embedder.record_kinds import build_record_kinds

    tasks = build_record_kinds({"qa": {"losses": [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]}}, 2)
    enc = DualEncoder(tiny_bert)  # hidden size 32
    module = RetrieverModule(enc, tasks, temperature=0.05, cross_device=False, matryoshka_dims=[32, 16, 8],
                             matryoshka_weights=[1.0, 0.5, 0.25])
    tok = enc.tokenizer
    q = enc.encode(dict(tok(["paris capital", "yellow fruit"], padding=True, return_tensors="pt")), "query")  # (2, 32)
    k = enc.encode(dict(tok(["paris is the capital", "tokyo", "a banana is yellow", "an apple"], padding=True,
                            return_tensors="pt")), "key")  # (4, 32)
    out = module.compute_loss(q, k, None, "qa")
    nce = InfoNCELoss(0.05, cross_device=False)
    parts = {d: nce(F.normalize(q[:, :d], dim=-1), F.normalize(k[:, :d], dim=-1)) for d in (32, 16, 8)}
    assert set(out) == {"loss", "loss_dim32", "loss_dim16", "loss_dim8"}
    assert out["loss"].item() == pytest.approx((parts[32] + 0.5 * parts[16] + 0.25 * parts[8]).item(), rel=1e-5)
    assert out["loss_dim8"].item() == pytest.approx(parts[8].item(), rel=1e-5) and parts[8] != parts[32]
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="matryoshka_dims=\\[64\\]: distinct sizes between 1 and the embedding size 32"):
        RetrieverModule(enc, tasks, matryoshka_dims=[64])
    with pytest.raises(ValueError, match="matryoshka_weights"):
        RetrieverModule(enc, tasks, matryoshka_dims=[32, 16], matryoshka_weights=[1.0])


@pytest.mark.slow
def test_a_matryoshka_fit_exports_dims_that_sentence_transformers_truncates(tmp_path, tiny_bert):
    """A real fit with loss.matryoshka_dims: the export declares the dimensions, SentenceTransformer(...,
    truncate_dim=8) gives our truncated embeddings, and evaluation at model.truncate_dim=8 runs on the 8-d vectors."""
    import json

    from sentence_transformers import SentenceTransformer

    from embedder.evaluation.run import run_evaluate
    from embedder.modeling.encoder import DualEncoder
    from embedder.retrieval.encode.model import load_encoder
    from embedder.training import run_train
    from tests.conftest import ROOT, compose, quick_overrides, toy_path

    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false",
        "loss.matryoshka_dims=[32,16,8]"])))
    out = tmp_path / "out"
    assert json.loads((out / "embedder_config.json").read_text())["matryoshka_dims"] == [32, 16, 8]
    assert "Matryoshka dimensions" in (out / "README.md").read_text()
    texts = ["find a weather tool", "convert currencies"]
    ours = load_encoder({"_target_": "embedder.modeling.encoder.DualEncoder", "model_name_or_path": str(out),
                         "truncate_dim": 8}, str(out)).encode_texts(texts, kind="key").numpy()
    st = SentenceTransformer(str(out), device="cpu", truncate_dim=8)
    theirs = st.encode(texts, normalize_embeddings=True)
    assert ours.shape == theirs.shape == (2, 8)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    full = DualEncoder(str(out)).encode_texts(texts, kind="key").numpy()
    assert full.shape == (2, 32) and not np.allclose(full[:, :8], ours)  # re-normalised prefix, not a slice

    common = ["task=tool", f"data_root={tmp_path}/none", "model=tiny_bert", f"model_path={out}", "trainer=cpu",
              "retriever.batch_size=8", f"eval_data={ROOT}/embedder/sample_data/tool/test.json",
              f"corpus={ROOT}/embedder/sample_data/tool/corpus.json", "metrics=[ndcg]", "cutoffs=[10]",
              "key_template='{text}'"]
    small = run_evaluate(compose([*common, "model.truncate_dim=8", f"output_dir={tmp_path}/e8"], "eval"))
    whole = run_evaluate(compose([*common, f"output_dir={tmp_path}/e32"], "eval"))
    assert set(small) == set(whole) and small != whole  # the 8-d vectors rank differently


def test_the_listed_text_mask_equals_a_per_query_membership_test():
    """`_mask_listed` (a batched binary search over each query's sorted list) masks exactly the candidates a plain
    per-query `isin` finds, target excepted: ids drawn from a small pool so that lists repeat ids, rows share ids,
    and the candidates hit and miss; lists of 1 (mask_duplicate_keys) and of 37 (labelled positives, padded)."""
    from embedder.losses.contrastive import _mask_listed

    gen = torch.Generator().manual_seed(0)
    for width in (1, 37):
        ids = torch.randint(-50, 50, (6, 40), generator=gen) * 7919  # (B, C) signed, as blake2b ids are
        listed = torch.randint(-50, 50, (6, width), generator=gen) * 7919  # (B, P)
        target = torch.randint(0, 40, (6,), generator=gen)
        scores = torch.randn(6, 40, generator=gen)
        masked, hit = _mask_listed(scores, ids, listed, target, return_mask=True)
        want = torch.stack([torch.isin(ids[b], listed[b]) for b in range(6)])
        want[torch.arange(6), target] = False
        assert want.any() and not want.all()  # the draw exercises both outcomes
        assert torch.equal(hit, want)
        assert torch.equal(torch.isinf(masked), want) and torch.equal(masked[~want], scores[~want])
