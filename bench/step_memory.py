"""Peak memory and time of a CPU training step under glibc malloc settings (`host_malloc.*`, `THP_MEM_ALLOC_ENABLE`).

    python bench/step_memory.py --train <output_dir>/data/mine-dense/train.neg.dense.json --steps 6
    python bench/step_memory.py --train ... --settings default mmap8m mmap8m+thp thp mmap32m

The step is `task=beir`'s on the bundled MiniLM: 16 queries x 4 keys (positive + 3 mined negatives) of a real
training file, up to 256 tokens each, packed where the batch has enough padding (`model.unpadded=auto`), gradient
checkpointing, InfoNCE, AdamW. Each setting runs in its own process (glibc reads `mallopt` per process, and torch
reads THP_MEM_ALLOC_ENABLE before its first allocation) on the same seeded batches; the first two steps are warm-up,
the rest are timed (wall and CPU per step). The peak is the process's maximum RSS (`ru_maxrss`), model loading
included. Prints one table row per setting and the ratio to the first setting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {  # name -> (mmap threshold in bytes or None, environment)
    "default": (None, {}),                               # glibc's adaptive threshold (task=beir before session 26)
    "mmap8m": (8 << 20, {}),                             # task=beir's host_malloc.mmap_threshold since session 26
    "mmap8m+thp": (8 << 20, {"THP_MEM_ALLOC_ENABLE": "1"}),  # and 2 MB pages for torch's large allocations
    "thp": (None, {"THP_MEM_ALLOC_ENABLE": "1"}),
    "mmap32m": (32 << 20, {}),
}


def child(train: str, steps: int, threshold: int | None, seed: int) -> dict:
    sys.path.insert(0, ROOT)
    import torch

    from embedder.bundled import minilm_path
    from embedder.data.collator import RetrievalCollator
    from embedder.host_memory import tune_malloc
    from embedder.losses.contrastive import InfoNCELoss
    from embedder.modeling.encoder import DualEncoder

    tune_malloc(threshold, 2)  # arena_max 2: train.yaml's default
    with open(train) as f:
        rows = [r for r in map(json.loads, f) if r.get("pos") and len(r.get("neg") or []) >= 3]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoder = DualEncoder(minilm_path(), pooling="mean", unpadded="auto", gradient_checkpointing=True,
                          attention_dropout=0.0)
    collate = RetrievalCollator(encoder.tokenizer, 256, 256)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    loss_fn = InfoNCELoss(temperature=0.05)
    walls, cpus, tokens = [], [], []
    for _ in range(steps):
        batch = collate([{"query": r["query"], "keys": [rng.choice(r["pos"]), *rng.sample(r["neg"], 3)],
                          "teacher_scores": None, "record_kind": "beir", "dataset": 0} for r in rng.sample(rows, 16)])
        wall, cpu = time.perf_counter(), time.process_time()
        loss = loss_fn(encoder.encode(batch["query"], "query"), encoder.encode(batch["key"], "key"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        tokens.append(int(batch["key"]["attention_mask"].sum()))
    timed = slice(2, None)  # two warm-up steps
    return {"wall_s": sum(walls[timed]) / len(walls[timed]), "cpu_s": sum(cpus[timed]) / len(cpus[timed]),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "key_tokens": sum(tokens) / len(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="a training file with query, pos and at least 3 neg per record")
    ap.add_argument("--steps", type=int, default=6, help="steps per setting, the first two untimed (>= 3)")
    ap.add_argument("--settings", nargs="+", default=["default", "mmap8m", "mmap8m+thp"], choices=list(SETTINGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (two warm-up steps, then the timed ones)")
    if args.child:
        print(json.dumps(child(args.train, args.steps, SETTINGS[args.child][0], args.seed)))
        return
    print(f"| setting | peak RSS GiB | wall s/step | CPU s/step | wall vs {args.settings[0]} | CPU vs {args.settings[0]} |")
    print("|---|---|---|---|---|---|")
    first = None
    for name in args.settings:
        env = {**os.environ, **SETTINGS[name][1]}
        out = subprocess.run([sys.executable, __file__, "--train", args.train, "--steps", str(args.steps),
                              "--seed", str(args.seed), "--child", name], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name}: the step failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        first = first or r
        print(f"| {name} | {r['peak_gib']:.2f} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
              f"{r['wall_s'] / first['wall_s']:.2f}x | {r['cpu_s'] / first['cpu_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
