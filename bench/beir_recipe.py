"""The BEIR fine-tuning recipe (`task=beir`) against a plain sentence-transformers fine-tune, on one dev split.

    python bench/beir_recipe.py --data ../shared/data/scifact-train --out /tmp/beir-bench    # base, recipe, plain
    python bench/beir_recipe.py --data ... --out ... --only recipe dropout group2 inbatch nomargin hybrid
    python bench/beir_recipe.py --data ... --out ... --only "tau02:loss.temperature=0.02"    # any name:overrides

Both sides train the same model (the bundled all-MiniLM-L6-v2) on the same train queries for the same epochs and
batch size, and are scored by the same evaluator (`python -m embedder.evaluate`, nDCG@10 on the same dev queries):

- `plain`: sentence-transformers' own trainer with `MultipleNegativesRankingLoss` (in-batch negatives, scale 20),
  one (query, positive) row per relevant pair, the no-duplicates batch sampler, lr 2e-5, warmup 10%.
- `recipe` and its variants: `python train.py task=beir beir.folder=<data>` with overrides, the command users run.
  Each variant is `name:override override ...`; its mining cache is its own output folder.

Every run is a child process, timed with `os.wait4`: wall clock, CPU seconds (user + system, the cost on a
shared machine) and peak RSS. The dev split comes from the recipe's first run (`output_dir/data/prepare.json`):
the plain fine-tune trains on exactly its `train.json` and is evaluated on its `dev.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {  # name -> overrides of task=beir; each is measured on its own (the table in docs/benchmarks.md)
    "recipe": [],                                                   # the defaults of configs/task/beir.yaml
    "dropout": ["model.attention_dropout=null"],                    # the checkpoint's attention dropout (0.1)
    "group2": ["data.group_size=2"],                                # 1 hard negative per query instead of 2
    "inbatch": ["beir.negatives.retrievers=[]", "data.group_size=1"],  # no mined negatives: in-batch only
    "nomargin": ["beir.negatives.relative_margin=null"],            # no false-negative filter
    "hybrid": ["beir.negatives.retrievers=[bm25,dense]"],           # BM25 and the model's own negatives, merged
}


def run_child(cmd: list[str], log_path: str) -> dict[str, float]:
    """Run `cmd`, its output to `log_path`; wall seconds, CPU seconds and peak RSS (GiB) of that process tree's
    largest process."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}; see {log_path}")
    return {"wall_s": round(time.time() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 1024 ** 2, 2)}  # ru_maxrss: KiB


def evaluate(model_dir: str, data_dir: str, out_dir: str) -> float:
    """nDCG@10 on dev.json with embedder's evaluator (the same for every side)."""
    cmd = [sys.executable, "-m", "embedder.evaluate", "model=minilm", f"model_path={model_dir}",
           f"eval_data={data_dir}/dev.json", f"corpus={data_dir}/corpus.json", "eval_name=dev", "metrics=[ndcg]",
           "cutoffs=[10]", f"output_dir={out_dir}", "trainer=cpu"]
    if not os.path.isfile(os.path.join(out_dir, "metrics.json")):  # reused when a rerun finds it
        run_child(cmd, out_dir + ".log")
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)["dev"]["ndcg@10"]


