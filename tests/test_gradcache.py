"""GradCache gives the gradients of the uncached loss: on one process with the real module and tiny BERT (dropout
off: against the whole batch; dropout on: against the same mini-batches encoded with a graph, so the dropout masks
are the same), and on 2 gloo ranks with cross-device negatives."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from embedder.gradcache import gradcache_loss
from embedder.losses import InfoNCELoss, StableDistillLoss
from tests.conftest import compose, quick_overrides, toy_path
from tests.test_losses_ddp import _free_port

TEXTS_Q = ["weather in paris", "convert usd to eur", "translate to french", "stock price of acme",
           "book a flight", "nearest pharmacy"]
TEXTS_K = [f"{t} tool {j}" for t in TEXTS_Q for j in range(3)]  # G = 3 keys per query


def _module(tiny_bert, losses, checkpointing: bool = False, **kw):
    from embedder.lit_module import RetrieverModule
    from embedder.modeling.encoder import DualEncoder
    from embedder.record_kinds import build_record_kinds

    torch.manual_seed(0)
    enc = DualEncoder(tiny_bert, unpadded="false", gradient_checkpointing=checkpointing)
    return RetrieverModule(enc, build_record_kinds({"qa": {"losses": losses}}, 3), temperature=0.05,
                           cross_device=False, **kw)


def _batch(module, teacher: bool):
    tok = module.encoder.tokenizer
    return {"query": dict(tok(TEXTS_Q, padding=True, return_tensors="pt")),
            "key": dict(tok(TEXTS_K, padding=True, return_tensors="pt")),
            "teacher_scores": torch.randn(len(TEXTS_Q), 3, generator=torch.Generator().manual_seed(1)) if teacher
            else None, "record_kind": "qa"}


def _grads(module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("losses, kw", [
    ([{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}], {}),
    ([{"_target_": "embedder.losses.InfoNCELoss", "weight": 0.2},
      {"_target_": "embedder.losses.StableDistillLoss", "weight": 1.0}], {}),
    # GTE's loss: each query's softmax also holds the other queries, so a mini-batch's gradient depends on all
    ([{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}],
     {"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]}),
], ids=["infonce", "infonce+stable", "gte"])
def test_cached_gradients_equal_the_whole_batch(tiny_bert, losses, kw):
    module = _module(tiny_bert, losses, **kw)
    assert module.loss_fns["qa"][0][1].directions == tuple(kw.get("directions") or ["query_to_doc"])
    module.encoder.eval()  # no dropout: the whole batch in one pass is the reference
    batch = _batch(module, teacher=len(losses) > 1)
    q, k = module.encoder.encode(batch["query"], "query"), module.encoder.encode(batch["key"], "key")
    ref = module.compute_loss(q, k, batch["teacher_scores"], "qa")
    ref["loss"].backward()
    want = _grads(module)
    for m in (1, 2, 4):  # 4: the last mini-batch is smaller
        out = module._gradcache_step(batch, m, 3)
        assert torch.allclose(out["loss"], ref["loss"].detach(), atol=1e-6)
        out["loss"].backward()
        got = _grads(module)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), (m, name)


def test_gradcache_with_gradient_checkpointing_gives_the_whole_batch_gradients(tiny_bert):
    """The memory-lean combination (docs/architecture.md, a 7B decoder): mini-batches re-encoded with activation
    checkpointing inside, against the whole batch encoded once without it."""
    losses = [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]
    plain, lean = _module(tiny_bert, losses), _module(tiny_bert, losses, checkpointing=True)
    for m in (plain, lean):
        m.encoder.train()
        for layer in m.encoder.query_model.modules():  # dropout off: the whole batch is the reference
            if isinstance(layer, nn.Dropout):
                layer.p = 0.0
    batch = _batch(plain, teacher=False)
    ref = plain.compute_loss(plain.encoder.encode(batch["query"], "query"), plain.encoder.encode(batch["key"], "key"),
                             None, "qa")
    ref["loss"].backward()
    want = _grads(plain)
    out = lean._gradcache_step(batch, 2, 3)
    out["loss"].backward()
    got = _grads(lean)
    assert lean.encoder.query_model.is_gradient_checkpointing
    assert abs(float(out["loss"]) - float(ref["loss"])) < 1e-5
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4) for n in want)


def test_dropout_is_replayed(tiny_bert):
    """In training mode the re-encoded mini-batches reuse their first pass's dropout masks: the gradients equal
    those of the same mini-batches encoded once with a graph from the same RNG state."""
    module = _module(tiny_bert, [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}])
    module.encoder.train()
    batch = _batch(module, teacher=False)
    rows = lambda d, lo, hi: {n: t[lo:hi] for n, t in d.items()}  # noqa: E731
    torch.manual_seed(7)
    qs, ks = [], []
    for lo in range(0, 6, 2):
        qs.append(module.encoder.encode(rows(batch["query"], lo, lo + 2), "query"))
        ks.append(module.encoder.encode(rows(batch["key"], lo * 3, (lo + 2) * 3), "key"))
    ref = module.compute_loss(torch.cat(qs), torch.cat(ks), None, "qa")
    ref["loss"].backward()
    want = _grads(module)
    torch.manual_seed(7)
    out = module._gradcache_step(batch, 2, 3)
    out["loss"].backward()
    got = _grads(module)
    assert abs(float(out["loss"]) - float(ref["loss"])) < 1e-5
    assert all(torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4) for n in want)
    torch.manual_seed(7)  # without replaying the RNG the masks would differ: the check above could fail
    module.encoder.encode(rows(batch["query"], 0, 2), "query")
    assert not torch.equal(torch.get_rng_state(), _seeded_state(7))


def _seeded_state(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.get_rng_state()


# --------------------------------------------------------------------------------------------- 2 gloo ranks
def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    enc = nn.Linear(6, 5)  # the same weights on both ranks
    g = torch.Generator().manual_seed(100 + rank)
    xq, xk, teacher = torch.randn(4, 6, generator=g), torch.randn(4 * 3, 6, generator=g), torch.randn(4, 3, generator=g)
    results = {}
    for name, loss_fn in (("infonce", InfoNCELoss(0.05, cross_device=True)),
                          ("stable", StableDistillLoss(0.05, cross_device=True))):
        def loss(q, k):
            return {"loss": loss_fn(q, k, teacher)}
        value = loss(enc(xq), enc(xk))["loss"]
        value.backward()
        want = [p.grad.clone() for p in enc.parameters()]
        enc.zero_grad()
        out = gradcache_loss(lambda i: (enc(xq[i * 2:(i + 1) * 2]), enc(xk[i * 6:(i + 1) * 6])), 2, loss)
        out["loss"].backward()
        got = [p.grad.clone() for p in enc.parameters()]
        enc.zero_grad()
        results[name] = (float(value), float(out["loss"]), want, got)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_cached_gradients_equal_across_two_gloo_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, (ref, cached, want, got) in results.items():
            assert abs(ref - cached) < 1e-6, (rank, name)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want)), (rank, name)
            assert any(float(w.abs().sum()) > 0 for w in want)  # the cross-rank negatives carry gradient


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["cpu", "ddp_sim"])
def test_a_fit_with_gradcache_matches_one_without(tmp_path, tiny_bert, trainer):
    """Two real one-step fits (plain SGD), with and without loss.gradcache_mini_batch (dropout off): the same loss
    and the same trained weights; on one process, and under DDP with 2 gloo ranks (cross-device negatives; the gradients are then
    averaged by hand, as DDP's reducer would)."""
    import csv
    import json
    import math
    import shutil

    from safetensors.torch import load_file

    from embedder.training import run_train

    model = tmp_path / "no-dropout"
    shutil.copytree(tiny_bert, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    tiny_bert = str(model)
    runs = {}
    for name, extra in (("whole", []), ("cached", ["loss.gradcache_mini_batch=1"])):
        out = tmp_path / name
        run_train(compose(quick_overrides(out, tiny_bert, [
            "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", f"trainer={trainer}",
            # plain SGD with a rate that moves the weights visibly (AdamW's first steps are sign-like, which hides
            # gradient differences and turns float noise in near-zero gradients into visible ones)
            "optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps", "optimizer.lr=10",
            "weight_decay=0", "warmup_ratio=0", "trainer.max_steps=1", *extra])))
        rows = [r for p in (out / "out").rglob("metrics.csv") for r in csv.DictReader(open(p))]
        runs[name] = ([float(r["train/loss"]) for r in rows if r.get("train/loss")],
                      load_file(str(out / "out" / "model.safetensors")))
    (loss_a, w_a), (loss_b, w_b) = runs["whole"], runs["cached"]
    assert len(loss_a) == len(loss_b) == 1
    assert all(abs(a - b) < 1e-4 for a, b in zip(loss_a, loss_b))
    # the texts differ: not the uniform loss over the 2 x 4 in-batch keys (the loss of identical embeddings)
    assert abs(loss_a[0] - math.log(2 * 4)) > 0.05, loss_a
    base = load_file(str(model / "model.safetensors"))
    moved = max(float((w_a[n] - base[n]).abs().max()) for n in w_a if n in base)
    apart = max(float((w_a[n] - w_b[n]).abs().max()) for n in w_a)
    assert moved > 1e-2  # the fit trained: a gradient difference would show
    # measured: 6e-4 x moved on one process, 2e-4 x under DDP; without the hand-made gradient average 0.14 x
    assert apart < 1e-2 * moved, (trainer, apart, moved)


def _masks_and_gradcache_agrees(masking, other, batch) -> None:
    """On the collated `batch` (3 keys per query), `masking`'s loss is lower than `other`'s (it left false negatives
    out), and its GradCache step over mini-batches of 2 queries gives the same loss and gradients as the whole batch."""
    for m in (masking, other):
        m.encoder.eval()
    q, k = masking.encoder.encode(batch["query"], "query"), masking.encoder.encode(batch["key"], "key")
    ids, pos = batch["key_ids"], batch.get("positive_ids")
    ref = masking.compute_loss(q, k, None, "qa", ids, pos)
    assert float(ref["loss"]) < float(other.compute_loss(q, k, None, "qa", ids, pos)["loss"]) - 1e-3
    ref["loss"].backward()
    want = _grads(masking)
    out = masking._gradcache_step(batch, 2, 3)
    assert abs(float(out["loss"]) - float(ref["loss"])) < 1e-5
    out["loss"].backward()
    got = _grads(masking)
    assert all(torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4) for n in want)


def test_duplicate_keys_are_masked_through_the_collator_and_gradcache(tiny_bert):
    """loss.mask_duplicate_keys end to end on one process: the real collator gives equal ids to equal key texts, the
    module's InfoNCE leaves the repeat of a positive out (a different loss than without), and GradCache gives the
    whole batch's masked gradients."""
    from embedder.data.collator import RetrievalCollator

    losses = [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]
    masked, plain = _module(tiny_bert, losses, mask_duplicate_keys=True), _module(tiny_bert, losses)
    groups = [[f"{q} tool {j}" for j in range(3)] for q in TEXTS_Q]
    groups[1][2] = groups[0][0]  # query 1's hard negative is query 0's positive
    groups[4][1] = groups[3][0]  # and query 4's is query 3's
    items = [{"query": q, "keys": g, "teacher_scores": None, "record_kind": "qa", "dataset": "toy"}
             for q, g in zip(TEXTS_Q, groups)]
    batch = RetrievalCollator(masked.encoder.tokenizer, 64, 64)(items)
    ids = batch["key_ids"]
    assert ids.shape == (18,) and ids[1 * 3 + 2] == ids[0] and ids[4 * 3 + 1] == ids[3 * 3]
    assert len(set(ids.tolist())) == 16
    _masks_and_gradcache_agrees(masked, plain, batch)  # a repeated positive no longer counts against it


def test_loss_directions_reach_the_loss_in_a_real_fit(tmp_path, tiny_bert, monkeypatch):
    """`loss.directions=[...]` on the command line: every training step's InfoNCE adds those blocks."""
    from embedder.training import run_train

    seen = []
    real = InfoNCELoss.forward

    def spy(self, q, k, teacher_scores=None, key_ids=None, positive_ids=None):
        seen.append(self.directions)
        return real(self, q, k, teacher_scores, key_ids, positive_ids)

    monkeypatch.setattr(InfoNCELoss, "forward", spy)
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "export=false",
        "loss.directions=[query_to_doc,doc_to_query]"])))
    assert seen == [("query_to_doc", "doc_to_query")] * 2


