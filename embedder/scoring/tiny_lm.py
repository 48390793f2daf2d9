"""A tiny random causal LM (Llama architecture) and a byte-level BPE tokenizer, built offline in about a second.

`python -m embedder.scoring.tiny_lm OUT_DIR` writes a folder usable as `lm=tiny lm.model_name_or_path=OUT_DIR`;
`lm=tiny` alone builds one into the cache (`cached_tiny_lm`). The tokenizer is trained on a fixed built-in text, is
byte-level (every string tokenises, French and code included), adds a BOS token like Llama's, and gives character
offsets. The weights are seeded: the same seed gives the same model.
"""

from __future__ import annotations

import os
import sys
import tempfile

CORPUS = """\
Knowledge: The quick brown fox jumps over the lazy dog.
Question: What does the fox jump over?
Answer: The fox jumps over the lazy dog.
Speaker 1: Where did you go on vacation last year?
Speaker 2: I went hiking in the mountains with my family, and we camped by a lake.
In-context examples help a language model answer a new question in the same format as the demonstrations.
Retrieval-augmented generation finds passages in a corpus and gives them to the model as knowledge.
The Manhattan Project produced the first nuclear weapons during the Second World War.
def score(model, tokens): return model(tokens).logits.log_softmax(-1)
Le passage de l'onde nerveuse est une question de physiologie; les phenomenes sont nombreux.
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024, punctuation ! ? . , ; : ' " ( ) [ ] { } - + * / = < > # @ & % $
"""

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "embedder", "tiny-lm-v1")


def build_tiny_tokenizer(vocab_size: int = 320):
    """A fast byte-level BPE tokenizer (PreTrainedTokenizerFast) trained on CORPUS; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1024)


def build_tiny_lm(out_dir: str, seed: int = 0, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                  max_position_embeddings: int = 1024) -> str:
    """Write a tiny random LlamaForCausalLM and its tokenizer to `out_dir`; returns `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=max_position_embeddings, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                         initializer_range=0.5)  # large init: the random LM prefers some tokens clearly
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def cached_tiny_lm(cache_dir: str | None = None) -> str:
    """The tiny LM folder in the cache, built atomically on first use."""
    cache_dir = os.path.expanduser(cache_dir or DEFAULT_CACHE)
    if os.path.isfile(os.path.join(cache_dir, "config.json")):
        return cache_dir
    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-lm-", dir=parent)
    build_tiny_lm(tmp)
    try:
        os.replace(tmp, cache_dir)
    except OSError:  # another process won the race; use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir


if __name__ == "__main__":
    print(build_tiny_lm(sys.argv[1] if len(sys.argv) > 1 else "tiny-lm"))
