"""DualEncoder: any Hugging Face AutoModel, pooled and (optionally) normalised. No loss code here."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from embedder.dtypes import resolve_dtype
from embedder.errors import ModelLoadErrors
from embedder.modeling import unpadded as unpadded_forward

log = logging.getLogger(__name__)

POOLING = ("cls", "mean", "last_token")  # last_token: decoder LLM embedders (e5-mistral, Qwen3-Embedding)
# `unpadded=auto` on CPU packs a batch only when at least CPU_PACK_MIN_PADDING of its (N, L) token slots, and at
# least CPU_PACK_MIN_PADDED_TOKENS slots, are padding. The CPU packed path saves the linears' work on padding and
# most of attention's (padded per group of similar lengths, with a scatter and a gather around every layer), but its
# tensor sizes follow each batch's token count, so glibc's heap grows step after step where padded shapes repeat.
# Measured (docs/benchmarks.md, MiniLM, 2 cores): MS MARCO-like keys (~64% padding) train 3.42x faster packed than
# padded SDPA; SciFact (abstracts cut at 256 tokens, 6% padding) trains padded at 3.90 GiB, flat, against 5.44 GiB
# packed, and at 4.31 GiB with only its 16-query batches (~40% padding, a few hundred slots: little work to save)
# packed.
CPU_PACK_MIN_PADDING = 0.2
CPU_PACK_MIN_PADDED_TOKENS = 2048


def from_pretrained_with_attention(auto_cls: Any, path: str, attn_implementation: str | None, **kwargs: Any):
    """`auto_cls.from_pretrained(path, attn_implementation=...)`, falling back to the model's default attention (said
    once, as a warning) when the architecture or the install lacks that one (no SDPA kernel, flash-attn missing).
    The one attention fallback of the encoder and the LM scorer; other load errors are raised as they are."""
    if not attn_implementation:
        return auto_cls.from_pretrained(path, **kwargs)
    try:
        return auto_cls.from_pretrained(path, attn_implementation=attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:
        text = str(e).lower()
        if "attn" not in text and "attention" not in text and "flash" not in text and "sdpa" not in text:
            raise
        unpadded_forward.say_once(f"attn-fallback:{attn_implementation}:{path}", "attn_implementation=%s is not "
                                  "available for %s (%s); using the model's default", attn_implementation, path, e,
                                  level=logging.WARNING)
        return auto_cls.from_pretrained(path, **kwargs)


def _load_backbone(path: str, attn_implementation: str | None, dtype: str | None, unpadded: str = "false",
                   bidirectional: bool | None = None, **kw):
    """`AutoModel.from_pretrained`; with `unpadded` ("true"/"auto") and a supported architecture (BERT family, or a
    Llama-style decoder), loaded with the packed attention function (which also runs padded calls through SDPA).
    `bidirectional` (decoders): True makes every layer attend both ways (LLM2Vec / NV-Embed style), False causal,
    None as the checkpoint's config says. It is transformers' own `config.is_causal` (>= 5.2), which the export
    keeps in config.json, so sentence-transformers loads the same attention."""
    from transformers import AutoConfig, AutoModel

    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # an adapter export (export_lora=adapter)
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        model = _load_backbone(base_path, attn_implementation, dtype, unpadded, bidirectional, **kw)
        packed = getattr(model, "embedder_packed", False)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()  # the adapters folded into the weights
        model.embedder_packed = packed
        return model
    torch_dtype = resolve_dtype(dtype) if dtype != "auto" else None  # auto: as the checkpoint stores it
    kwargs: dict[str, Any] = dict(kw)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kw.items() if k == "gguf_file"})
    if bidirectional is not None:
        if config.model_type not in unpadded_forward.SUPPORTED_CAUSAL_MODEL_TYPES:
            raise ValueError(f"model.bidirectional={bidirectional}: {path} is a {config.model_type!r} model; the "
                             f"attention direction can be set for the decoders "
                             f"{', '.join(unpadded_forward.SUPPORTED_CAUSAL_MODEL_TYPES)} (encoders such as BERT "
                             f"are bidirectional already): set model.bidirectional=null")
        config.is_causal = not bidirectional
    kwargs["config"] = config
    if unpadded != "false":
        if unpadded_forward.supports(config) or unpadded_forward.supports_causal(config):
            model = AutoModel.from_pretrained(path, attn_implementation=unpadded_forward.register(), **kwargs)
            model.embedder_packed = True  # marks a backbone that can run `packed_hidden`
            return _plain_if_dequantized(model)
        msg = (f"model.unpadded={unpadded}: {path} is not a supported architecture "
               f"({', '.join(unpadded_forward.SUPPORTED_MODEL_TYPES + unpadded_forward.SUPPORTED_CAUSAL_MODEL_TYPES)}"
               f"); running padded")
        if unpadded == "true":
            raise ValueError(msg + " is not possible: set model.unpadded=auto or false")
        unpadded_forward.say_once(f"arch:{path}", msg)
    return _plain_if_dequantized(from_pretrained_with_attention(AutoModel, path, attn_implementation, **kwargs))


def _plain_if_dequantized(model: Any) -> Any:
    """A GGUF checkpoint (model.gguf_file) that transformers de-quantised on load (on a CPU, or with no GGUF kernel:
    every layer a plain Linear) still carried the GGUF quantizer, and `save_pretrained` refuses a model that has one
    ("quantized with gguf and is not serializable"): the export of a model fine-tuned from it failed after training.
    The library's own `remove_quantization_config` drops the marker; weights kept in GGUF blocks stay quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        return model
    if any(type(m).__module__.startswith("transformers.integrations.gguf") for m in model.modules()):
        return model  # weights in GGUF blocks (a GGUF kernel was found): quantized for real
    quantizer.remove_quantization_config(model)
    return model