def test_mask_duplicate_keys_reaches_the_loss_in_a_real_fit(tmp_path, tiny_bert, monkeypatch):
    """`loss.mask_duplicate_keys=true` on the command line: every training step's InfoNCE masks, with the batch's
    key ids from the data pipeline (one per key)."""
    from embedder.training import run_train

    seen = []
    real = InfoNCELoss.forward

    def spy(self, q, k, teacher_scores=None, key_ids=None, positive_ids=None):
        seen.append((self.mask_duplicate_keys, None if key_ids is None else tuple(key_ids.shape), k.shape[0]))
        return real(self, q, k, teacher_scores, key_ids, positive_ids)

    monkeypatch.setattr(InfoNCELoss, "forward", spy)
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "export=false",
        "loss.mask_duplicate_keys=true"])))
    assert len(seen) == 2 and all(mask and ids == (n,) for mask, ids, n in seen), seen


def test_known_positives_are_masked_through_the_collator_and_gradcache(tiny_bert):
    """loss.mask_known_positives end to end on one process: the collator gives each query the ids of its labelled
    positives (rows padded with its target's), the module's InfoNCE leaves another group's key that is one of them
    out (a different loss than masking duplicates only), and GradCache gives the whole batch's masked gradients."""
    from embedder.data.collator import RetrievalCollator

    losses = [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]
    known = _module(tiny_bert, losses, mask_known_positives=True)
    dedup = _module(tiny_bert, losses, mask_duplicate_keys=True)
    groups = [[f"{q} tool {j}" for j in range(3)] for q in TEXTS_Q]
    groups[2][0] = f"{groups[0][0]} today"  # query 2's positive: near query 0's (it scores high for query 0)
    groups[5][1] = f"{groups[3][0]} now"  # query 5's hard negative: near query 3's positive
    positives = [[g[0]] for g in groups]
    positives[0].append(groups[2][0])  # query 2's positive is also relevant to query 0
    positives[3] += [groups[5][1], "a tool outside this batch"]  # and query 5's hard negative to query 3
    items = [{"query": q, "keys": g, "positives": p, "teacher_scores": None, "record_kind": "qa", "dataset": "toy"}
             for q, g, p in zip(TEXTS_Q, groups, positives)]
    assert "positive_ids" not in RetrievalCollator(known.encoder.tokenizer, 64, 64)(items)  # hashed only when asked
    batch = RetrievalCollator(known.encoder.tokenizer, 64, 64, positive_ids=True)(items)
    ids, pos = batch["key_ids"], batch["positive_ids"]
    assert pos.shape == (len(TEXTS_Q), 3)
    assert pos[0].tolist() == [ids[0], ids[2 * 3], ids[0]] and pos[1].tolist() == [ids[3]] * 3
    assert ids[5 * 3 + 1] in pos[3].tolist()
    _masks_and_gradcache_agrees(known, dedup, batch)  # two fewer false negatives than masking duplicates only
    del batch["positive_ids"]  # a batch from a collator not asked for the ids: one clear error, not a silent no-op
    with pytest.raises(ValueError, match="mask_known_positives=true but the batches carry no positive_ids"):
        known.training_step(batch, 0)


