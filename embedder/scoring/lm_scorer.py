"""`LMScorer`: log p(answer | key, query) under a causal LM, the teacher signal of the LLM-Embedder recipe.

What is scored (reference §5.1, with its approximations made exact):
- The template is rendered as text and tokenised once, with the tokenizer's special tokens (Llama: BOS); a trailing
  EOS some tokenizers append is removed. The scored tokens are the answer's: every token that overlaps the answer's
  characters (from the offset mapping), so a token such as " The" that carries the separator space counts, as the
  reference's `len(tok("Answer: " + a)) - len(tok("Answer:"))` trick intends.
- A key is first cut to `key_max_length` tokens, as the reference does: `decode(encode(key)[:key_max_length])`.
- A prompt longer than the model context is shortened from the knowledge side (the key loses tokens from its end);
  if it is still too long with an empty key, the text is cut from the left. Both are counted in `stats`.
- The score is the mean per-token log-likelihood of the answer (`normalize=mean`, the reference's `-nll`), or the sum.

How it runs: all inputs of a batch of records are sorted by length (longest first) and grouped under `batch_size`
and `max_tokens_per_batch`. Only the logits of the answer positions are computed (`logits_to_keep`), and the answer
log-likelihoods are summed per input on the device, one transfer per batch.
- Packed (`packed=auto` on Llama-style decoders, `embedder.modeling.unpadded`): a batch's inputs are concatenated
  into one row with per-input position ids and variable-length causal attention, so no compute goes to padding and
  `max_tokens_per_batch` counts real tokens.
- Padded (other architectures, or fp32 on a GPU): right-padded (padding after the last real token cannot change a
  causal LM's outputs), and `max_tokens_per_batch` counts padded tokens.
Scores do not depend on batch size, order or packing beyond float rounding; tests check this.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedder import stopping
from embedder.errors import ModelLoadErrors
from embedder.scoring.templates import Template

log = logging.getLogger(__name__)

NORMALIZE = ("mean", "sum")
# Scoring defaults, shared by LMScorer and ScoreSettings (configs/score.yaml states them; a test checks they agree)
BATCH_SIZE = 16  # sequences per forward pass
MAX_TOKENS_PER_BATCH = 16384  # tokens per forward pass (real tokens when packed)
KEY_MAX_LENGTH = 512  # keys are cut to this many tokens first (the reference)
# Texts are cut by characters before they are tokenised, to this many characters per token of the budget, so memory
# follows the token budget, not the longest record (a 5 MB query was tokenised whole, once per candidate). No
# tokenizer of a scoring LM makes tokens this long on text, so the tokens kept after the cut are the same.
CHARS_PER_TOKEN = 32
# model_name_or_path that builds (once, cached) the tiny random LM of embedder.scoring.tiny_lm
TINY_RANDOM = "tiny-random"


@dataclass
class Encoded:
    """One LM input: token ids (prompt then answer) and how many trailing tokens are the scored answer."""

    input_ids: list[int]
    n_answer: int


@dataclass(frozen=True)
class Job:
    """One thing to score: a template filled with a record's fields, a key and an answer."""

    template: Template
    record: dict[str, Any]
    key: str
    answer: str


