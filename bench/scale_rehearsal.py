"""Scale rehearsal on this machine: a short `train.py` run on 2 simulated ranks with in-training evaluation over a
synthetic corpus of 1M short passages and a 50k-record training file.

It runs the command users run (`python train.py ... trainer=ddp_sim`, the tiny random BERT, CPU), with an eval set
whose corpus is searched the way `task=qrecc` searches QReCC's 54M passages: each rank encodes its shards into the
on-disk store, indexes them and searches every query, and the top-k lists are merged. `evaluate_before=true`, so the
corpus is encoded twice (untrained weights, cached; trained weights, deleted after scoring).

Printed: the phases of each evaluation per rank (encode, index, search, peak RSS) from the run's log, the wall time
of the whole run, and the disk the stores use.

    python bench/scale_rehearsal.py                       # 1M passages, 50k training records, 2 ranks
    python bench/scale_rehearsal.py --passages 200000 --records 10000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SYLLABLES = [a + b for a in "bdfgklmnprstvz" for b in "aeiou"]


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(n))


def make_data(folder: str, passages: int, records: int, queries: int, seed: int = 0) -> dict[str, str]:
    """Short passages (lognormal, mean ~8 words), a training file (1 pos + 7 neg, passages drawn from the corpus),
    and an eval file whose positive is a corpus row that shares words with the query."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = {k: os.path.join(folder, f"{k}.json") for k in ("corpus", "train", "test")}
    lengths = np.clip(rng.lognormal(np.log(7), 0.5, size=passages), 2, 40).astype(int)
    texts = []
    with open(paths["corpus"], "w") as f:
        for n in lengths:
            t = words(rng, int(n))
            texts.append(t)
            f.write(json.dumps({"text": t}) + "\n")
    with open(paths["train"], "w") as f:
        for _ in range(records):
            rows = rng.integers(passages, size=8)
            pos = texts[rows[0]]
            f.write(json.dumps({"query": " ".join(pos.split()[:3]), "pos": [pos],
                                "neg": [texts[r] for r in rows[1:]], "task": "tool"}) + "\n")
    with open(paths["test"], "w") as f:
        for q, row in enumerate(rng.choice(passages, size=queries, replace=False)):
            f.write(json.dumps({"query": " ".join(texts[row].split()[:3]), "query_id": q,
                                "pos_index": [int(row)]}) + "\n")
    return paths


def du(path: str) -> int:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--shard-size", type=int, default=50_000, help="corpus rows per store shard")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="scale-rehearsal-")
    t0 = time.time()
    data = os.path.join(work, "data")
    meta = os.path.join(data, "made.json")
    want = {"passages": args.passages, "records": args.records, "queries": args.queries}
    if os.path.isfile(meta) and json.load(open(meta)) == want:  # same sizes in the same --work: reuse
        paths = {k: os.path.join(data, f"{k}.json") for k in ("corpus", "train", "test")}
    else:
        paths = make_data(data, args.passages, args.records, args.queries)
        json.dump(want, open(meta, "w"))
    print(f"data: {args.passages:,} passages ({os.path.getsize(paths['corpus']) / 1e6:.0f} MB), "
          f"{args.records:,} training records ({os.path.getsize(paths['train']) / 1e6:.0f} MB), "
          f"{args.queries:,} eval queries; written in {time.time() - t0:.0f} s")
    from embedder.modeling.tiny import build_tiny_bert

    model = build_tiny_bert(os.path.join(work, "tiny-bert"))
    cache, out = os.path.join(work, "cache"), os.path.join(work, "out")
    cmd = [sys.executable, "train.py", "task=tool", f"train_data=[{paths['train']}]", "eval.tool=null",
           f"+eval.synth.eval_data={paths['test']}", f"+eval.synth.corpus={paths['corpus']}", "+eval.synth.task=tool",
           "+eval.synth.key_template='{text}'", "+eval.synth.metrics=[ndcg,recall]", "+eval.synth.cutoffs=[10,100]",
           "+eval.synth.hits=100", "+eval.synth.mode=retrieval", "+eval.synth.batch_size=256",
           f"+eval.synth.shard_size={args.shard_size}",
           "recipe_metric=val/synth/ndcg@10", "model=tiny_bert", f"model.model_name_or_path={model}",
           "trainer=ddp_sim", f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1",
           f"trainer.val_check_interval={args.steps + 1000}", "trainer.check_val_every_n_epoch=null", "logger=csv", f"output_dir={out}", "data.batch_size=16",
           "data.group_size=8", "query_max_length=32", "key_max_length=128", "export=false",
           "callbacks.rich_progress_bar=null", f"hydra.run.dir={out}/hydra"]
    env = {**os.environ, "EMBEDDER_CACHE": cache, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    with open(os.path.join(work, "train.log"), "w") as f:
        f.write(log)
    if proc.returncode != 0:
        sys.exit(f"train.py failed (rc {proc.returncode}); log: {work}/train.log\n{log[-3000:]}")
    print(f"train.py (2 ranks, {args.steps} steps, evaluation before and after): {wall:.0f} s wall")
    print("(the tiny random model is near chance on this synthetic set: the metrics are not the point)\n")
    print("| eval | rank | shards encoded | encode | index | search + merge | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    seen: dict[str, int] = {}
    pattern = re.compile(r"eval (\S+) rank (\d+)/(\d+) step (\d+): encoded (\d+) shard\(s\) in ([\d.]+) s, "
                         r"indexed (\d+) rows in ([\d.]+) s, searched \d+ queries in ([\d.]+) s, peak RSS (\d+) MB")
    for m in pattern.finditer(log):
        name, r, w, step, shards, enc, rows, idx, search, rss = m.groups()
        seen[r] = seen.get(r, 0) + 1
        label = {1: "before (untrained)", 2: "after training"}.get(seen[r], f"#{seen[r]}")
        print(f"| {label} | {r}/{w} | {shards} | {enc} s | {idx} s ({int(rows):,} rows) | {search} s | {rss} MB |")
    stores, tokens = du(os.path.join(cache, "eval-encode")), du(os.path.join(cache, "tokens"))
    print(f"\ndisk: cached stores of the untrained model {stores / 1e6:.0f} MB; token cache {tokens / 1e6:.0f} MB; "
          f"index cache {(du(cache) - stores - tokens) / 1e6:.0f} MB; "
          f"step stores left in output_dir {du(os.path.join(out, 'eval-encode')) / 1e6:.0f} MB")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    print(f"metrics before -> after: {metrics['before']} -> {metrics['after']}")
    print(f"(scratch folder {work})")


if __name__ == "__main__":
    main()