def test_mask_known_positives_reaches_the_loss_in_a_real_fit(tmp_path, tiny_bert, monkeypatch):
    """`loss.mask_known_positives=true` on the command line: every training step's InfoNCE masks, with each query's
    labelled positives from its record (its drawn positive among them) through the dataset and the collator."""
    from embedder.training import run_train

    seen = []
    real = InfoNCELoss.forward

    def spy(self, q, k, teacher_scores=None, key_ids=None, positive_ids=None):
        G = k.shape[0] // q.shape[0]
        drawn_listed = positive_ids is not None and all(
            int(key_ids[b * G]) in positive_ids[b].tolist() for b in range(q.shape[0]))
        rows = None if positive_ids is None else positive_ids.shape[0]
        widths.append(0 if positive_ids is None else positive_ids.shape[1])
        seen.append((self.mask_known_positives, rows == q.shape[0], drawn_listed))
        return real(self, q, k, teacher_scores, key_ids, positive_ids)

    widths = []
    monkeypatch.setattr(InfoNCELoss, "forward", spy)
    run_train(compose(quick_overrides(tmp_path, tiny_bert, [
        "task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "report=false", "export=false",
        "loss.mask_known_positives=true"])))
    assert seen == [(True, True, True)] * 2, seen
    # the records' own lists, not only the drawn positive: 4 of the 8 toy tool records list 2 positives, and the
    # epoch's 2 batches hold all 8
    assert max(widths) == 2, widths
