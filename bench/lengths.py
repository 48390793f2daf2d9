"""Realistic text lengths for benchmarks: MS MARCO-like queries and passages made of one-token words.

Queries are ~N(20, 6) tokens; passages are lognormal with a mean of ~92 tokens, capped at the max length (MS MARCO
passages under a BERT tokenizer). Words are real vocabulary entries that tokenise to exactly one token, so a text of
n words is n tokens plus [CLS]/[SEP] and the padding a batch gets is the padding real data gets.
"""

from __future__ import annotations

import math
import random

QUERY_MEAN, QUERY_SD = 20.0, 6.0
KEY_MEAN, KEY_SIGMA = 92.0, 0.6  # lognormal: mean exp(mu + sigma^2 / 2) = 92 tokens
KEY_MU = math.log(KEY_MEAN) - KEY_SIGMA ** 2 / 2


def one_token_words(tokenizer, n: int = 5000) -> list[str]:
    """Up to n lowercase vocabulary words (3+ letters) that the tokenizer keeps as one token, also after a space."""
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) >= 3)
    words = []
    for w in vocab:
        # one token at the start of a text and after a space (byte-level BPE vocabularies differ between the two)
        if all(len(tokenizer(form, add_special_tokens=False)["input_ids"]) == 1 for form in (w, " " + w)):
            words.append(w)
            if len(words) >= n:
                break
    if len(words) < 50:
        raise ValueError(f"the tokenizer has only {len(words)} one-token words; use a word-piece vocabulary")
    return words


def query_length(rng: random.Random, max_len: int) -> int:
    """Tokens of one query, [CLS] and [SEP] included."""
    return max(4, min(max_len, round(rng.gauss(QUERY_MEAN, QUERY_SD))))


def key_length(rng: random.Random, max_len: int) -> int:
    """Tokens of one passage, [CLS] and [SEP] included."""
    return max(4, min(max_len, round(rng.lognormvariate(KEY_MU, KEY_SIGMA))))


def text_of(n_tokens: int, words: list[str], rng: random.Random) -> str:
    """A text of `n_tokens` tokens once [CLS] and [SEP] are added."""
    return " ".join(rng.choice(words) for _ in range(max(1, n_tokens - 2)))


def msmarco_texts(n: int, kind: str, words: list[str], rng: random.Random, max_len: int = 256) -> list[str]:
    """n query-like (`kind="query"`) or passage-like (`"key"`) texts."""
    draw = query_length if kind == "query" else key_length
    return [text_of(draw(rng, max_len), words, rng) for _ in range(n)]
