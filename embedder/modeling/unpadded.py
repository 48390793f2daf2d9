"""Unpadded (packed) forward: a batch's tokens in one (1, T) row, no padding, variable-length attention.

Used by the encoder (BERT family; Llama-style decoders, causal or made bidirectional) and by LM scoring (causal).

Why hand-written: transformers runs BERT on padded (N, L) batches, and its packed path for decoders needs the
flash-attn package (SDPA gets a dense (T, T) block mask instead). We keep transformers' modules (embeddings, rotary
positions, linears, norms, gradient checkpointing, DeepSpeed hooks all unchanged) and register one attention
function with its `AttentionInterface`, so only attention is ours (causal where the module says `is_causal`):

- a packed call (`cu_seqlens` in the kwargs) runs `torch.nn.attention.varlen.varlen_attn` (Flash Attention kernels,
  CUDA, fp16/bf16), or `flash_attn_varlen_func` when flash-attn is installed (it also applies attention dropout);
  elsewhere (CPU, fp32) the linears stay packed and attention alone is padded, per group of similar-length
  sequences (`grouped_padded_attention`), which gives the same numbers, so packing is tested without a GPU;
- a padded call (no `cu_seqlens`) is transformers' own SDPA attention, so one loaded model serves both paths;
- with attention dropout on CPU, either path recomputes attention in backward (`recompute_attention`), except in
  layers that gradient checkpointing replays whole (`mark_layer_checkpointed`).

`pack(inputs)` turns a padded, right-padded tokenizer batch into the packed form; `pool_packed` pools it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

ATTN_NAME = "embedder_packed"
# architectures whose position ids are 0..len-1 per sequence and whose attention goes through AttentionInterface
SUPPORTED_MODEL_TYPES = ("bert",)
# decoders whose rotary positions come from `position_ids` and whose layers pass attention kwargs through (full
# attention only: a sliding window would need the window in the kernel call)
SUPPORTED_CAUSAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_registered = False
_said: set[str] = set()


def say_once(key: str, msg: str, *args, level: int = logging.INFO) -> None:
    if key not in _said:
        _said.add(key)
        log.log(level, msg, *args)


@dataclass
class Packed:
    """One batch of N sequences packed into T tokens.

    input_ids, token_type_ids, position_ids: (1, T) int64; cu_seqlens: (N+1,) int32 starts of each sequence, T last;
    max_seqlen: the longest sequence; lengths: (N,) int64; seq_index: (T,) int64 which sequence a token belongs to.
    """

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: torch.Tensor
    seq_index: torch.Tensor


def pack(inputs: dict[str, torch.Tensor]) -> Packed:
    """Packed form of a right-padded batch (`input_ids`, `attention_mask`, optional `token_type_ids`, each (N, L))."""
    mask = inputs["attention_mask"].bool()  # (N, L)
    lengths = mask.sum(1)  # (N,)
    flat = mask.flatten().nonzero().squeeze(1)  # (T,) positions of real tokens, sequence by sequence
    input_ids = inputs["input_ids"].flatten()[flat]  # (T,)
    tt = inputs.get("token_type_ids")
    token_type_ids = tt.flatten()[flat] if tt is not None else torch.zeros_like(input_ids)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    seq_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)  # (T,)
    position_ids = torch.arange(input_ids.numel(), device=lengths.device) - cu[:-1].long()[seq_index]  # (T,)
    return Packed(input_ids[None], token_type_ids[None], position_ids[None], cu, int(lengths.max()), lengths,
                  seq_index)


def pool_packed(hidden: torch.Tensor, p: Packed, pooling: str) -> torch.Tensor:
    """(T, d) packed hidden states -> (N, d): the first token (`cls`), the last (`last_token`) or the mean over each
    sequence's tokens."""
    if pooling == "cls":
        return hidden[p.cu_seqlens[:-1].long()]  # (N, d)
    if pooling == "last_token":
        return hidden[p.cu_seqlens[1:].long() - 1]  # (N, d)
    sums = torch.zeros(p.lengths.numel(), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    sums = sums.index_add(0, p.seq_index, hidden)  # (N, d)
    return sums / p.lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)


