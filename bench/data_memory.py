"""Peak memory of real-size data: a 1-step `train.py` fit on qa training files of growing size, and corpus reading.

Training: each measurement is a fresh `python train.py ...` process (the command users run: task=msmarco, the tiny
random BERT, 1 step on the CPU) on a qa file in the reference format (1 positive, 100 negatives, 101 teacher
scores; passage lengths lognormal around ~390 characters, so ~40 KB of JSON per record like the real
`qa/msmarco/train.json`). Its peak RSS comes from `wait4`. The baseline is the same loader with every kept record
materialised as a Python list, which is what embedder 0.1 held in every rank.

Corpus: a fresh process opens a JSON-lines corpus (and the same corpus as parquet shards) with `open_corpus`, reads
every text once in batches as encoding does, and reports its peak RSS; the baseline reads the texts into a list
(0.1's `load_corpus`).

    python bench/data_memory.py                       # 200 / 2,500 / 10,000 records; 300k-passage corpus
    python bench/data_memory.py --records 200 10000 --corpus-rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "ba", "do")
         for b in ("n", "r", "s", "t", "", "l", "m", "k", "ng", "th")]


def passage(rng: np.random.Generator, mean_chars: float = 390.0) -> str:
    n_chars = int(np.clip(rng.lognormal(np.log(mean_chars) - 0.18, 0.6), 20, 3000))
    words = rng.choice(VOCAB, size=max(1, n_chars // 5))
    return " ".join(words)[:n_chars]


def write_qa_file(path: str, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"answers": [passage(rng, 120)], "query": passage(rng, 45), "query_id": i,
                   "pos": [passage(rng)], "neg": [passage(rng) for _ in range(100)],
                   "pos_index": [int(rng.integers(8_000_000))],
                   "neg_index": [int(x) for x in rng.integers(8_000_000, size=100)], "task": "qa",
                   "teacher_scores": [round(float(x), 4) for x in rng.normal(-2, 2, size=101)]}
            f.write(json.dumps(rec) + "\n")
    return os.path.getsize(path)


def run_measured(code: str, args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `python -c code args...`.

    The peak is the child's own VmHWM, read at exit: `wait4`'s ru_maxrss would also count the parent's memory at
    fork time, which survives exec.
    """
    start = time.time()
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as hwm:
        proc = subprocess.run([sys.executable, "-c", HWM_AT_EXIT + code, *args], env={**env, "BENCH_HWM": hwm.name},
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[:3]} ... failed:\n{proc.stderr.decode(errors='replace')[-3000:]}")
        kb = int(open(hwm.name).read().split()[0])
    return kb / 1024, time.time() - start


HWM_AT_EXIT = """
import atexit, os
def _hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    open(os.environ["BENCH_HWM"], "w").write(line.split(":")[1])
atexit.register(_hwm)
"""

TRAIN = """
import runpy, sys
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""

EAGER_TRAIN = """
import embedder.data.train_files as tf
lazy = tf.JsonlRecords
tf.JsonlRecords = lambda path, offsets: list(lazy(path, offsets))  # 0.1: every record held as Python objects
""" + TRAIN

CORPUS_CHILD = """
import sys
from embedder.data.corpus import open_corpus
from embedder.data.jsonl import iter_jsonl
from embedder.data.records import format_key
path, mode = sys.argv[1], sys.argv[2]
if mode == "eager":  # 0.1: every formatted text in a list
    texts = [format_key(r, "{title} {text}", path, line) for line, r in iter_jsonl(path)]
    n = sum(len(t) for t in texts)
else:
    corpus = open_corpus(path, "{title} {text}")
    n = 0
    for start in range(0, len(corpus), 100_000):  # the encoder's shard size
        n += sum(len(t) for t in corpus[start:start + 100_000])
print(n)
"""


THROUGHPUT_HEADER = "| records | groups/s (1 process, warm page cache) |\n|---|---|"
THROUGHPUT_CHILD = """
import sys, time
import numpy as np
from embedder.data.dataset import MultiTaskTrainDataset
from embedder.record_kinds import build_record_kinds
from embedder.data.train_files import load_train_file
path, mode = sys.argv[1], sys.argv[2]
tasks = build_record_kinds({"qa": {"losses": [{"_target_": "embedder.losses.StableDistillLoss", "weight": 1.0}]}},
                            group_size=8)
f = load_train_file(path, tasks, use_cache=False)
if mode == "eager":
    f.records = list(f.records)  # 0.1: records held as Python objects
ds = MultiTaskTrainDataset([f], tasks)
order = np.random.default_rng(0).permutation(len(ds))  # shuffled, as training reads them
for i in order[:200]:  # warm-up
    ds[int(i)]
start = time.perf_counter()
n = 0
while time.perf_counter() - start < 10:
    ds[int(order[n % len(order)])]
    n += 1
