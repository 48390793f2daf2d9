"""The unpadded (packed) encoder forward equals the padded one: embeddings and gradients, both poolings.

On CPU the packed attention is the per-sequence SDPA reference, so packing, position ids and pooling are tested
here without a GPU; tests/test_gpu.py compares the CUDA varlen kernel against the same padded path.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch

from embedder.modeling import unpadded
from embedder.modeling.encoder import DualEncoder

TEXTS = ["a", "what is dense retrieval", "the quick brown fox jumps over the lazy dog " * 12, "x y",
         "retrieval augmented generation with a large language model and an embedding index " * 3]


def _minilm():
    from embedder.bundled import minilm_path

    return minilm_path()


@pytest.fixture(params=["tiny", "minilm"])
def model_path(request, tiny_bert):
    return tiny_bert if request.param == "tiny" else _minilm()


def _pair(path: str, pooling: str):
    torch.manual_seed(0)
    padded = DualEncoder(path, pooling=pooling, unpadded="false", attn_implementation="sdpa")
    packed = DualEncoder(path, pooling=pooling, unpadded="true")
    packed.load_state_dict(padded.state_dict())
    for enc in (padded, packed):
        enc.eval()  # no dropout, so both paths see the same function
    return padded, packed


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_equals_padded_embeddings_and_gradients(model_path, pooling):
    padded, packed = _pair(model_path, pooling)
    assert getattr(packed.query_model, "embedder_packed", False) and not getattr(padded.query_model, "embedder_packed", False)
    batch = padded.tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.max() > 4 * lengths.min()  # very different lengths in one batch
    e_pad = padded.encode(dict(batch), "key")  # (N, d)
    e_pack = packed.encode(dict(batch), "key")
    torch.testing.assert_close(e_pack, e_pad, atol=2e-5, rtol=1e-4)
    target = torch.randn_like(e_pad)
    (e_pad * target).sum().backward()
    (e_pack * target).sum().backward()
    g_pad = dict(padded.named_parameters())
    checked = 0
    for name, p in packed.named_parameters():
        if p.grad is None:
            assert g_pad[name].grad is None or not g_pad[name].grad.any(), name
            continue
        torch.testing.assert_close(p.grad, g_pad[name].grad, atol=5e-5, rtol=1e-3, msg=name)
        checked += 1
    assert checked > 10


def test_packed_with_gradient_checkpointing_and_dropout_off(tiny_bert):
    torch.manual_seed(0)
    ref = DualEncoder(tiny_bert, pooling="mean", unpadded="false")
    ckpt = DualEncoder(tiny_bert, pooling="mean", unpadded="true", gradient_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    for m in (ref, ckpt):  # training mode (checkpointing only recomputes in training) without dropout
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        m.query_model.config.attention_probs_dropout_prob = 0.0
    batch = ref.tokenizer(TEXTS, padding=True, return_tensors="pt")
    a, b = ref.encode(dict(batch)), ckpt.encode(dict(batch))
    torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4)
    a.sum().backward()
    b.sum().backward()
    w = "query_model.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(dict(ckpt.named_parameters())[w].grad, dict(ref.named_parameters())[w].grad,
                               atol=5e-5, rtol=1e-3)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}],
                         ids=["full", "lora"])
def test_gradient_checkpointing_survives_pickling_and_trains(tiny_bert, lora):
    """A checkpointed encoder goes to spawned ranks by pickle (ddp_spawn): it pickles, and after the round trip its
    gradients equal an uncheckpointed copy's (full fine-tune and LoRA, where only the adapters train)."""
    import pickle

    if lora:
        pytest.importorskip("peft")
    torch.manual_seed(0)
    ref = DualEncoder(tiny_bert, pooling="mean", lora=lora, attention_dropout=0.0)
    ckpt = DualEncoder(tiny_bert, pooling="mean", lora=lora, attention_dropout=0.0, gradient_checkpointing=True)
    ckpt.load_state_dict(ref.state_dict())
    ckpt = pickle.loads(pickle.dumps(ckpt))
    assert ckpt.query_model.is_gradient_checkpointing and not ref.query_model.is_gradient_checkpointing
    for m in (ref, ckpt):  # training mode (checkpointing recomputes only in training) without dropout
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    batch = ref.tokenizer(TEXTS, padding=True, return_tensors="pt")
    a, b = ref.encode(dict(batch)), ckpt.encode(dict(batch))
    a.square().sum().backward()
    b.square().sum().backward()
    got = {n: p.grad for n, p in ckpt.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(g is not None for g in got.values())
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], atol=5e-5, rtol=1e-3, msg=name)