def _flash_attn():
    try:
        from flash_attn import flash_attn_varlen_func  # optional package, imported lazily
        return flash_attn_varlen_func
    except ImportError:
        return None


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    except ImportError:  # PyTorch < 2.10
        return None


def kernel_available(device: torch.device | str) -> bool:
    """Whether packed attention has a GPU kernel on `device` (else `grouped_padded_attention` runs)."""
    return torch.device(device).type == "cuda" and (_torch_varlen() is not None or _flash_attn() is not None)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                     scale: float, dropout: float = 0.0, causal: bool = False,
                     recompute: bool | None = None) -> torch.Tensor:
    """Attention within each packed sequence. q: (T, H, Dh); k, v: (T, Hkv, Dh), Hkv dividing H (grouped-query);
    cu: (N+1,) int32; `causal`: each token sees only the tokens before it in its sequence; `recompute`: see
    `grouped_padded_attention`. Returns (T, H, Dh)."""
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        # autocast casts SDPA's inputs to its dtype, but not a custom kernel's: rotary decoders (Llama, Qwen) hand
        # over fp32 q/k under bf16 autocast (fp32 hidden states times fp32 cos/sin), which would miss the kernel
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        fa = _flash_attn()
        if fa is not None:  # grouped-query attention is native there
            return fa(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scale, causal=causal)
        varlen_attn = _torch_varlen()
        if varlen_attn is not None:
            if dropout > 0:
                say_once("dropout", "unpadded attention: torch varlen_attn has no dropout, so attention-probability "
                         "dropout (p=%.2f) is not applied (hidden dropout is); install flash-attn to apply it",
                         dropout, level=logging.WARNING)
            return call_torch_varlen(varlen_attn, q, k, v, cu, max_len, scale, causal)
    return grouped_padded_attention(q, k, v, cu, scale, dropout, causal, recompute)


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def call_torch_varlen(varlen_attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                      scale: float | None, causal: bool) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn` through whichever signature this PyTorch has. It changed in every
    release since it appeared: 2.10 takes `is_causal` and no scale; 2.11 takes `scale` and `window_size`; 2.12 adds
    `enable_gqa`. Missing arguments are emulated: key/value heads repeated for grouped-query attention (what
    `enable_gqa` avoids), the query pre-multiplied for the scale. Shapes as in `varlen_attention`."""
    params = _parameters(varlen_attn)
    kwargs = {}
    if k.shape[1] != q.shape[1]:  # grouped-query: (T, Hkv, Dh) keys for (T, H, Dh) queries
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (T, H, Dh)
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel's own scale is 1/sqrt(Dh)
            q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:
        kwargs["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


# The CPU path groups sequences of similar length: a group starts at its longest sequence and takes the next
# (shorter) ones while they are at least GROUP_MIN_FILL of it, so padding within a group stays under 1/0.75^2 of
# its attention work, and attention costs about sum(L_i^2) rather than N * Lmax^2.
GROUP_MIN_FILL = 0.75


def grouped_padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float,
                             dropout: float = 0.0, causal: bool = False,
                             recompute: bool | None = None) -> torch.Tensor:
    """Attention within each packed sequence without a variable-length kernel (CPU, fp32): the linears stay packed
    and attention alone is padded, per group of similar-length sequences (GROUP_MIN_FILL). q: (T, H, Dh); k, v:
    (T, Hkv, Dh); cu: (N+1,) int32; `recompute`: remake attention in backward (None: `recompute_attention`).
    Returns (T, H, Dh).

    Why this shape, measured on CPU (MiniLM training step, 2 cores): a per-sequence SDPA loop was 2-3x slower than
    fully padded SDPA on long texts (slicing q, k, v per sequence makes every backward fill a full (T, H, Dh)
    gradient), and one SDPA call padded to the batch's longest gave only 1.19x padded SDPA at MS MARCO lengths
    (attention stayed N * Lmax^2; with attention dropout CPU SDPA materialises those probabilities). Here all
    groups share one flat padded buffer: one index_copy in, `split` into the groups (its backward is one `cat`),
    one SDPA call per group (without a mask where every sequence fills the group: the fused kernel), one `cat` and
    one index_select out.
    """
    gqa = k.shape[1] != q.shape[1]
    lengths = (cu[1:] - cu[:-1]).long()  # (N,)
    lens = lengths.tolist()  # on the host already (a CPU tensor): no device sync
    groups: list[tuple[list[int], int]] = []  # (sequence indices, padded length)
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if groups and lens[i] >= GROUP_MIN_FILL * groups[-1][1]:
            groups[-1][0].append(i)
        else:
            groups.append(([i], lens[i]))
    base = [0] * len(lens)  # where each sequence starts in the flat (sum_g n_g * L_g) buffer
    sizes, off = [], 0
    for seqs, width in groups:
        for j, i in enumerate(seqs):
            base[i] = off + j * width
        sizes.append(len(seqs) * width)
        off += len(seqs) * width
    seq = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lengths)  # (T,) sequence of each token
    pos = torch.arange(q.shape[0], device=q.device) - cu[:-1].long()[seq]  # (T,) position within its sequence
    dest = torch.tensor(base, dtype=torch.long, device=q.device)[seq] + pos  # (T,) row in the flat buffer

    def padded(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (T, h, Dh) -> per group (n_g * L_g, h, Dh)
        return t.new_zeros(off, *t.shape[1:]).index_copy(0, dest, t).split(sizes)

    if recompute is None:
        recompute = recompute_attention(dropout, q)
    outs = []
    for (seqs, width), qg, kg, vg in zip(groups, padded(q), padded(k), padded(v)):
        m = len(seqs)
        glen = lengths[seqs]  # (m,)
        mask = None
        if int(glen.min()) < width:  # some sequence is shorter than the group's width: mask its padding keys
            mask = (torch.arange(width, device=q.device)[None, :] < glen[:, None])[:, None, None, :]  # (m,1,1,L)
            if causal:
                mask = mask & torch.ones(width, width, dtype=torch.bool, device=q.device).tril()[None, None]

        # the group's shape is bound as arguments: a recompute in backward runs after the loop has moved on
        def attend(qg, kg, vg, m=m, width=width, mask=mask):  # (m * L, h, Dh) x3 -> (m, H, L, Dh)
            qg, kg, vg = (t.view(m, width, *t.shape[1:]).transpose(1, 2) for t in (qg, kg, vg))  # (m, h, L, Dh)
            return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                  is_causal=causal and mask is None, enable_gqa=gqa)

        if recompute:  # keep q, k, v only; the probabilities (and the same dropout mask) are remade in backward
            o = checkpoint(attend, qg, kg, vg, use_reentrant=False, preserve_rng_state=True)
        else:
            o = attend(qg, kg, vg)
        outs.append(o.transpose(1, 2).reshape(m * width, *o.shape[1:2], o.shape[-1]))
    return torch.cat(outs).index_select(0, dest)  # (T, H, Dh)


# set on the attention modules of the layers that transformers' gradient checkpointing replays in backward
LAYER_CHECKPOINTED = "_embedder_layer_checkpointed"


def recompute_attention(dropout: float, q: torch.Tensor, module: nn.Module | None = None) -> bool:
    """Whether attention is remade in backward rather than kept (Megatron's selective recomputation): with attention
    dropout on CPU, where SDPA's fused kernel has no dropout and its unfused path keeps every layer's (N, H, L, L)
    probabilities and their dropped copy for backward (MiniLM, 16 queries + 64 keys of 256 tokens: about 4 GiB of
    peak memory). Recomputed, a layer keeps q, k, v as the fused kernel does, for one more attention forward in
    backward; `checkpoint` restores the RNG state first, so the dropout mask and the gradients are the same.
    Not inside a layer that gradient checkpointing replays (`mark_layer_checkpointed`): that layer keeps nothing of
    its forward, and its replay in backward holds one layer's probabilities at a time, so a checkpoint of attention
    there would only compute it a third time."""
    if getattr(module, LAYER_CHECKPOINTED, False):
        return False
    return dropout > 0 and torch.is_grad_enabled() and q.device.type == "cpu"


def mark_layer_checkpointed(model: nn.Module) -> None:
    """After `gradient_checkpointing_enable`: mark the attention modules (those `_attention` receives) of every
    layer that will be replayed in backward, so `recompute_attention` does not checkpoint attention inside it a
    second time."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
            for mod in layer.modules():
                if type(mod).__name__.endswith("Attention"):
                    setattr(mod, LAYER_CHECKPOINTED, True)


def _causal(module) -> bool:
    """Whether this attention module is causal: its own flag, unless the model's config turns causality off
    (`config.is_causal = False`: a decoder made bidirectional, see the encoder's `bidirectional`)."""
    return bool(getattr(module, "is_causal", False)) and getattr(getattr(module, "config", None), "is_causal", True)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    """transformers attention function: packed when called with `cu_seqlens`, else transformers' SDPA."""
    cu = kwargs.get("cu_seqlens")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs.setdefault("is_causal", _causal(module))  # without a mask, SDPA would take the module's flag
        attend = functools.partial(sdpa_attention_forward, module, attention_mask=attention_mask, dropout=dropout,
                                   scaling=scaling, **kwargs)
        if recompute_attention(dropout, query, module):
            return checkpoint(attend, query, key, value, use_reentrant=False, preserve_rng_state=True)
        return attend(query, key, value)
    # query: (1, H, T, Dh), key/value: (1, Hkv, T, Dh) -> (T, H, Dh), (T, Hkv, Dh)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attention(q, k, v, cu, int(kwargs["max_seqlen"]), scaling, dropout, causal=_causal(module),
                           recompute=recompute_attention(dropout, q, module))  # (T, H, Dh)
    return out[None], None  # (1, T, H, Dh), no weights


def _mask(*, attention_mask=None, **kwargs):
    """The mask builder under our name: SDPA's for padded calls; none for a call without a padding mask. A packed call
    has none, and its sequences are separated by `cu_seqlens`; SDPA's builder would make a dense (T, T) block mask
    from the position ids, which costs T^2 memory and is then ignored."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the attention function and its mask builder with transformers; idempotent."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(ATTN_NAME, _attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _mask)
        _registered = True
    return ATTN_NAME


def supports(config) -> bool:
    """Whether the packed encoder forward is correct for this architecture."""
    return getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES and getattr(
        config, "position_embedding_type", "absolute") == "absolute"


def supports_causal(config) -> bool:
    """Whether the packed causal-LM forward is correct for this architecture (full attention in every layer)."""
    return getattr(config, "model_type", None) in SUPPORTED_CAUSAL_MODEL_TYPES and not getattr(
        config, "sliding_window", None) and not getattr(config, "use_sliding_window", False)


def packed_hidden(model, p: Packed) -> torch.Tensor:
    """Run a transformers encoder or decoder (loaded with attn_implementation=ATTN_NAME) on a packed batch: (T, d).
    Decoders take no token types; their rotary positions restart at 0 in every sequence (`position_ids`)."""
    types = {"token_type_ids": p.token_type_ids} if supports(model.config) else {}
    out = model(input_ids=p.input_ids, position_ids=p.position_ids, cu_seqlens=p.cu_seqlens, max_seqlen=p.max_seqlen,
                **types)
    return out.last_hidden_state[0]