label = "eager list (0.1)" if mode == "eager" else "lazy offsets"
print(f"| {label} | {n / (time.perf_counter() - start):,.0f} |")
"""


def train_cmd(path: str, model: str, out: str) -> list[str]:
    return ["task=msmarco", f"train_data=[{path}]", "model=tiny_bert", f"model.model_name_or_path={model}",
            "trainer=cpu", "trainer.max_steps=1", "trainer.max_epochs=-1", "logger=csv", f"output_dir={out}",
            "data.batch_size=16", "data.group_size=8", "query_max_length=64", "key_max_length=128", "eval={}",
            "export=false", "callbacks.rich_progress_bar=null", f"hydra.run.dir={out}/hydra"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[200, 2500, 10000])
    ap.add_argument("--corpus-rows", type=int, default=300_000)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench-data-memory-")
    from embedder.modeling.tiny import build_tiny_bert

    model = build_tiny_bert(os.path.join(work, "tiny-bert"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    print("## 1-step train.py fit (task=msmarco, tiny BERT, CPU): peak RSS")
    print("| records | file | eager list (0.1) | lazy offsets | lazy, cached index |")
    print("|---|---|---|---|---|")
    rows = {}
    for n in args.records:
        path = os.path.join(work, f"qa-{n}", "train.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = write_qa_file(path, n)
        res = {}
        for mode in ("eager", "lazy", "cached"):
            cache = os.path.join(work, f"cache-{n}-{'lazy' if mode == 'cached' else mode}")
            res[mode] = run_measured(EAGER_TRAIN if mode == "eager" else TRAIN,
                                     train_cmd(path, model, os.path.join(work, f"out-{n}-{mode}")),
                                     {**env, "EMBEDDER_CACHE": cache})
        rows[n] = res
        print(f"| {n:,} | {size / 1e6:.0f} MB | {res['eager'][0]:,.0f} MB ({res['eager'][1]:.0f} s) | "
              f"{res['lazy'][0]:,.0f} MB ({res['lazy'][1]:.0f} s) | {res['cached'][0]:,.0f} MB "
              f"({res['cached'][1]:.0f} s) |")
    if len(args.records) > 1:
        lo, hi = min(args.records), max(args.records)
        d_eager = rows[hi]["eager"][0] - rows[lo]["eager"][0]
        d_lazy = rows[hi]["lazy"][0] - rows[lo]["lazy"][0]
        print(f"\n{hi:,} vs {lo:,} records: eager +{d_eager:,.0f} MB, lazy {d_lazy:+,.0f} MB "
              f"(offsets: {8 * (hi - lo) / 1e6:.2f} MB); eager/lazy increase {d_eager / max(d_lazy, 1):.0f}x")

    print(f"\n## groups drawn per second (MultiTaskTrainDataset.__getitem__, {max(args.records):,}-record file)")
    print(THROUGHPUT_HEADER)
    big = os.path.join(work, f"qa-{max(args.records)}", "train.json")
    for mode in ("eager", "lazy"):
        out = subprocess.run([sys.executable, "-c", THROUGHPUT_CHILD, big, mode], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])

    print(f"\n## corpus of {args.corpus_rows:,} passages: open and read every text once (batches of 100k)")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    cpath = os.path.join(work, "corpus.json")
    titles, texts = [], []
    with open(cpath, "w", encoding="utf-8") as f:
        for i in range(args.corpus_rows):
            t, x = passage(rng, 30), passage(rng)
            f.write(json.dumps({"title": t, "text": x}) + "\n")
            titles.append(t)
            texts.append(x)
    shards = os.path.join(work, "corpus-parquet")
    os.makedirs(shards, exist_ok=True)
    step = -(-args.corpus_rows // 4)
    for s in range(4):
        pq.write_table(pa.table({"title": titles[s * step:(s + 1) * step], "text": texts[s * step:(s + 1) * step]}),
                       os.path.join(shards, f"part-{s:05d}.parquet"), row_group_size=10_000)
    del titles, texts
    print("| reader | peak RSS | time |")
    print("|---|---|---|")
    for label, path, mode in (("JSON lines, eager list (0.1)", cpath, "eager"), ("JSON lines, open_corpus", cpath, "lazy"),
                              ("parquet shards, open_corpus", shards, "lazy")):
        rss, sec = run_measured(CORPUS_CHILD, [path, mode],
                                {**env, "EMBEDDER_CACHE": os.path.join(work, f"cache-corpus-{mode}-{label[:4]}")})
        print(f"| {label} | {rss:,.0f} MB | {sec:.1f} s |")
    print(f"\n(corpus file {os.path.getsize(cpath) / 1e6:.0f} MB; scratch folder {work})")


if __name__ == "__main__":
    main()