def test_pack_layout():
    batch = {"input_ids": torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])}
    p = unpadded.pack(batch)
    assert p.input_ids.tolist() == [[101, 7, 8, 102, 101, 9, 102]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert p.cu_seqlens.tolist() == [0, 4, 7] and p.max_seqlen == 4
    assert p.token_type_ids.tolist() == [[0] * 7]
    hidden = torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 2)  # (T, 2)
    assert unpadded.pool_packed(hidden, p, "cls").tolist() == [[0, 0], [4, 4]]
    assert unpadded.pool_packed(hidden, p, "mean").tolist() == [[1.5, 1.5], [5, 5]]


def test_auto_on_cpu_packs_batches_with_much_padding_and_config_key(tiny_bert):
    from embedder.modeling.encoder import CPU_PACK_MIN_PADDED_TOKENS, CPU_PACK_MIN_PADDING

    cpu = torch.device("cpu")
    ragged = torch.tensor([[1] * 256, [1] * 64 + [0] * 192] * 24)  # 48 keys, 37.5% padding (4,608 slots)
    full = torch.tensor([[1] * 256, [1] * 224 + [0] * 32] * 24)  # 6% padding: little work to skip
    small = torch.tensor([[1] * 40, [1] * 10 + [0] * 30] * 8)  # 16 queries, 37.5% padding, but 240 slots
    assert 0.06 < CPU_PACK_MIN_PADDING <= 0.375 and 240 < CPU_PACK_MIN_PADDED_TOKENS <= 4608
    enc = DualEncoder(tiny_bert, unpadded="auto")
    assert enc._run_packed(enc.query_model, cpu, ragged)
    assert not enc._run_packed(enc.query_model, cpu, full) and not enc._run_packed(enc.query_model, cpu, small)
    always = DualEncoder(tiny_bert, unpadded="true")
    assert always._run_packed(always.query_model, cpu, full)
    off = DualEncoder(tiny_bert, unpadded="false")
    assert not off._run_packed(off.query_model, cpu, ragged)
    with pytest.raises(ValueError, match="unpadded"):
        DualEncoder(tiny_bert, unpadded="sometimes")