def plain_finetune(data_dir: str, out_dir: str, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    """The child process of `plain`: sentence-transformers' trainer with MultipleNegativesRankingLoss."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import BatchSamplers, SentenceTransformerTrainingArguments

    from embedder.bundled import minilm_path

    rows = {"anchor": [], "positive": []}
    with open(os.path.join(data_dir, "train.json")) as f:
        for line in f:
            rec = json.loads(line)
            for pos in rec["pos"]:
                rows["anchor"].append(rec["query"])
                rows["positive"].append(pos)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 256
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir + "-ckpt", num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_ratio=0.1, seed=seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to="none", logging_steps=10, use_cpu=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                         loss=losses.MultipleNegativesRankingLoss(model))
    trainer.train()
    model.save(out_dir)


def minilm() -> str:
    from embedder.bundled import minilm_path

    return minilm_path()


def _prepared(out: str, variants: dict) -> str:
    """The data folder of the first recipe run (every variant prepares the same split: same folder, same seed)."""
    for name in [n for n in variants if n not in ("plain", "base")] + ["recipe"]:
        data = os.path.join(out, name, "data")
        if os.path.isfile(os.path.join(data, "dev.json")):
            return data
    sys.exit(f"run a recipe variant first: plain and base use its split (under {out})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a BEIR folder (e.g. ../shared/data/scifact-train)")
    parser.add_argument("--out", required=True, help="work folder; each run gets a subfolder")
    parser.add_argument("--only", nargs="*", help="plain, recipe, or name:override ... variants")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child-plain", help=argparse.SUPPRESS)  # internal: the plain fine-tune's own process
    args = parser.parse_args()
    if args.child_plain:
        plain_finetune(args.child_plain, os.path.join(args.out, "plain"), args.epochs, args.batch_size, 2e-5, 42)
        return
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    wanted = args.only or ["base", "recipe", "plain"]
    variants = {}
    for item in wanted:
        name, _, rest = item.partition(":")
        variants[name] = rest.split() if rest else VARIANTS.get(name, [])
    common = [f"beir.folder={os.path.abspath(args.data)}", f"trainer.max_epochs={args.epochs}",
              f"data.batch_size={args.batch_size}", "trainer=cpu", "report=false", "logger=csv",
              "beir.eval_splits=[]", "evaluate_before=false"]  # evaluated afterwards like plain: training cost only
    for name, overrides in variants.items():
        if name in ("plain", "base"):
            continue
        out = os.path.join(args.out, name)
        cost = run_child([sys.executable, "train.py", "task=beir", f"output_dir={out}", *common, *overrides],
                         out + ".log")
        score = evaluate(out, os.path.join(out, "data"), out + "-eval")
        results[name] = {"overrides": overrides, **cost, "ndcg@10": score}
        print(name, results[name], flush=True)
        json.dump(results, open(results_path, "w"), indent=1)
    if "plain" in variants:
        prepared = _prepared(args.out, variants)
        cost = run_child([sys.executable, __file__, "--data", args.data, "--out", args.out, "--epochs",
                          str(args.epochs), "--batch-size", str(args.batch_size), "--child-plain", prepared],
                         os.path.join(args.out, "plain.log"))
        score = evaluate(os.path.join(args.out, "plain"), prepared, os.path.join(args.out, "plain-eval"))
        results["plain"] = {"overrides": ["sentence-transformers MNRL"], **cost, "ndcg@10": score}
        print("plain", results["plain"], flush=True)
        json.dump(results, open(results_path, "w"), indent=1)
    if "base" in variants:  # the untrained model
        data = _prepared(args.out, variants)
        results["base"] = {"overrides": ["no fine-tuning"], "wall_s": 0, "cpu_s": 0, "peak_rss_gib": 0,
                           "ndcg@10": evaluate(minilm(), data, os.path.join(args.out, "base-eval"))}
        json.dump(results, open(results_path, "w"), indent=1)
    print("| run | dev nDCG@10 | vs plain | wall s | CPU s | CPU vs plain | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("plain")
    for name, r in results.items():
        d = f"{r['ndcg@10'] - base['ndcg@10']:+.4f}" if base else ""
        c = f"{r['cpu_s'] / base['cpu_s']:.2f}x" if base and r.get("cpu_s") else ""
        print(f"| {name} `{' '.join(r['overrides'])}` | {r['ndcg@10']:.4f} | {d} | {r['wall_s']} | {r['cpu_s']} | {c} "
              f"| {r.get('peak_rss_gib', r.get('peak_rss_gb'))} |")  # peak_rss_gb: older results


if __name__ == "__main__":
    main()
