"""Training throughput and peak memory: embedder's training step vs a plain PyTorch + transformers loop.

Both sides do the same math on the same synthetic batches (B queries, G keys each, stable distillation +
InfoNCE): embedder pads each batch to its longest sequence, uses SDPA attention where available and the
vectorised losses; the baseline pads to max_length, uses eager attention and writes the listwise loss as a
Python loop over the group (like the reference). Each side runs in its own process so peak memory is its own.

    python bench/train_throughput.py                         # bundled MiniLM on CPU, small shapes
    python bench/train_throughput.py --model BAAI/bge-base-en --device cuda --precision bf16 \
        --batch 100 --group 8 --qlen 256 --klen 256 --grad-ckpt   # the recipe's shapes on a GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("retrieval augmented language model query passage document answer question context memory tool "
         "example dialogue chunk embedding vector index search rank score teacher student negative positive").split()


def make_batches(n_batches: int, B: int, G: int, qlen: int, klen: int, seed: int = 0):
    """Texts whose lengths vary between 25% and 100% of the limits, like real data."""
    rng = random.Random(seed)

    def text(limit):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(max(1, limit // 4), limit)))

    out = []
    for _ in range(n_batches):
        out.append({"queries": [text(qlen) for _ in range(B)], "keys": [text(klen) for _ in range(B * G)],
                    "scores": [[rng.gauss(0, 1) for _ in range(G)] for _ in range(B)]})
    return out


def naive_stable_distill(q, k, teacher, tau):
    """The reference's loop over group ranks (modeling_dense.py), kept as the baseline's loss."""
    import torch
    import torch.nn.functional as F

    B, G = teacher.shape
    scores = q @ k.T / tau  # (B, B*G)
    p = torch.softmax(teacher, dim=-1)
    loss = 0.0
    mask = torch.zeros_like(scores)
    for i in range(G):
        target = torch.arange(B, device=q.device) * G + i
        loss = loss + (p[:, i] * F.cross_entropy(scores + mask, target, reduction="none")).mean()
        mask[torch.arange(B), target] = torch.finfo(scores.dtype).min
    return loss


def worker(side: str, args: dict, queue) -> None:
    import torch
    import torch.nn.functional as F

    from embedder.bundled import minilm_path

    torch.manual_seed(0)
    device = torch.device(args["device"])
    model_path = minilm_path() if args["model"] == "minilm" else args["model"]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args["precision"])
    batches = make_batches(args["warmup"] + args["steps"], args["batch"], args["group"], args["qlen"], args["klen"])
    B, G = args["batch"], args["group"]

    if side == "embedder":
        from embedder.data.tasks import TaskSettings
        from embedder.lit_module import RetrieverModule
        from embedder.losses import LossWeights
        from embedder.modeling import DualEncoder

        enc = DualEncoder(model_path, pooling="cls", gradient_checkpointing=args["grad_ckpt"],
                          attn_implementation="sdpa").to(device)
        tasks = {"qa": TaskSettings("qa", loss=LossWeights(0.2, 1.0, stable_distill=True))}
        module = RetrieverModule(enc, tasks, combine_rule="weighted", cross_device=False)
        tok = enc.tokenizer
        params = enc.parameters()

        def step(b):
            qi = tok(b["queries"], padding=True, truncation=True, max_length=args["qlen"], return_tensors="pt",
                     pad_to_multiple_of=8).to(device)
            ki = tok(b["keys"], padding=True, truncation=True, max_length=args["klen"], return_tensors="pt",
                     pad_to_multiple_of=8).to(device)
            ts = torch.tensor(b["scores"], device=device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                q, k = enc.encode(qi, "query"), enc.encode(ki, "key")
                return module.compute_loss(q, k, ts, "qa")["loss"]
    else:
        from transformers import AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(model_path, attn_implementation="eager").to(device)
        model.train()
        if args["grad_ckpt"]:
            model.gradient_checkpointing_enable()
        tok = AutoTokenizer.from_pretrained(model_path)
        params = model.parameters()

        def step(b):
            qi = tok(b["queries"], padding="max_length", truncation=True, max_length=args["qlen"],
                     return_tensors="pt").to(device)
            ki = tok(b["keys"], padding="max_length", truncation=True, max_length=args["klen"],
                     return_tensors="pt").to(device)
            ts = torch.tensor(b["scores"], device=device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                q = F.normalize(model(**qi).last_hidden_state[:, 0], dim=-1)
                k = F.normalize(model(**ki).last_hidden_state[:, 0], dim=-1)
                con = F.cross_entropy(q @ k.T / 0.01, torch.arange(B, device=device) * G)
                return 0.2 * con + naive_stable_distill(q.float(), k.float(), ts, 0.01)

    opt = torch.optim.AdamW(params, lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i, b in enumerate(batches):
        if i == args["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = step(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # GiB (ru_maxrss is KiB on Linux)
    queue.put({"side": side, "queries_per_s": args["steps"] * B / dt, "peak_gib": peak, "loss": float(loss)})


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="`minilm` (bundled) or an HF folder / hub name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=8, help="queries per step")
    p.add_argument("--group", type=int, default=4, help="keys per query")
    p.add_argument("--qlen", type=int, default=64)
    p.add_argument("--klen", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--json", help="also write the results to this file")
    args = vars(p.parse_args(argv))
    ctx = mp.get_context("spawn")
    results = {}
    for side in ("baseline", "embedder"):
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=(side, args, q))
        proc.start()
        results[side] = q.get()
        proc.join()
    ratio = results["embedder"]["queries_per_s"] / results["baseline"]["queries_per_s"]
    mem = results["embedder"]["peak_gib"] / results["baseline"]["peak_gib"]
    shape = f"model={args['model']} device={args['device']} precision={args['precision']} B={args['batch']} " \
            f"G={args['group']} len={args['qlen']}/{args['klen']} grad_ckpt={args['grad_ckpt']}"
    print(shape)
    for side in ("baseline", "embedder"):
        r = results[side]
        print(f"  {side:<9} {r['queries_per_s']:8.2f} queries/s   peak {r['peak_gib']:.2f} GiB")
    print(f"  speed-up x{ratio:.2f}   memory ratio x{mem:.2f}")
    out = {"args": args, "results": results, "speedup": ratio, "memory_ratio": mem}
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