ADAPTER_STAGE = ".lora-adapter"  # where `save` keeps the adapters while sentence-transformers writes its files


def _keep_adapter_only(folder: str, staged: str) -> None:
    """Make the model folder `folder` a peft adapter folder: the adapters staged at `staged` replace the full
    (merged) weights and the model config; the tokenizer and sentence-transformers' files stay."""
    import shutil

    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    # exactly what `save_pretrained(..., safe_serialization=True)` wrote: the config, one weights file or the shards
    # its index names, and the index
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    written = {CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME}
    if os.path.isfile(index):
        with open(index) as f:
            written.update(json.load(f)["weight_map"].values())
    for name in written:
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name in os.listdir(staged):
        shutil.move(os.path.join(staged, name), os.path.join(folder, name))
    os.rmdir(staged)


def _append_eos(tokenizer: Any, token: str | None = None) -> None:
    """Make `tokenizer` end every sequence with `token` (None: its EOS token), kept when truncating (it counts as a
    special token), as last-token-pooled decoder embedders are trained (e5-mistral, Qwen3-Embedding). A fast
    tokenizer's post-processor becomes `[BOS] $A token` (BOS where it already adds one); the exported tokenizer.json
    keeps it, so sentence-transformers encodes the same way.

    With `token` None, a tokenizer that already ends every text with a special token is kept as it is: the
    embedder's own choice, which need not be its EOS (Qwen3-Embedding appends `<|endoftext|>`, its pad token, while
    its EOS is the chat's `<|im_end|>`), and an export of ours reloads with the token it was trained with."""
    from tokenizers import processors

    eos = token or tokenizer.eos_token
    if not getattr(tokenizer, "is_fast", False) or eos is None:
        raise ValueError("pooling=last_token appends the EOS token, which needs a fast tokenizer with an eos_token; "
                         "set model.append_eos=false to pool the last token as it is, or name the token to append")
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    if token and (eos_id is None or tokenizer.convert_ids_to_tokens(eos_id) != eos):  # unknown: the unk id
        raise ValueError(f"model.append_eos={token!r} is not a token of {tokenizer.name_or_path}'s vocabulary; name "
                         f"one of its special tokens (e.g. {tokenizer.eos_token!r}), or use true / false / auto")
    ids = tokenizer("x")["input_ids"]
    if ids and (ids[-1] == eos_id or (token is None and ids[-1] in tokenizer.all_special_ids and len(ids) > 1)):
        return  # it ends texts with that token (or, asked for none in particular, with a special token) already
    bos = tokenizer.bos_token if ids and ids[0] == tokenizer.bos_token_id else None
    head = f"{bos}:0 " if bos else ""
    specials = sorted({(t, tokenizer.convert_tokens_to_ids(t)) for t in (bos, eos) if t})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{head}$A:0 {eos}:0", pair=f"{head}$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=specials)


