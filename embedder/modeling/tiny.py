"""Write a tiny random BERT (config, weights, character WordPiece tokenizer) for tests and smoke runs.

`python -m embedder.modeling.tiny OUT_DIR` makes a folder usable as `model=tiny_bert model.model_name_or_path=OUT_DIR`.
Nothing is downloaded: the vocabulary is characters plus `##` continuations, so every word tokenises.
"""

from __future__ import annotations

import os
import string
import sys


def build_tiny_bert(out_dir: str, hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0,
                    init_std: float = 0.5) -> str:
    """`init_std`: the weights' init scale. BERT's own 0.02 gives a 32-wide random model whose [CLS] embedding is
    the same for every text (cosine 0.99999 between any two), so every ranking would be a tie; 0.5 gives texts
    distinct embeddings (cosine ~0.4-0.9), so tests that rank, train or compare two paths can fail."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden_size, max_position_embeddings=512,
                        initializer_range=init_std)
    BertModel(config).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build_tiny_bert(sys.argv[1] if len(sys.argv) > 1 else "tiny-bert"))