class LMScorer:
    """Scores (key, answer) pairs with a causal LM. Heavy libraries are imported on construction, not at import."""

    def __init__(self, model_name_or_path: str, *, name: str | None = None, gguf_file: str | None = None,
                 revision: str | None = None, dtype: str = "auto", device: str = "auto", device_map: Any = None,
                 attn_implementation: str | None = "sdpa", trust_remote_code: bool = False,
                 max_length: int | None = None, key_max_length: int | None = KEY_MAX_LENGTH, normalize: str = "mean",
                 batch_size: int = BATCH_SIZE, max_tokens_per_batch: int | None = MAX_TOKENS_PER_BATCH,
                 packed: str | bool = "auto",
                 load_model: bool = True, tiny_dir: str | None = None):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize={normalize!r}; valid: {', '.join(NORMALIZE)}")
        packed = {True: "true", False: "false"}.get(packed, str(packed).lower())
        if packed not in ("auto", "true", "false"):
            raise ValueError(f"packed={packed!r}; valid: auto, true, false")
        self.packed = packed
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if str(model_name_or_path) == TINY_RANDOM:
            from embedder.scoring.tiny_lm import cached_tiny_lm

            model_name_or_path = cached_tiny_lm(tiny_dir)
        self.model_name_or_path = str(model_name_or_path)
        self.name = name or os.path.basename(self.model_name_or_path.rstrip("/"))
        self.gguf_file, self.revision = gguf_file, revision
        self.key_max_length, self.normalize = key_max_length, normalize
        self.batch_size, self.max_tokens_per_batch = batch_size, max_tokens_per_batch
        self.stats: Counter = Counter()
        self.model = None
        self.device = None
        self._max_length = max_length
        with ModelLoadErrors(self.model_name_or_path, "lm.model_name_or_path"):
            self.tokenizer = self._load_tokenizer(trust_remote_code)
            if load_model:
                self._load_model(dtype, device, device_map, attn_implementation, trust_remote_code)

    # ------------------------------------------------------------------------------------------------ loading
    def _hub_kwargs(self, trust_remote_code: bool) -> dict[str, Any]:
        kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.revision:
            kw["revision"] = self.revision
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw

    def _load_tokenizer(self, trust_remote_code: bool):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.model_name_or_path, **self._hub_kwargs(trust_remote_code))
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{self.model_name_or_path}: LM scoring needs a fast (Rust) tokenizer for character "
                             f"offsets, got {type(tok).__name__}")
        return tok

    def _load_model(self, dtype: str, device: str, device_map: Any, attn_implementation: str | None,
                    trust_remote_code: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if device == "auto":
            from embedder.distributed import local_rank

            device = f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"
        from embedder.dtypes import resolve_dtype

        torch_dtype = resolve_dtype(dtype, device) or torch.float32
        dtype = str(torch_dtype).removeprefix("torch.")
        kw = self._hub_kwargs(trust_remote_code)
        kw["dtype"] = torch_dtype
        if device_map is not None:
            kw["device_map"] = device_map
        if self.gguf_file:
            import importlib.util

            if importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("gguf") is None:
                raise ModuleNotFoundError("loading a GGUF model needs `pip install accelerate gguf`")
        if self.packed != "false":
            from transformers import AutoConfig

            from embedder.modeling import unpadded

            config = AutoConfig.from_pretrained(self.model_name_or_path, **self._hub_kwargs(trust_remote_code))
            if unpadded.supports_causal(config) and device_map is None:
                attn_implementation = unpadded.register()  # padded calls still run transformers' SDPA
            elif self.packed == "true":
                raise ValueError(f"packed=true: {self.model_name_or_path} ({config.model_type}) cannot run packed "
                                 f"(supported: {', '.join(unpadded.SUPPORTED_CAUSAL_MODEL_TYPES)} without sliding "
                                 f"windows, on one device); set packed=auto or false")
        t0 = time.perf_counter()
        from embedder.modeling.encoder import from_pretrained_with_attention

        model = from_pretrained_with_attention(AutoModelForCausalLM, self.model_name_or_path, attn_implementation, **kw)
        if device_map is None:
            model.to(device)
        self.attach_model(model)
        log.info("loaded %s (%s, %s, %s) in %.1f s", self.model_name_or_path, dtype, self.device,
                 getattr(model.config, "_attn_implementation", "?"), time.perf_counter() - t0)

    def attach_model(self, model) -> None:
        """Use an already loaded causal LM (it must match the tokenizer); scoring runs on its device."""
        import inspect

        model.eval()
        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else None

    def run_packed(self) -> bool:
        """Whether batches run packed: the model was loaded with the packed attention and, on a GPU, a variable-length
        kernel runs in its dtype (fp16/bf16); on CPU the exact per-sequence loop runs. Padded otherwise, said once."""
        import torch

        from embedder.modeling import unpadded

        if self.model is None or self.packed == "false" or \
                getattr(self.model.config, "_attn_implementation", None) != unpadded.ATTN_NAME:
            return False
        unpadded.register()  # a process that unpickled the model registers it anew
        if self.packed == "true" or self.device.type == "cpu":
            return True
        if unpadded.kernel_available(self.device) and self.model.dtype in (torch.float16, torch.bfloat16):
            return True
        unpadded.say_once(f"lm-fallback:{self.device.type}:{self.model.dtype}", "LM scoring: no variable-length "
                          "kernel for %s in %s; running padded SDPA", self.device, self.model.dtype)
        return False

    @property
    def max_length(self) -> int | None:
        """The context the prompt must fit in: the `max_length` setting, else the model's position limit."""
        if self._max_length:
            return int(self._max_length)
        if self.model is not None:
            n = getattr(self.model.config, "max_position_embeddings", None)
            if n:
                return int(n)
        n = getattr(self.tokenizer, "model_max_length", None)
        return int(n) if n and n < 1_000_000 else None

    @property
    def pad_id(self) -> int:
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    # ------------------------------------------------------------------------------------------------ encoding
    def _cut_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """Map each distinct key to itself, or to its first `key_max_length` tokens decoded (reference behaviour)."""
        uniq = list(dict.fromkeys(keys))
        if not self.key_max_length or not uniq:
            return {k: k for k in uniq}
        chars = self.key_max_length * CHARS_PER_TOKEN
        ids = self.tokenizer([k[:chars] for k in uniq], add_special_tokens=False, truncation=True,
                             max_length=self.key_max_length + 1)["input_ids"]
        out = {}
        for key, kid in zip(uniq, ids):
            out[key] = self.tokenizer.decode(kid[: self.key_max_length]) if len(kid) > self.key_max_length else key
        return out

    def _render(self, job: Job, key: str) -> tuple[str, int]:
        """The template's text and where its answer starts, cut from the left to `max_length * CHARS_PER_TOKEN`
        characters (the answer ends the text, so it is kept; the prompt is then fitted by tokens)."""
        rendered = job.template.render(job.record, key, job.answer)
        text, start = rendered.text, rendered.answer_start
        limit = self.max_length
        if limit is not None and len(text) > limit * CHARS_PER_TOKEN:
            cut = len(text) - limit * CHARS_PER_TOKEN
            text, start = text[cut:], max(0, start - cut)
            self.stats["texts_cut_by_characters"] += 1
        return text, start

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        enc = self.tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        eos = self.tokenizer.eos_token_id
        for i in range(len(ids)):
            if eos is not None and len(ids[i]) > 1 and ids[i][-1] == eos and tuple(offsets[i][-1]) == (0, 0):
                ids[i], offsets[i] = ids[i][:-1], offsets[i][:-1]
        return ids, offsets

    @staticmethod
    def _answer_tokens(offsets: list[tuple[int, int]], answer_start: int) -> int:
        """How many trailing tokens overlap the answer (which ends the text). Never the very first token."""
        i = len(offsets) - 1
        while i >= 1 and offsets[i][1] > answer_start:
            i -= 1
        return len(offsets) - 1 - i

    def encode(self, jobs: Sequence[Job]) -> list[Encoded]:
        """Tokenise jobs (batched), cutting keys to `key_max_length` and prompts to the model context."""
        cut = self._cut_keys([j.key for j in jobs])
        keys = [cut[j.key] for j in jobs]
        self.stats["keys_truncated"] += sum(k != j.key for k, j in zip(keys, jobs))
        rendered = [self._render(j, k) for j, k in zip(jobs, keys)]
        ids, offsets = self._tokenize([text for text, _ in rendered])
        limit = self.max_length
        out = []
        for i, job in enumerate(jobs):
            n = self._answer_tokens(offsets[i], rendered[i][1])
            if limit is not None and len(ids[i]) > limit:
                ids[i], n = self._fit_context(job, keys[i], limit)
            if n < 1:
                raise ValueError(f"no answer tokens to score for task {job.template.task!r}; answer={job.answer!r}")
            out.append(Encoded(list(ids[i]), n))
        self.stats["pairs"] += len(out)
        self.stats["tokens"] += sum(len(e.input_ids) for e in out)
        self.stats["answer_tokens"] += sum(e.n_answer for e in out)
        return out

    def _fit_context(self, job: Job, key: str, limit: int) -> tuple[list[int], int]:
        """Shorten the key until the prompt fits `limit` tokens; failing that, cut the text from the left."""
        self.stats["context_truncated"] += 1
        for _ in range(8):
            text, answer_start = self._render(job, key)
            ids, offsets = self._tokenize([text])
            ids, offsets = ids[0], offsets[0]
            n = self._answer_tokens(offsets, answer_start)
            over = len(ids) - limit
            if over <= 0:
                return ids, n
            key_ids = self.tokenizer(key[: limit * CHARS_PER_TOKEN], add_special_tokens=False)["input_ids"]
            if not key_ids:
                break
            key = self.tokenizer.decode(key_ids[: max(0, len(key_ids) - over - 1)])
        # Even an empty key leaves the query + answer too long: keep the last `limit` tokens (BOS kept).
        self.stats["context_cut_left"] += 1
        bos = self.tokenizer.bos_token_id
        head = ids[:1] if bos is not None and ids and ids[0] == bos else []
        ids = head + ids[len(ids) - (limit - len(head)):]
        if n > len(ids) - 1:
            self.stats["answers_truncated"] += 1
            n = len(ids) - 1
        return ids, n

    # ------------------------------------------------------------------------------------------------ scoring
    def batches(self, encoded: Sequence[Encoded], packed: bool = False) -> list[list[int]]:
        """Index batches, longest first, under `batch_size` sequences and `max_tokens_per_batch` tokens: padded tokens
        (longest x count), or with `packed` the real tokens (the sum of lengths)."""
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].input_ids), i))
        out: list[list[int]] = []
        cur: list[int] = []
        width = total = 0
        for i in order:
            n = len(encoded[i].input_ids)
            cost = total + n if packed else max(width, n) * (len(cur) + 1)
            if cur and (len(cur) >= self.batch_size or (self.max_tokens_per_batch and cost > self.max_tokens_per_batch)):
                out.append(cur)
                cur, width, total = [], 0, 0
            cur.append(i)
            width, total = max(width, n), total + n
        if cur:
            out.append(cur)
        return out

    def score_encoded(self, encoded: Sequence[Encoded], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """Answer log-likelihood (mean per token, or sum) for each input, in input order; `on_batch(n)` after each
        batch of n inputs (progress)."""
        import torch

        if self.model is None:
            raise RuntimeError("this LMScorer was built with load_model=False")
        packed = self.run_packed()
        scores = np.zeros(len(encoded), dtype=np.float64)
        with torch.inference_mode():
            for batch in self.batches(encoded, packed=packed):
                stopping.check("scoring")  # between batches: finished parts stay and are reused
                rows = [encoded[i] for i in batch]
                logp = self._answer_logp_packed(rows) if packed else self._answer_logp_padded(rows)  # (N,) summed
                n_answer = np.array([r.n_answer for r in rows], dtype=np.float64)
                scores[batch] = logp / n_answer if self.normalize == "mean" else logp
                if on_batch is not None:
                    on_batch(len(batch))
        return scores

    def _sum_answer_logp(self, logits, targets, row_of_target, n_rows: int) -> np.ndarray:
        """Per-row sums of log p(target). logits: (K, V) at the K positions that predict the K answer tokens;
        targets, row_of_target: (K,) on the logits' device. One transfer for the batch."""
        import torch

        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (K,)
        sums = torch.zeros(n_rows, dtype=torch.float64, device=lp.device).index_add(0, row_of_target, lp.double())
        return sums.detach().cpu().numpy()  # (N,)

    def _answer_logp_packed(self, rows: list[Encoded]) -> np.ndarray:
        """One (1, T) row of concatenated inputs, position ids restarting per input, causal attention within each."""
        import torch

        lengths = [len(r.input_ids) for r in rows]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # (N,)
        ids = torch.tensor([t for r in rows for t in r.input_ids], dtype=torch.long)  # (T,)
        positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))  # (T,)
        cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)  # (N+1,)
        # the logits at position p predict token p+1: for each row, positions [end-k-1, end-1) predict its k answer
        # tokens
        keep = np.concatenate([np.arange(s + n - r.n_answer - 1, s + n - 1) for s, n, r in zip(starts, lengths, rows)])
        row_of = np.repeat(np.arange(len(rows)), [r.n_answer for r in rows])  # (K,)
        dev = self.device
        ids = ids.to(dev)  # one transfer: the input and the targets
        keep_t = torch.from_numpy(keep).to(dev, non_blocking=True)
        kw = {self._keep_arg: keep_t} if self._keep_arg else {}
        logits = self.model(input_ids=ids[None], position_ids=positions[None].to(dev), use_cache=False,
                            cu_seqlens=cu.to(dev), max_seqlen=max(lengths), **kw).logits[0]  # (K, V) or (T, V)
        if not self._keep_arg:
            logits = logits[keep_t]
        targets = ids[keep_t + 1]  # (K,)
        return self._sum_answer_logp(logits, targets, torch.from_numpy(row_of).to(dev), len(rows))

    def _answer_logp_padded(self, rows: list[Encoded]) -> np.ndarray:
        """Right-padded (N, L) batch with an attention mask."""
        import torch

        lengths = [len(r.input_ids) for r in rows]
        width = max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : lengths[r]] = torch.tensor(row.input_ids)
            mask[r, : lengths[r]] = 1
        # logits needed from the position before each row's first answer token to the row's last-but-one
        first = min(n - row.n_answer - 1 for n, row in zip(lengths, rows))
        keep = width - first
        kw = {self._keep_arg: keep} if self._keep_arg else {}
        dev = self.device
        ids = ids.to(dev)  # one transfer: the input and the targets
        logits = self.model(input_ids=ids, attention_mask=mask.to(dev), use_cache=False, **kw).logits
        offset = width - logits.shape[1]  # position of logits[:, 0]
        r_idx = np.repeat(np.arange(len(rows)), [r.n_answer for r in rows])  # (K,)
        pos = np.concatenate([np.arange(n - r.n_answer - 1, n - 1) for n, r in zip(lengths, rows)])  # (K,)
        r_t, pos_t = torch.from_numpy(r_idx).to(dev), torch.from_numpy(pos).to(dev)
        targets = ids[r_t, pos_t + 1]  # (K,)
        return self._sum_answer_logp(logits[r_t, pos_t - offset], targets, r_t, len(rows))

    def score(self, jobs: Sequence[Job], on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        return self.score_encoded(self.encode(jobs), on_batch)

    def describe(self) -> dict[str, Any]:
        """What the meta sidecar records about the scorer."""
        cfg = getattr(self.model, "config", None)
        return {"name": self.name, "model_name_or_path": self.model_name_or_path, "gguf_file": self.gguf_file,
                "revision": self.revision, "commit_hash": getattr(cfg, "_commit_hash", None),
                "dtype": str(getattr(self.model, "dtype", None)).replace("torch.", ""),
                "architecture": type(self.model).__name__ if self.model is not None else None,
                "max_length": self.max_length, "key_max_length": self.key_max_length, "normalize": self.normalize,
                "packed": self.run_packed()}