def _add_lora(model: nn.Module, lora: dict[str, Any]) -> Any:
    """Inject LoRA adapters into `model` in place (the `peft` library; not hand-written) and freeze everything else;
    returns the peft wrapper, which merges the adapters at export. `lora`: r, alpha, dropout, target_modules (module
    names, e.g. [query, value] for BERT, [q_proj, k_proj, v_proj, o_proj] for Llama/Qwen; null: peft's default for
    the architecture)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("model.lora needs the peft library: pip install 'embedder[lora]'") from None
    unknown = set(lora) - {"r", "alpha", "dropout", "target_modules"}
    if unknown:
        raise ValueError(f"model.lora: unknown keys {sorted(unknown)}; valid: r, alpha, dropout, target_modules")
    cfg = LoraConfig(r=int(lora.get("r", 16)), lora_alpha=float(lora.get("alpha", 2 * int(lora.get("r", 16)))),
                     lora_dropout=float(lora.get("dropout") or 0.0), bias="none",
                     target_modules=list(lora["target_modules"]) if lora.get("target_modules") else None)
    return get_peft_model(model, cfg)


def _set_attention_dropout(models: list[nn.Module], p: float) -> None:
    """Set the attention-probability dropout used in training: BERT-family self-attention keeps it as an nn.Dropout
    (`dropout`, whose `p` transformers passes to SDPA); Llama, Mistral, Qwen2/3 and SmolLM2 attention as a float
    (`attention_dropout`, passed to the attention function in training). Either way every attention path reads it
    (SDPA, the unpadded/packed one, flash-attn). An error for architectures with neither."""
    changed = 0
    for model in {id(m): m for m in models}.values():
        for mod in model.modules():
            if type(mod).__name__.endswith("SelfAttention") and isinstance(getattr(mod, "dropout", None), nn.Dropout):
                mod.dropout.p = p
                changed += 1
            elif type(mod).__name__.endswith("Attention") and isinstance(getattr(mod, "attention_dropout", None),
                                                                         float):
                mod.attention_dropout = p
                changed += 1
    if not changed:
        raise ValueError("model.attention_dropout is supported for the BERT family (MiniLM, BGE) and Llama, Mistral "
                         "and Qwen decoders; set it to null for this architecture")


class DualEncoder(nn.Module):
    """Query and key encoders (tied by default) with cls/mean pooling, an optional dense layer and L2 norm.

    Args:
        model_name_or_path: HF model folder or hub name, e.g. `BAAI/bge-base-en`.
        key_model_name_or_path: key encoder when `tie_encoders=False` (defaults to the query model).
        pooling: `cls` (first token) or `mean` (mask-weighted mean of the last hidden states).
        dense: add a bias-free `Linear(d, d)` after pooling, loaded from `dense_pooler.bin` when the folder has one.
        normalize: L2-normalise embeddings (the `cos` metric); False gives raw inner products (`ip`).
        gradient_checkpointing: recompute activations in backward to save memory.
        attn_implementation: `sdpa` where the architecture supports it; falls back to the default otherwise.
        dtype: weight dtype for loading (`fp32` for training; mixed precision comes from the trainer).
        unpadded: run the BERT family packed, without padding (`embedder.modeling.unpadded`): `auto` where a
            variable-length kernel runs (CUDA, fp16/bf16) and on CPU for batches with much padding
            (CPU_PACK_MIN_PADDING, CPU_PACK_MIN_PADDED_TOKENS); `true` always (packed linears around attention padded
            per group of similar-length sequences where there is no kernel); `false` padded.
        attention_dropout: the attention-probability dropout used in training (BERT family, Llama/Mistral/Qwen
            decoders); None keeps the checkpoint's. With dropout on those probabilities, CPU SDPA cannot use its
            fused kernel in training; attention is then recomputed in backward rather than kept
            (`unpadded.recompute_attention`; once, by the layer's replay, under gradient checkpointing). MiniLM,
            16 queries (64 tokens) and 64 keys of 256 tokens on CPU: 0.1 costs 5.5 GiB peak and 0.29 queries/s,
            0 costs 4.6 GiB and 0.52 queries/s (kept, 0.1 needed ~8-9 GiB). The exported config keeps the
            checkpoint's value.
        append_eos: end every text with a token, for `last_token` pooling (`_append_eos`): `auto` (with
            last_token), True (the tokenizer's EOS, unless it ends texts with a special token already), False, or a
            token's name. SmolLM2-135M-Instruct's EOS `<|im_end|>` ends a chat turn: its last-token embeddings are
            near-identical for every text and collapsed under LoRA (`bench/decoder_learns.py`).
    """

    def __init__(self, model_name_or_path: str, key_model_name_or_path: str | None = None, tie_encoders: bool = True,
                 pooling: str = "cls", dense: bool = False, normalize: bool = True,
                 gradient_checkpointing: bool = False, attn_implementation: str | None = "sdpa",
                 dtype: str | None = None, tokenizer_name_or_path: str | None = None,
                 unpadded: bool | str = "auto", attention_dropout: float | None = None,
                 truncate_dim: int | None = None, lora: dict[str, Any] | None = None, append_eos: bool | str = "auto",
                 bidirectional: bool | None = None, gguf_file: str | None = None):
        super().__init__()
        from transformers import AutoTokenizer

        if pooling not in POOLING:
            raise ValueError(f"pooling={pooling!r}; valid: {', '.join(POOLING)}")
        self.model_name_or_path = str(model_name_or_path)
        self.pooling, self.normalize, self.tie_encoders = pooling, bool(normalize), bool(tie_encoders)
        if truncate_dim is not None and int(truncate_dim) < 1:
            raise ValueError(f"truncate_dim={truncate_dim!r}: a positive number of leading dimensions, or null")
        self.truncate_dim = int(truncate_dim) if truncate_dim is not None else None
        if str(unpadded).lower() not in ("auto", "true", "false"):
            raise ValueError(f"unpadded={unpadded!r}; valid: auto, true, false")
        self.unpadded = str(unpadded).lower()
        with ModelLoadErrors(self.model_name_or_path):
            gguf = {"gguf_file": gguf_file} if gguf_file else {}  # a quantised checkpoint, de-quantised on load
            self.query_model = _load_backbone(self.model_name_or_path, attn_implementation, dtype, self.unpadded,
                                              bidirectional, **gguf)
        if tie_encoders:
            self.key_model = self.query_model
        else:
            key_path = str(key_model_name_or_path or model_name_or_path)
            with ModelLoadErrors(key_path, "key_model_name_or_path"):
                self.key_model = _load_backbone(key_path, attn_implementation, dtype, self.unpadded, bidirectional,
                                                **gguf)
        tok_path = str(tokenizer_name_or_path or model_name_or_path)
        with ModelLoadErrors(tok_path, "tokenizer_name_or_path" if tokenizer_name_or_path else "model_name_or_path"):
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path, **(gguf if tok_path == self.model_name_or_path
                                                                        else {}))
        if self.tokenizer.pad_token is None:  # decoder LLM tokenizers often have none; batches need one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if append_eos == "auto":
            append_eos = pooling == "last_token"
        if append_eos:  # True (the tokenizer's EOS) or a token's name
            _append_eos(self.tokenizer, append_eos if isinstance(append_eos, str) else None)
        hidden = self.query_model.config.hidden_size
        self.dense = None
        if dense:
            self.dense = nn.Linear(hidden, hidden, bias=False)
            weights = os.path.join(self.model_name_or_path, "dense_pooler.bin")
            if os.path.isfile(weights):
                self.dense.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            else:
                log.warning("dense pooling: no %s, the dense layer starts random", weights)
        for m in (self.query_model, self.key_model):
            # The backbone's own pooler (BERT's tanh head) is never used: freeze it so DDP does not wait for its
            # gradients (the reference deletes it instead, which also drops it from saved weights).
            if getattr(m, "pooler", None) is not None:
                m.pooler.requires_grad_(False)
        if attention_dropout is not None:
            _set_attention_dropout([self.query_model, self.key_model], float(attention_dropout))
        self.lora = dict(lora) if lora else None
        self._peft: list[Any] = []  # the peft wrappers (not submodules: their parameters are the backbones')
        if self.lora:
            self._peft = [_add_lora(m, self.lora) for m in {id(self.query_model): self.query_model,
                                                           id(self.key_model): self.key_model}.values()]
            trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.parameters())
            log.info("LoRA %s: %d of %d parameters trainable (%.2f%%)", self.lora, trainable, total,
                     100 * trainable / max(total, 1))
        self.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes, so dropout would stay off
        if gradient_checkpointing:
            for m in {id(self.query_model): self.query_model, id(self.key_model): self.key_model}.values():
                if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x's name; the old one warns
                    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                unpadded_forward.mark_layer_checkpointed(m)  # no second recompute of attention in those layers
                # Non-reentrant checkpointing needs no grad on its inputs, so the embedding hook transformers adds
                # for reentrant checkpointing (and LoRA) is not needed; it is a local function, so a model holding
                # it cannot be pickled to spawned ranks (ddp_spawn, the CPU multi-rank trainer).
                m.disable_input_require_grads()

    @property
    def dim(self) -> int:
        """The size of the embeddings `encode` returns (the Matryoshka prefix when `truncate_dim` is set)."""
        return min(self.truncate_dim or self.query_model.config.hidden_size, self.query_model.config.hidden_size)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "last_token":  # each row's last real token, whichever side the padding is on
            last = mask.shape[1] - 1 - mask.flip(1).to(torch.int64).argmax(dim=1)  # (N,)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, d)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (N, d)
        return hidden[:, 0]  # (N, d)

    def _run_packed(self, model, device: torch.device, attention_mask: torch.Tensor | None = None) -> bool:
        """Packed forward for this call? `auto`: on CUDA where the varlen kernel runs (fp16/bf16 weights or autocast),
        padded otherwise (said once); on CPU (packed linears, attention padded per batch) when enough of the batch's
        `attention_mask` is padding (CPU_PACK_MIN_PADDING, CPU_PACK_MIN_PADDED_TOKENS: see there)."""
        if not getattr(model, "embedder_packed", False):
            return False
        unpadded_forward.register()  # a process that unpickled the model (ddp_spawn, DataLoader) registers it anew
        if self.unpadded == "true":
            return True
        if device.type == "cpu":  # packing needs the mask; without one there is no padding to skip
            padded_slots = 0 if attention_mask is None else attention_mask.numel() - int(attention_mask.sum())
            return (padded_slots >= CPU_PACK_MIN_PADDED_TOKENS
                    and padded_slots >= CPU_PACK_MIN_PADDING * attention_mask.numel())
        half = (torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) != torch.float32) \
            or next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        if unpadded_forward.kernel_available(device) and half:
            unpadded_forward.say_once("kernel", "unpadded encoder: packed batches with variable-length attention on %s",
                                      device)
            return True
        unpadded_forward.say_once(f"fallback:{device.type}:{half}", "unpadded encoder: no variable-length kernel for "
                                  "%s in %s; running padded SDPA", device, "fp16/bf16" if half else "fp32")
        return False

    def encode(self, inputs: dict[str, torch.Tensor], kind: str = "query") -> torch.Tensor:
        """(N, d) embeddings of tokenised inputs; `kind` picks the query or key encoder."""
        model = self.query_model if kind == "query" else self.key_model
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if self._run_packed(model, inputs["input_ids"].device, inputs.get("attention_mask")):
            packed = unpadded_forward.pack(inputs)
            hidden = unpadded_forward.packed_hidden(model, packed)  # (T, d): no padding anywhere
            emb = unpadded_forward.pool_packed(hidden, packed, self.pooling)  # (N, d)
        else:
            hidden = model(**inputs).last_hidden_state  # (N, L, d)
            emb = self._pool(hidden, inputs["attention_mask"])  # (N, d)
        if self.dense is not None:
            emb = self.dense(emb.to(self.dense.weight.dtype))
        if self.truncate_dim is not None:  # a Matryoshka prefix (sentence-transformers' truncate_dim), then normalised
            emb = emb[:, :self.truncate_dim]
        if self.normalize:
            emb = F.normalize(emb, p=2, dim=-1)
        return emb

    @torch.no_grad()
    def encode_texts(self, texts: list[str], kind: str = "query", max_length: int = 256, batch_size: int = 64,
                     device: torch.device | str | None = None, batch_tokens: int | str = 0) -> torch.Tensor:
        """Encode raw texts in the length-sorted batches of every encode path (`embedder.data.encode_batches`):
        `batch_size` texts each, or with `batch_tokens` as many as fit that many padded tokens (`auto`: per device).
        Returns (N, d) float32 on the CPU, in the order of `texts`."""
        from embedder.data.encode_batches import (
            pad_batch,
            pad_id_of,
            resolve_batch_tokens,
            sorted_batches,
            token_lengths,
            tokenize_compact,
        )

        was_training = self.training
        self.eval()
        device = device or next(self.parameters()).device
        ids, types = tokenize_compact(self.tokenizer, texts, max_length)
        pad_id, left = pad_id_of(self.tokenizer)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)  # (N, d)
        for pos in sorted_batches(token_lengths(ids), batch_size, resolve_batch_tokens(batch_tokens, device)):
            batch = {k: v.to(device) for k, v in pad_batch(ids, types, pos, pad_id, left).items()}
            out[torch.from_numpy(pos)] = self.encode(batch, kind).float().cpu()
        self.train(was_training)
        return out

    # ----------------------------------------------------------------------------------------- export
    def save(self, out_dir: str, prompts: dict[str, str] | None = None, max_seq_length: int = 256,
             matryoshka_dims: list[int] | None = None, lora_export: str = "merged") -> None:
        """Write a Hugging Face `save_pretrained` folder that is also a sentence-transformers model.

        With LoRA, `lora_export="merged"` folds the adapters into the weights (a plain model); `"adapter"` keeps
        them as a peft adapter folder (adapter_config.json + adapter_model.safetensors, megabytes) that names the
        base model (`base_model_name_or_path`: the hub name, or the local path trained from), which
        sentence-transformers and `load_encoder` load under it (peft needed; tied encoders only).

        Tied encoders: one model folder. Untied: one sentence-transformers model whose `Router` sends queries
        (`encode_query`, prompt `query`) and documents (`encode_document`) to their own encoder; each encoder is a
        full HF model folder inside it (`query_0_Transformer/`, `document_0_Transformer/`, named in
        `embedder_config.json`). The task instructions are stored as sentence-transformers `prompts`.
        """
        import shutil

        from sentence_transformers import SentenceTransformer, models

        if lora_export not in ("merged", "adapter"):
            raise ValueError(f"export_lora={lora_export!r}; valid: merged, adapter")
        if lora_export == "adapter" and not self.tie_encoders:  # config_check says so before training
            raise ValueError("export_lora=adapter needs tied encoders (sentence-transformers cannot load adapters "
                             "inside its query/document Router)")
        os.makedirs(out_dir, exist_ok=True)
        meta = {"pooling": self.pooling, "normalize": self.normalize, "dense": self.dense is not None,
                "tie_encoders": self.tie_encoders, "max_seq_length": max_seq_length, "prompts": prompts or {},
                **({"matryoshka_dims": [int(d) for d in matryoshka_dims]} if matryoshka_dims else {})}
        st_kw = {"device": "cpu", "prompts": prompts or {}, "similarity_fn_name": "cosine" if self.normalize else "dot"}
        if self.tie_encoders:
            SentenceTransformer(modules=self._st_modules(self.query_model, out_dir, max_seq_length, lora_export),
                                **st_kw).save(out_dir)
            self._save_dense(out_dir)
            if lora_export == "adapter":
                _keep_adapter_only(out_dir, os.path.join(out_dir, ADAPTER_STAGE))
        else:
            # sentence-transformers writes each route's modules into its own subfolders; the encoders are staged
            # as HF folders first, and the staging folders removed after.
            stage = {kind: os.path.join(out_dir, f".stage-{kind}") for kind in ("query", "document")}
            try:
                router = models.Router.for_query_document(
                    self._st_modules(self.query_model, stage["query"], max_seq_length),
                    self._st_modules(self.key_model, stage["document"], max_seq_length))
                SentenceTransformer(modules=[router], **st_kw).save(out_dir)
            finally:
                for folder in stage.values():
                    shutil.rmtree(folder, ignore_errors=True)
            meta.update(query_encoder="query_0_Transformer", key_encoder="document_0_Transformer")
            self._save_dense(os.path.join(out_dir, "query_0_Transformer"))
        with open(os.path.join(out_dir, "embedder_config.json"), "w") as f:
            json.dump(meta, f, indent=2)

    def _save_dense(self, folder: str) -> None:
        if self.dense is not None:  # our own reload reads it back from the query encoder's folder
            torch.save(self.dense.state_dict(), os.path.join(folder, "dense_pooler.bin"))

    def _st_modules(self, model, folder: str, max_seq_length: int, lora_export: str = "merged") -> list:
        """sentence-transformers modules for one encoder (saved as an HF folder at `folder` first): Transformer,
        Pooling, the dense layer, Normalize; with LoRA and `lora_export="adapter"`, the adapters are also staged in
        `folder/ADAPTER_STAGE` for `save`. Its classes keep the format right across its versions instead of
        hand-writing modules.json and friends."""
        from sentence_transformers import models

        wrapper = next((w for w in self._peft if w.get_base_model() is model), None)
        if wrapper is not None and lora_export == "adapter":
            # kept aside: `save` puts them in place of the full weights once sentence-transformers has written its
            # files (its own save of a peft model goes through transformers' adapter support, which needs peft >=
            # 0.22, newer than some installs have)
            wrapper.save_pretrained(os.path.join(folder, ADAPTER_STAGE), safe_serialization=True)
        if wrapper is not None:  # LoRA: the sentence-transformers modules hold a plain model, adapters merged in place
            wrapper.merge_and_unload()
            self._peft.remove(wrapper)
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        # plain text in, as embedder encodes it: sentence-transformers 5 otherwise renders every text through the
        # tokenizer's chat template when it has one (SmolLM2-Instruct's: a system prompt around each text), and the
        # export's embeddings did not match the trained model's (cosine ~0.5)
        text_only = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}
        modules = [models.Transformer(folder, max_seq_length=max_seq_length, modality_config=text_only,
                                      module_output_name="token_embeddings"),
                   models.Pooling(model.config.hidden_size,
                                  pooling_mode="lasttoken" if self.pooling == "last_token" else self.pooling)]
        if self.dense is not None:
            hidden = model.config.hidden_size
            dense = models.Dense(hidden, hidden, bias=False, activation_function=nn.Identity())
            dense.linear.weight.data.copy_(self.dense.weight.data.float().cpu())
            modules.append(dense)
        if self.normalize:
            modules.append(models.Normalize())
        return modules
