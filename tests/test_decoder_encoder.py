"""Decoder LLMs as the encoder: the packed (unpadded) forward equals the padded one for a Llama-style decoder
(causal and bidirectional, forward and gradients), and `model.bidirectional=true` really makes attention look both
ways, in our encoder and in the sentence-transformers export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedder.modeling.encoder import DualEncoder
from embedder.scoring.tiny_lm import build_tiny_lm

TEXTS = ["the quick brown fox jumps over the lazy dog", "a lake", "retrieval finds passages for questions",
         "tools", "a longer text about rivers, lakes and the sea, and the fish in them"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    return build_tiny_lm(str(tmp_path_factory.mktemp("lm")))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_packed_decoder_equals_padded(tiny_lm, bidirectional, pooling):
    """Same embeddings and the same parameter gradients from the packed forward (CPU: packed linears, attention
    padded per length group) as from transformers' padded SDPA forward, with right and left padding."""
    encoders = {mode: DualEncoder(tiny_lm, pooling=pooling, unpadded=mode, bidirectional=bidirectional).eval()
                for mode in ("false", "true")}
    assert getattr(encoders["true"].query_model, "embedder_packed", False)
    out = {}
    for side in ("right", "left"):
        for mode, enc in encoders.items():
            enc.tokenizer.padding_side = side
            batch = dict(enc.tokenizer(TEXTS, padding=True, return_tensors="pt"))
            enc.zero_grad()
            emb = enc.encode(batch, "key")  # (5, d)
            (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
            out[side, mode] = (emb.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()
                                               if p.grad is not None})
    for side in ("right", "left"):
        (a, ga), (b, gb) = out[side, "false"], out[side, "true"]
        assert torch.allclose(a, b, atol=1e-5), side
        assert ga.keys() == gb.keys() and len(ga) > 5
        # left padding shifts the padded side's rotary positions (relative attention is unchanged, the float
        # rounding of cos/sin is not): measured up to 6e-5 of the largest gradient; a wrong mask is O(1)
        assert all(torch.allclose(ga[n], gb[n], atol=1e-3 * float(ga[n].abs().max()), rtol=1e-3) for n in ga), side


def test_bidirectional_attention_reaches_back_and_is_exported(tmp_path, tiny_lm):
    """Causal: the first token never sees what follows it, so texts that differ only at the end give the same first
    hidden state. Bidirectional: they differ. The export keeps it (config.json `is_causal: false`): the
    sentence-transformers model encodes like ours, one text alone (no padding mask) and in a padded batch."""
    from sentence_transformers import SentenceTransformer

    def first_token(enc: DualEncoder, texts: list[str]) -> torch.Tensor:
        batch = dict(enc.tokenizer(texts, padding=True, return_tensors="pt"))
        with torch.no_grad():
            return enc.query_model(**batch).last_hidden_state[:, 0]  # (2, d)

    pair = ["the lake is deep", "the lake is cold"]
    causal = DualEncoder(tiny_lm, pooling="mean").eval()
    both = DualEncoder(tiny_lm, pooling="mean", bidirectional=True).eval()
    h = first_token(causal, pair)
    assert torch.allclose(h[0], h[1], atol=1e-6)
    h = first_token(both, pair)
    assert not torch.allclose(h[0], h[1], atol=1e-3)

    both.save(str(tmp_path / "export"), max_seq_length=32)
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert st[0].auto_model.config.is_causal is False
    ours = both.encode_texts(TEXTS, kind="key", max_length=32).numpy()
    assert np.allclose(st.encode(TEXTS), ours, atol=1e-5)
    assert np.allclose(st.encode(TEXTS[:1]), ours[:1], atol=1e-5)  # alone: no padding mask at all
    assert not np.allclose(causal.encode_texts(TEXTS, kind="key", max_length=32).numpy(), ours, atol=1e-3)


def test_bidirectional_is_refused_for_an_encoder(tiny_bert):
    with pytest.raises(ValueError, match="model.bidirectional=True: .* 'bert' model"):
        DualEncoder(tiny_bert, bidirectional=True)


