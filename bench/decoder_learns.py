"""Does a decoder embedder learn at all under a pooling? A few LoRA steps on a handful of real (query, positive)
pairs, in-batch negatives only, before spending hours on a protocol run (issue 25).

    python bench/decoder_learns.py --train <split>/prepared/train.json               # bundled SmolLM2, both poolings
    python bench/decoder_learns.py --train ... --poolings mean last_token:noeos --pairs 16 --steps 12 --lr 1e-4

A pooling `last_token:noeos` pools each text's own last token (`model.append_eos=false`) instead of an appended EOS;
`last_token:<|endoftext|>` appends that token instead of the tokenizer's EOS (`model.append_eos=<token>`).

Each pooling starts from the same weights and seed and takes `--steps` AdamW steps on the same `--pairs` pairs (the
first ones of the file: its query and first positive), with embedder's own encoder (`DualEncoder`, LoRA through peft,
the training path `train.py` uses) and loss (`InfoNCELoss`). Per step it prints the loss beside ln(pairs), the loss
when every score is equal, and the mean cosine between different documents. The verdict:
- `collapses`: the loss ends within 10% of ln(pairs) and the documents moved together (their mean cosine rose): the
  embeddings are becoming one point, the cheapest way down from a loss above ln(pairs). A protocol run in this state
  learns nothing (session 20: last-token pooling of SmolLM2-135M-Instruct, ToolLens dev nDCG@10 0.019);
- `learns`: the loss ends below ln(pairs) and below where it started, and the documents did not move together;
- `unclear` otherwise (more steps, or another learning rate).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pairs_of(path: str, n: int) -> tuple[list[str], list[str]]:
    """The first `n` rows of a prepared train.json with a positive: (queries, their first positives)."""
    queries, docs = [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            if row.get("pos"):
                queries.append(row["query"])
                docs.append(row["pos"][0])
            if len(queries) == n:
                break
    if len(queries) < 2:
        sys.exit(f"{path}: {len(queries)} rows with a positive; in-batch negatives need at least 2")
    return queries, docs


def run(pooling: str, queries: list[str], docs: list[str], steps: int, lr: float, max_length: int,
        temperature: float) -> list[tuple[float, float]]:
    """(loss, mean doc-doc cosine) before each of `steps` steps, and after the last."""
    import torch

    from embedder.bundled import smollm2_path
    from embedder.losses.contrastive import InfoNCELoss
    from embedder.modeling.encoder import DualEncoder

    torch.manual_seed(0)
    name, _, flag = pooling.partition(":")
    enc = DualEncoder(smollm2_path(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", pooling=name,
                      append_eos=False if flag == "noeos" else flag or "auto",
                      lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                       "o_proj"]})
    loss_fn = InfoNCELoss(temperature=temperature)
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=lr)
    off_diagonal = ~torch.eye(len(docs), dtype=torch.bool)
    out = []
    for step in range(steps + 1):
        q = enc.encode(dict(enc.tokenizer(queries, padding=True, truncation=True, max_length=max_length,
                                          return_tensors="pt")), "query")  # (N, d)
        k = enc.encode(dict(enc.tokenizer(docs, padding=True, truncation=True, max_length=max_length,
                                          return_tensors="pt")), "key")  # (N, d): G = 1, in-batch negatives only
        loss = loss_fn(q, k)
        cosine = (k @ k.T)[off_diagonal].mean().item()  # embeddings are normalised
        out.append((loss.item(), cosine))
        print(f"{pooling:>10} step {step:2d}: loss {loss.item():.3f} (ln {len(docs)} = {math.log(len(docs)):.3f}), "
              f"mean doc-doc cosine {cosine:.3f}", flush=True)
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return out


def verdict(trace: list[tuple[float, float]], n: int) -> str:
    (loss0, cos0), (loss1, cos1) = trace[0], trace[-1]
    if abs(loss1 - math.log(n)) <= 0.1 * math.log(n) and cos1 > cos0:
        return "collapses"
    if loss1 < math.log(n) and loss1 < loss0 and cos1 <= cos0:
        return "learns"
    return "unclear"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="a prepared train.json (query, pos) of a BEIR split")
    ap.add_argument("--poolings", nargs="+", default=["last_token", "mean"],
                    help="cls, mean, last_token; last_token:noeos (no token appended), last_token:<token> (that one)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4, help="smollm2lora's rate")
    ap.add_argument("--temperature", type=float, default=0.05, help="task=beir's")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    queries, docs = pairs_of(args.train, args.pairs)
    results = {p: run(p, queries, docs, args.steps, args.lr, args.max_length, args.temperature) for p in args.poolings}
    for pooling, trace in results.items():
        print(f"{pooling}: loss {trace[0][0]:.3f} -> {trace[-1][0]:.3f}, doc-doc cosine {trace[0][1]:.3f} -> "
              f"{trace[-1][1]:.3f}: {verdict(trace, len(docs))}")


if __name__ == "__main__":
    main()
