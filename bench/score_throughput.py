"""LM-scoring throughput: embedder's LMScorer vs the reference's approach, same model, same inputs, same run.

Reference approach (run_lm_score.py + LM.compute_nlls): inputs in file order, batches of 4, left padding to the
longest in the batch, the full-vocabulary logits of every position, masked cross-entropy averaged over the answer
tokens. Ours: inputs sorted by length and packed under a token budget, right padding, logits only for the answer
positions (`logits_to_keep`). Both start from the same rendered texts; tokenisation is included in both timings.
Prints scored candidates/s and tokens/s (real tokens, padding excluded) for each side, the ratio, and the largest
score difference between the two (a correctness check: it should be float noise).

    python bench/score_throughput.py                             # bundled SmolLM2 on CPU, a few toy qa records
    python bench/score_throughput.py --device cuda --records 8 --candidates 101 --repeat 8   # a GPU
    python bench/score_throughput.py --lm tiny                   # the tiny random LM (plumbing only)
    python bench/score_throughput.py --lengths msmarco --pairs 1000 --device cuda --random-init --shape llama2-7b

`--lengths msmarco` replaces the toy records by MS MARCO-like pairs: knowledge passages lognormal with a mean of ~150
words, questions ~N(12, 4) words, answers of 8-40 words (prompts of ~200 tokens), made of words the LM's tokenizer
keeps whole, so the padding a batch gets is the padding real data gets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TOY_QA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                      "llm-embedder-toy", "qa.json")
QA = "Knowledge: {key}\n\nQuestion: {query}\n\nAnswer: {answer}"


def load_jobs(path: str, records: int, candidates: int, repeat: int):
    from embedder.scoring.lm_scorer import Job
    from embedder.scoring.templates import Template

    template = Template("qa", QA, strip=True)
    jobs = []
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()][:records]
    for _ in range(repeat):
        for r in recs:
            jobs += [Job(template, r, k, r["answers"][0]) for k in (r["pos"] + r["neg"])[:candidates]]
    return jobs


def msmarco_jobs(tokenizer, pairs: int, seed: int = 0):
    """`pairs` MS MARCO-like (knowledge, question, answer) jobs; see the module docstring."""
    import math
    import random

    from lengths import one_token_words

    from embedder.scoring.lm_scorer import Job
    from embedder.scoring.templates import Template

    rng = random.Random(seed)
    words = one_token_words(tokenizer)
    template = Template("qa", QA, strip=True)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, n)))

    sigma = 0.6
    mu = math.log(150) - sigma ** 2 / 2
    jobs = []
    for _ in range(pairs):
        record = {"query": text(round(rng.gauss(12, 4))) + "?"}
        key = text(min(400, round(rng.lognormvariate(mu, sigma))))
        jobs.append(Job(template, record, key, text(rng.randint(8, 40))))
    return jobs


def reference_scores(scorer, jobs, batch_size: int = 4):
    """run_lm_score.py's path: tokenise with special tokens, score the last n tokens with
    n = len(tok("Answer: " + a)) - len(tok("Answer:")), left-pad batches of 4 in file order, full logits."""
    import torch

    tok, model = scorer.tokenizer, scorer.model
    tok.padding_side = "left"
    eos = tok.eos_token_id
    base = len(tok("Answer:")["input_ids"])
    rows = []
    for j in jobs:
        ids = tok(j.template.render(j.record, j.key, j.answer).text)["input_ids"]
        if eos is not None and ids[-1] == eos:
            ids = ids[:-1]
        n = len(tok("Answer: " + j.answer.lstrip())["input_ids"]) - base
        rows.append((ids, n))
    out, real_tokens, padded_tokens = [], 0, 0
    pad = scorer.pad_id
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            batch = rows[b: b + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, -100)
            for r, (ids, n) in enumerate(batch):
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                mask[r, width - len(ids):] = 1
                labels[r, width - n:] = torch.tensor(ids[len(ids) - n:])
            real_tokens += int(mask.sum())
            padded_tokens += input_ids.numel()
            logits = model(input_ids=input_ids.to(scorer.device), attention_mask=mask.to(scorer.device)).logits
            logits, labels = logits[:, :-1].float(), labels[:, 1:].to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    reduction="none").view(labels.shape)
            valid = (labels != -100).sum(-1)
            out += (-(nll.sum(-1) / valid)).tolist()
    return out, real_tokens, padded_tokens


def ours(scorer, jobs):
    enc = scorer.encode(jobs)
    scores = scorer.score_encoded(enc)
    real = sum(len(e.input_ids) for e in enc)
    packed = scorer.run_packed()
    padded = real if packed else sum(len(b) * max(len(enc[i].input_ids) for i in b) for b in scorer.batches(enc))
    return scores.tolist(), real, padded


def ours_padded(scorer, jobs):
    old, scorer.packed = scorer.packed, "false"
    try:
        return ours(scorer, jobs)
    finally:
        scorer.packed = old


SHAPES = {  # architecture sizes for --random-init --shape (vocabulary: the tokenizer's)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False),
}


def random_model(path: str, shape: str | None, device: str, dtype: str, vocab: int, packed: str):
    """Random weights with the config at `path` (optionally resized to a SHAPES entry), built on the device:
    throughput only, no download and no weight file to carry."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    for k, v in SHAPES.get(shape, {}).items() if shape else ():
        setattr(cfg, k, v)
    cfg.vocab_size = max(cfg.vocab_size, vocab)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    from embedder.modeling import unpadded

    attn = unpadded.register() if packed != "false" and unpadded.supports_causal(cfg) else "sdpa"  # as LMScorer loads
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation=attn)
    return model


def sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm", default="smollm2", help="smollm2 (bundled), tiny, or a model folder / Hub id")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--data", default=TOY_QA, help="a qa JSON-lines file (default: the reference toy qa.json)")
    ap.add_argument("--lengths", default="toy", choices=["toy", "msmarco"],
                    help="toy: the reference's toy qa records; msmarco: realistic prompt and answer lengths")
    ap.add_argument("--pairs", type=int, default=1000, help="with --lengths msmarco: (passage, answer) pairs")
    ap.add_argument("--records", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=16, help="keys per record (pos first)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat the inputs (GPU timings need more work)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=32, help="ours: sequences per batch")
    ap.add_argument("--max-tokens", type=int, default=16384, help="ours: tokens per batch (real if packed, else padded)")
    ap.add_argument("--packed", default="auto", choices=["auto", "true", "false"], help="ours: score.py's `packed`")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per side (best kept)")
    ap.add_argument("--random-init", action="store_true", help="random weights from --lm's config (throughput only)")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="with --random-init: resize the model")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    from embedder.scoring.lm_scorer import TINY_RANDOM, LMScorer

    path, gguf = args.lm, args.gguf_file
    if args.lm == "smollm2":
        from embedder.bundled import smollm2_path

        path, gguf = smollm2_path(), "SmolLM2-135M-Instruct.Q4_1.gguf"
    elif args.lm == "tiny":
        path = TINY_RANDOM
    scorer = LMScorer(path, gguf_file=gguf, dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                      max_tokens_per_batch=args.max_tokens, packed=args.packed, load_model=not args.random_init,
                      name=os.path.basename(args.lm.rstrip("/")))
    if args.random_init:
        scorer.attach_model(random_model(path, args.shape, args.device, args.dtype, len(scorer.tokenizer),
                                         args.packed))
    if args.lengths == "msmarco":
        jobs = msmarco_jobs(scorer.tokenizer, args.pairs)
    else:
        jobs = load_jobs(args.data, args.records, args.candidates, args.repeat)
    sides = [("reference", reference_scores), ("embedder", ours)]
    if scorer.run_packed():
        sides.append(("embedder-padded", ours_padded))
    for _, fn in sides:  # warm-up (kernels, allocator) on a few inputs, for every path
        fn(scorer, jobs[:4])

    # Rounds alternate the order (ref, ours, ours, ref, ...) and each side keeps its best time, so load from other
    # processes on a shared machine penalises neither side systematically.
    results: dict = {}
    times: dict = {name: [] for name, _ in sides}
    for round_ in range(args.rounds):
        for name, fn in (sides if round_ % 2 == 0 else sides[::-1]):
            sync(scorer.device)
            t0 = time.perf_counter()
            scores, real, padded = fn(scorer, jobs)
            sync(scorer.device)
            dt = time.perf_counter() - t0
            times[name].append(round(dt, 3))
            if name not in results or dt < results[name]["seconds"]:
                results[name] = {"seconds": dt, "candidates_per_s": len(jobs) / dt, "tokens_per_s": real / dt,
                                 "real_tokens": real, "padded_tokens": padded, "scores": scores,
                                 "all_seconds": times[name]}
    diff = max(abs(a - b) for a, b in zip(results["reference"]["scores"], results["embedder"]["scores"]))
    ratio = results["embedder"]["candidates_per_s"] / results["reference"]["candidates_per_s"]
    import torch

    device = (torch.cuda.get_device_name(scorer.device) if str(scorer.device).startswith("cuda")
              else f"CPU ({torch.get_num_threads()} threads)")
    n_params = sum(p.numel() for p in scorer.model.parameters()) / 1e6
    label = f"{scorer.name}{' random ' + (args.shape or 'weights') if args.random_init else ''}"
    print(f"LM {label} ({n_params:.0f}M parameters, {scorer.describe()['dtype']}) on {device}; {len(jobs)} candidates "
          + (f"(MS MARCO-like, {sum(r['real_tokens'] for r in results.values()) // 2 // len(jobs)} tokens each on "
             f"average)" if args.lengths == "msmarco" else
             f"({args.records} records x {args.candidates}, x{args.repeat})") + f"; best of {args.rounds} rounds")
    print(f"{'':<16}{'seconds':>9}{'cand/s':>10}{'tokens/s':>11}{'padded tok':>12}")
    for name, r in results.items():
        print(f"{name:<16}{r['seconds']:>9.2f}{r['candidates_per_s']:>10.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['padded_tokens']:>12}")
    print(f"speed-up (embedder / reference): {ratio:.2f}x; max |score difference| {diff:.2e}")
    if args.json:
        summary = {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in results.items()}
        with open(args.json, "w") as f:
            json.dump({"lm": label, "parameters_m": round(n_params), "device": device, "candidates": len(jobs),
                       "packed": scorer.run_packed(), "ratio": ratio, "max_abs_diff": diff, **summary}, f, indent=1)


if __name__ == "__main__":
    main()