@pytest.mark.slow
@pytest.mark.parametrize("pooling", [None, "last_token"])
def test_the_bundled_smollm2_embeds_packed_like_padded(pooling):
    """model=smollm2: the bundled SmolLM2-135M (4-bit GGUF, de-quantised on load) as a decoder embedder, with the
    config's pooling (mean: its appended `<|im_end|>` collapsed under LoRA) and with last-token pooling (every text
    ends with its EOS): the packed forward equals the padded one, and different texts embed apart. Built as
    `train.py task=beir model=smollm2` builds it (task=beir's attention_dropout=0 included: it used to stop that
    command at start)."""
    from embedder.bundled import smollm2_path
    from tests.conftest import compose

    cfg = compose(["task=beir", "model=smollm2", *([f"model.pooling={pooling}"] if pooling else [])]).model
    assert cfg.attention_dropout == 0 and cfg.pooling == (pooling or "mean")
    enc = DualEncoder(smollm2_path(), gguf_file=cfg.gguf_file, pooling=cfg.pooling, append_eos=cfg.append_eos,
                      attention_dropout=cfg.attention_dropout, unpadded="true").eval()
    assert enc.query_model.config.model_type == "llama" and enc.dim == 576
    assert all(m.attention_dropout == 0 for m in enc.query_model.modules() if type(m).__name__ == "LlamaAttention")
    ends_with_eos = enc.tokenizer("a lake")["input_ids"][-1] == enc.tokenizer.eos_token_id
    assert ends_with_eos == (cfg.pooling == "last_token")
    batch = dict(enc.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        packed = enc.encode(batch, "key")
        enc.unpadded = "false"
        padded = enc.encode(batch, "key")
    assert torch.allclose(packed, padded, atol=1e-4)
    sims = padded @ padded.T
    assert float(sims[~torch.eye(len(TEXTS), dtype=torch.bool)].max()) < 0.99


@pytest.mark.parametrize("unpadded", ["false", "true"])
def test_checkpointed_decoder_layers_compute_attention_twice(tiny_lm, attention_step, unpadded):
    """Attention dropout under gradient checkpointing on a Llama-style decoder, padded and packed: each layer's
    attention runs twice per training step (forward and the layer's replay), not three times (the packed path
    without checkpointing recomputes attention itself; `unpadded=false` loads transformers' own SDPA, which keeps
    the probabilities instead); the same embeddings and gradients as without checkpointing."""

    def run(checkpointing):
        return attention_step(tiny_lm, TEXTS, "last_token", unpadded, checkpointing,
                              lambda emb: (emb * torch.linspace(-1, 1, emb.shape[1])).sum())[:4]

    emb, grads, forward_calls, step_calls = run(False)
    ckpt_emb, ckpt_grads, ckpt_forward_calls, ckpt_step_calls = run(True)
    assert forward_calls == ckpt_forward_calls > 0
    assert ckpt_step_calls == 2 * forward_calls
    assert step_calls == (2 * forward_calls if unpadded == "true" else forward_calls)
    torch.testing.assert_close(ckpt_emb, emb, atol=0, rtol=0)
    assert grads.keys() == ckpt_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("unpadded", ["false", "true"])
def test_attention_dropout_reaches_decoder_attention(tiny_lm, unpadded):
    """model.attention_dropout on a Llama-style decoder (task=beir sets 0 for every model): it sets the attention
    modules' own `attention_dropout`, which the padded and the packed paths pass to attention in training. With 0.5
    two training forwards differ (a Llama has no other dropout); with 0 they are equal; in eval mode it is off."""
    for p in (0.5, 0.0):
        enc = DualEncoder(tiny_lm, pooling="last_token", unpadded=unpadded, attention_dropout=p)
        attn = [m for m in enc.query_model.modules() if type(m).__name__.endswith("Attention")]
        assert attn and all(m.attention_dropout == p for m in attn)
        batch = dict(enc.tokenizer(TEXTS, padding=True, return_tensors="pt"))
        enc.train()
        torch.manual_seed(0)
        a = enc.encode(batch, "query").detach()
        b = enc.encode(batch, "query").detach()
        assert torch.allclose(a, b, atol=1e-6) == (p == 0.0), p
        enc.eval()
        assert torch.allclose(enc.encode(batch, "query").detach(), enc.encode(batch, "query").detach(), atol=1e-6)


def test_an_export_loads_under_a_gguf_model_config(tmp_path, tiny_lm):
    """`model=smollm2` names a .gguf file inside the bundled folder; the export of a model trained from it is a
    safetensors folder. Evaluating or mining with that export (`model=smollm2 model_path=<export>`) loads the export
    (it used to look for the .gguf inside it and fail) and encodes as the trained model did."""
    from embedder.retrieval.encode.model import load_encoder

    trained = DualEncoder(tiny_lm, pooling="last_token").eval()
    trained.save(str(tmp_path / "export"), max_seq_length=32)
    cfg = {"_target_": "embedder.modeling.encoder.DualEncoder", "model_name_or_path": "bundled-folder",
           "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "pooling": "last_token"}
    loaded = load_encoder(cfg, str(tmp_path / "export")).eval()
    assert torch.allclose(loaded.encode_texts(TEXTS, kind="key", max_length=32),
                          trained.encode_texts(TEXTS, kind="key", max_length=32), atol=1e-5)


def test_an_export_keeps_the_end_token_it_was_trained_with(tmp_path, tiny_lm):
    """A model trained with `model.append_eos=false` (each text's own last token pooled) and exported: evaluated or
    mined under a model config whose `append_eos` is auto (model=smollm2's), its texts get no EOS appended: the
    export's tokenizer ends texts as in training."""
    from embedder.retrieval.encode.model import load_encoder

    trained = DualEncoder(tiny_lm, pooling="last_token", append_eos=False).eval()
    trained.save(str(tmp_path / "export"), max_seq_length=32)
    cfg = {"_target_": "embedder.modeling.encoder.DualEncoder", "model_name_or_path": tiny_lm,
           "pooling": "last_token", "append_eos": "auto"}
    loaded = load_encoder(cfg, str(tmp_path / "export")).eval()
    assert loaded.tokenizer("a lake")["input_ids"][-1] != loaded.tokenizer.eos_token_id
    assert torch.allclose(loaded.encode_texts(TEXTS, kind="key", max_length=32),
                          trained.encode_texts(TEXTS, kind="key", max_length=32), atol=1e-5)


@pytest.mark.slow
def test_a_lora_fine_tune_of_the_bundled_smollm2_exports_and_reloads(tmp_path):
    """`train.py task=beir model=smollm2 model.lora=...` trains and then exports: the export used to fail after
    training ("The model is quantized with gguf and is not serializable"), because the de-quantised model kept the
    GGUF quantizer. Now the merged export is a plain model folder that sentence-transformers and
    `embedder.evaluate model=smollm2 model_path=<export>` load, encoding as the trained model does."""
    import json

    from sentence_transformers import SentenceTransformer

    from embedder.bundled import smollm2_path
    from embedder.retrieval.encode.model import load_encoder
    from tests.conftest import compose

    cfg = compose(["task=beir", "model=smollm2"]).model
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    enc = DualEncoder(smollm2_path(), gguf_file=cfg.gguf_file, pooling=cfg.pooling, lora=lora)
    trainable = [p for p in enc.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in trainable) < 0.01 * sum(p.numel() for p in enc.parameters())
    batch = dict(enc.tokenizer(TEXTS, padding=True, return_tensors="pt"))
    emb = enc.encode(batch, "key")  # (5, 576)
    (emb @ emb.T).logsumexp(-1).mean().backward()  # any loss: a step that moves the adapters off zero
    torch.optim.SGD(trainable, lr=1.0).step()
    enc.eval()
    ours = enc.encode_texts(TEXTS, kind="key", max_length=64).numpy()

    enc.save(str(tmp_path / "export"), max_seq_length=64)
    with open(tmp_path / "export" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    st = SentenceTransformer(str(tmp_path / "export"), device="cpu")
    assert np.allclose(st.encode(TEXTS), ours, atol=1e-4)
    reloaded = load_encoder(cfg, str(tmp_path / "export")).eval()  # as embedder.evaluate model=smollm2 loads it
    assert np.allclose(reloaded.encode_texts(TEXTS, kind="key", max_length=64).numpy(), ours, atol=1e-4)
    untrained = DualEncoder(smollm2_path(), gguf_file=cfg.gguf_file, pooling=cfg.pooling).eval()
    assert not np.allclose(untrained.encode_texts(TEXTS, kind="key", max_length=64).numpy(), ours, atol=1e-3)


def _ends_with(tok, token_id: int) -> bool:
    ids = tok(["the quick brown fox jumps", "a"], truncation=True, max_length=4)["input_ids"]
    return all(row[-1] == token_id for row in ids) and len(ids[0]) == 4  # kept when truncating too


def test_append_eos_keeps_an_embedders_own_end_token_or_appends_the_one_named(tiny_lm, tmp_path):
    """last_token pooling appends the tokenizer's EOS unless the tokenizer already ends every text with a special
    token of its own (Qwen3-Embedding appends `<|endoftext|>`, its pad token, not its EOS `<|im_end|>`: replacing it
    embeds unlike the model was trained); `model.append_eos=<token>` appends that token instead (a chat model whose
    EOS ends a turn); a token outside the vocabulary is refused by name."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    plain = DualEncoder(tiny_lm, pooling="last_token").tokenizer
    assert _ends_with(plain, plain.eos_token_id)  # nothing appended before: its EOS is
    own = tmp_path / "own-end"  # the tiny LM, its tokenizer ending texts with <pad> as Qwen3-Embedding's does
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 <pad>:0", special_tokens=[("<s>", tok.bos_token_id), ("<pad>", tok.pad_token_id)])
    tok.save_pretrained(own)
    kept = DualEncoder(tiny_lm, tokenizer_name_or_path=str(own), pooling="last_token").tokenizer
    assert _ends_with(kept, kept.pad_token_id) and kept.pad_token_id != kept.eos_token_id
    named = DualEncoder(tiny_lm, pooling="last_token", append_eos="<pad>").tokenizer
    assert _ends_with(named, named.pad_token_id)
    assert DualEncoder(tiny_lm, pooling="last_token", append_eos=False).tokenizer("a")["input_ids"][-1] != \
        plain.eos_token_id
    with pytest.raises(ValueError, match=r"model.append_eos='<\|im_end\|>' is not a token"):
        DualEncoder(tiny_lm, pooling="last_token", append_eos="<|im_end|>")