def test_unsupported_architecture_falls_back_once(tmp_path, caplog):
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from embedder.modeling.tiny import build_tiny_bert

    src = build_tiny_bert(str(tmp_path / "bert"))
    out = tmp_path / "roberta"
    RobertaModel(RobertaConfig(vocab_size=80, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    with caplog.at_level(logging.INFO, logger="embedder.modeling.unpadded"):
        enc = DualEncoder(str(out), unpadded="auto")
    assert not getattr(enc.query_model, "embedder_packed", False)
    assert "not a supported architecture" in caplog.text
    with pytest.raises(ValueError, match="model.unpadded=auto or false"):
        DualEncoder(str(out), unpadded="true")
    unpadded._said.clear()


def test_training_module_step_packed_equals_padded(tiny_bert):
    """Through RetrieverModule.compute_loss, the loss and its gradients agree between the two paths."""
    from embedder.data.kinds import RecordKind
    from embedder.lit_module import RetrieverModule

    losses = {}
    base = DualEncoder(tiny_bert, unpadded="false")
    for mode in ("false", "true"):
        enc = DualEncoder(tiny_bert, unpadded=mode)
        enc.load_state_dict(copy.deepcopy(base.state_dict()))
        enc.eval()
        mod = RetrieverModule(enc, {"qa": RecordKind(name="qa")}, cross_device=False)
        q = enc.tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
        k = enc.tokenizer(TEXTS[1:5], padding=True, return_tensors="pt")
        out = mod.compute_loss(enc.encode(dict(q)), enc.encode(dict(k), "key"), None, "qa")
        out["loss"].backward()
        losses[mode] = (out["loss"].item(), enc.query_model.embeddings.word_embeddings.weight.grad.clone())
    # relative: the loss is ~15 here (tau 0.01), where float32 rounding alone is ~1e-6 per operation
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(losses["true"][1], losses["false"][1], atol=5e-5, rtol=1e-3)


def test_one_attention_fallback_for_encoder_and_lm(tiny_bert, caplog):
    """An attention implementation the install lacks (flash-attn is not installed here) falls back to the model's
    default, with one warning; other load errors are not swallowed."""
    import logging

    from transformers import AutoModel

    from embedder.modeling import from_pretrained_with_attention

    with caplog.at_level(logging.WARNING):
        model = from_pretrained_with_attention(AutoModel, tiny_bert, "flash_attention_2")
    assert model.config._attn_implementation != "flash_attention_2"
    assert "attn_implementation=flash_attention_2 is not available" in caplog.text
    with pytest.raises(OSError):
        from_pretrained_with_attention(AutoModel, tiny_bert + "-missing", "sdpa")


def test_attention_dropout_can_be_switched_off_for_training(tiny_bert):
    """model.attention_dropout=0: the self-attention dropout (what transformers passes to SDPA) is 0 in training,
    hidden dropout is kept, the saved config keeps the checkpoint's value."""
    enc = DualEncoder(tiny_bert, attention_dropout=0.0)
    attn = [m for m in enc.query_model.modules() if type(m).__name__.endswith("SelfAttention")]
    assert attn and all(m.dropout.p == 0.0 for m in attn)
    default = DualEncoder(tiny_bert)
    p = default.query_model.config.attention_probs_dropout_prob
    assert all(m.dropout.p == p for m in default.query_model.modules() if type(m).__name__.endswith("SelfAttention"))
    assert enc.query_model.config.attention_probs_dropout_prob == p
    assert enc.query_model.embeddings.dropout.p == enc.query_model.config.hidden_dropout_prob


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_attention_equals_attention_per_sequence(causal, monkeypatch):
    """The CPU packed attention (sequences grouped by length, padded per group) against plain SDPA on each sequence
    alone: outputs and gradients, with grouped-query heads, a group of equal lengths (run without a mask), groups
    with padding, and a one-token sequence."""
    torch.manual_seed(0)
    lens = [5, 37, 1, 30, 37, 12, 29, 5]  # out of order: the grouping sorts them
    T, H, Hkv, Dh = sum(lens), 4, 2, 8
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    leaves = [torch.randn(T, h, Dh, requires_grad=True) for h in (H, Hkv, Hkv)]
    calls = []
    sdpa = unpadded.F.scaled_dot_product_attention
    monkeypatch.setattr(unpadded.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append((q.shape[0], q.shape[2], kw["attn_mask"] is None))
                        or sdpa(q, *a, **kw))
    out = unpadded.grouped_padded_attention(*leaves, cu, scale=Dh ** -0.5, causal=causal)  # (T, H, Dh)
    monkeypatch.undo()
    # (sequences, width, without a mask): 37 37 30 29 | 12 | 5 5 (equal: the fused kernel) | 1
    assert calls == [(4, 37, False), (1, 12, True), (2, 5, True), (1, 1, True)]
    _assert_equals_per_sequence_attention(out, leaves, cu, causal, Dh ** -0.5)


@contextlib.contextmanager
def _saved_bytes():
    """Inside the block, the tensors autograd saves for backward are counted: yields a list of their sizes (bytes)."""
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield sizes


def test_grouped_attention_with_dropout_recomputes_attention_in_backward(monkeypatch):
    """With attention dropout on CPU, each group's attention is remade in backward instead of kept: the same
    outputs, gradients (the same dropout mask, from the restored RNG state) and RNG stream afterwards (a resumed run
    draws what an uninterrupted one would) as keeping it, and autograd saves far less (no (m, H, L, L)
    probabilities)."""
    lens = [40, 33, 38, 7, 6]
    T, H, Dh = sum(lens), 4, 8
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    torch.manual_seed(1)
    data = [torch.randn(T, H, Dh) for _ in range(3)]
    w = torch.randn(T, H, Dh)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in data]
        torch.manual_seed(7)
        with _saved_bytes() as saved:
            out = unpadded.grouped_padded_attention(*leaves, cu, scale=Dh ** -0.5, dropout=0.3)
        (out * w).sum().backward()
        return out.detach(), [t.grad for t in leaves], torch.rand(3), sum(saved)

    out, grads, after, saved = run()
    monkeypatch.setattr(unpadded, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # keep the probabilities
    kept_out, kept_grads, kept_after, kept_saved = run()
    assert not torch.equal(out, unpadded.grouped_padded_attention(*data, cu, scale=Dh ** -0.5))  # dropout acted
    torch.testing.assert_close(out, kept_out, atol=0, rtol=0)
    for got, want in zip(grads, kept_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(after, kept_after, atol=0, rtol=0)
    probabilities = 4 * H * (3 * 40 ** 2 + 2 * 7 ** 2)  # fp32 (m, H, L, L) of the two groups
    assert saved < kept_saved - probabilities


@pytest.mark.parametrize("mode,checkpointing", [("auto", False), ("true", False), ("auto", True)],
                         ids=["padded", "packed", "padded+gradient-checkpointing"])
def test_encoder_with_attention_dropout_recomputes_attention(tiny_bert, monkeypatch, mode, checkpointing):
    """A training forward and backward of the encoder with attention dropout on CPU, padded (`auto` on a batch with
    little padding runs padded, through transformers' SDPA) or packed, alone or inside transformers' gradient
    checkpointing: attention is recomputed in backward, with the same embeddings and gradients as keeping it, and
    autograd saves less (under gradient checkpointing, which keeps only layer inputs in forward, the same)."""
    texts = [" ".join(["word"] * n) + " retrieval" for n in (60, 58, 61, 59)]  # little padding

    def run():
        torch.manual_seed(0)
        enc = DualEncoder(tiny_bert, pooling="mean", unpadded=mode, attention_dropout=0.3,
                          gradient_checkpointing=checkpointing)
        enc.train()
        batch = enc.tokenizer(texts, padding=True, return_tensors="pt")
        torch.manual_seed(5)
        with _saved_bytes() as saved:
            emb = enc.encode(dict(batch), "key")  # (4, d)
        emb.square().sum().backward()
        return emb.detach(), {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}, sum(saved)

    emb, grads, saved = run()
    monkeypatch.setattr(unpadded, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # keep the probabilities
    kept_emb, kept_grads, kept_saved = run()
    torch.testing.assert_close(emb, kept_emb, atol=0, rtol=0)
    assert grads.keys() == kept_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    # transformers' checkpointing keeps only each layer's input in forward, with or without ours
    assert saved == kept_saved if checkpointing else saved < kept_saved


@pytest.mark.parametrize("mode", ["auto", "true"], ids=["padded", "packed"])
def test_checkpointed_layers_do_not_recompute_attention_again(tiny_bert, attention_step, mode):
    """Attention dropout on CPU under gradient checkpointing (task=beir's default): a layer that checkpointing
    replays in backward runs its attention twice per step (forward, replay), as a layer without checkpointing does
    (forward, attention's own recompute); a checkpoint of attention inside the replayed layer would remake it a
    third time. The same embeddings and gradients either way."""
    texts = [" ".join(["word"] * n) + " retrieval" for n in (60, 58, 61, 59, 12)]

    def run(checkpointing):
        return attention_step(tiny_bert, texts, "mean", mode, checkpointing, lambda emb: emb.square().sum())

    emb, grads, forward_calls, calls_per_step, layers = run(checkpointing=False)
    ckpt_emb, ckpt_grads, ckpt_forward_calls, ckpt_calls_per_step, _ = run(checkpointing=True)
    assert forward_calls == ckpt_forward_calls and forward_calls % layers == 0  # one call per layer (and group)
    assert calls_per_step == ckpt_calls_per_step == 2 * forward_calls  # not 3x with checkpointing
    torch.testing.assert_close(ckpt_emb, emb, atol=0, rtol=0)  # the same dropout masks
    assert grads.keys() == ckpt_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _assert_equals_per_sequence_attention(out, leaves, cu, causal, scale):
    """`out`, computed from the leaves (q, k, v), equals attention on each sequence alone: values and gradients."""
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref = _per_sequence_attention(*ref_leaves, cu, causal, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-4)


def _per_sequence_attention(q, k, v, cu, causal, scale):
    """Plain SDPA on each packed sequence alone (grouped-query heads native): the reference. (T, H, Dh)."""
    parts = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))  # (1, h, L, Dh)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale,
                                                             enable_gqa=True)
        parts.append(o[0].transpose(0, 1))
    return torch.cat(parts)


# Stand-ins with the signatures `torch.nn.attention.varlen.varlen_attn` had in each PyTorch release (2.10: is_causal
# and no scale; 2.11: scale and window_size; 2.12 on: enable_gqa too). Each checks what it was given as the real
# kernel would (equal head counts unless enable_gqa) and computes with its own default scale, 1/sqrt(Dh).
def _varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert key.shape[1] == query.shape[1], "2.10 has no grouped-query attention"
    return _per_sequence_attention(query, key, value, cu_seq_q, is_causal, None)


def _varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1)):
    assert key.shape[1] == query.shape[1], "2.11 has no grouped-query attention"
    assert window_size in ((-1, -1), (-1, 0))
    return _per_sequence_attention(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


def _varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa or key.shape[1] == query.shape[1]
    return _per_sequence_attention(query, key, value, cu_seq_q, window_size == (-1, 0), scale)


@pytest.mark.parametrize("varlen", [_varlen_2_10, _varlen_2_11, _varlen_2_12], ids=["2.10", "2.11", "2.12"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_varlen_called_through_each_release_signature(varlen, causal):
    """`call_torch_varlen` adapts to the signature the installed PyTorch has (an H200 image with torch 2.11 failed
    on `enable_gqa`): grouped-query heads, a non-default scale and causality give the per-sequence attention,
    values and gradients, whichever arguments the kernel takes."""
    torch.manual_seed(0)
    lens = [5, 17, 1, 9]
    T, H, Hkv, Dh = sum(lens), 4, 2, 8
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    leaves = [torch.randn(T, h, Dh, requires_grad=True) for h in (H, Hkv, Hkv)]
    scale = 0.3  # not 1/sqrt(8): a kernel without `scale` must be compensated
    out = unpadded.call_torch_varlen(varlen, *leaves, cu, max(lens), scale, causal)
    _assert_equals_per_sequence_attention(out, leaves, cu, causal, scale)
