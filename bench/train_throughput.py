"""Training throughput and peak memory at realistic lengths: embedder's training step vs two padded baselines.

Three sides, each in its own process (so peak memory is its own), on the same batches:

- `embedder`: `train.py`'s code path: a Lightning `Trainer.fit` of `RetrieverModule` fed by `RetrievalCollator`,
  with the model's defaults (`unpadded=auto`: packed batches, variable-length attention);
- `sdpa_padded`: the same Lightning path with `model.unpadded=false` (padded to the batch's longest, SDPA);
- `reference`: the reference-like step: a plain loop, eager attention, padded to the batch's longest, the
  listwise loss as a Python loop over the group (FlagEmbedding's modeling_dense.py).

All sides: InfoNCE (weight 0.2) + stable distillation on teacher scores, cls pooling, AdamW, `--warmup` untimed steps
then `--steps` timed ones (CUDA synchronised), queries/s = timed steps x B / time.

`--lengths msmarco` (default) draws MS MARCO-like lengths (queries ~N(20, 6) tokens, passages lognormal with mean
~92, capped at the max length) from one-token vocabulary words; `--lengths max` fills every sequence to the limit.

    python bench/train_throughput.py                              # bundled MiniLM on CPU
    python bench/train_throughput.py --model bert-base --device cuda --precision bf16 --batch 100 --group 8 \
        --grad-ckpt --json out.json                               # the recipe's shape (random bert-base weights)
    python bench/train_throughput.py --sides embedder,gradcache --batch 64 --mini-batch 16   # GradCache's memory
    python bench/train_throughput.py --model qwen-0.5b --lora 16 --sides embedder,sdpa_padded --device cuda \
        --precision bf16 --batch 32 --group 8 --grad-ckpt     # a LoRA step of a 0.5B decoder, packed vs padded
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIDES = ("reference", "sdpa_padded", "embedder")  # also: gradcache (the embedder side with loss.gradcache_mini_batch)


def model_folder(name: str) -> str:
    """`minilm` (bundled), `bert-base` (bert-base shape, random weights, the bundled uncased WordPiece vocabulary:
    throughput only, no download), or a model folder."""
    from embedder.bundled import minilm_path

    if name == "minilm":
        return minilm_path()
    if name == "qwen-0.5b":
        return _qwen_folder()
    if name != "bert-base":
        return name
    out = os.path.join(tempfile.gettempdir(), "embedder-bench-bert-base")
    if not os.path.isfile(os.path.join(out, "config.json")):
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        torch.manual_seed(0)
        tmp = out + f".tmp-{os.getpid()}"
        BertModel(BertConfig()).save_pretrained(tmp)
        # the uncased WordPiece vocabulary of bert-base (the bundled MiniLM's), or a copy of it where MiniLM's
        # weights are not installed (GPU sessions carry only the tokenizer files)
        AutoTokenizer.from_pretrained(os.environ.get("EMBEDDER_BENCH_TOKENIZER") or minilm_path()).save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def _qwen_folder() -> str:
    """A Qwen2.5-0.5B-shape decoder (24 layers, hidden 896, 14 query / 2 key-value heads, random weights) with the
    bert-base WordPiece vocabulary (no download; throughput only: the embedding table is 30k rows, not 152k)."""
    from embedder.bundled import minilm_path

    out = os.path.join(tempfile.gettempdir(), "embedder-bench-qwen-0.5b")
    if not os.path.isfile(os.path.join(out, "config.json")):
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

        tok = AutoTokenizer.from_pretrained(os.environ.get("EMBEDDER_BENCH_TOKENIZER") or minilm_path())
        torch.manual_seed(0)
        tmp = out + f".tmp-{os.getpid()}"
        Qwen2Model(Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                               rope_theta=1e6, tie_word_embeddings=True)).save_pretrained(tmp)
        # in a folder of its own: beside a qwen2 config.json, AutoTokenizer would load it as Qwen2's tokenizer
        tok.save_pretrained(os.path.join(tmp, "wordpiece"))
        os.replace(tmp, out)
    return out


def tokenizer_folder(path: str) -> str:
    return os.path.join(path, "wordpiece") if os.path.isdir(os.path.join(path, "wordpiece")) else path


def make_items(args: dict, tokenizer) -> list[dict]:
    """(warmup + steps) x B training records: query, G keys, teacher scores."""
    from lengths import msmarco_texts, one_token_words, text_of

    rng = random.Random(0)
    words = one_token_words(tokenizer)
    G, n = args["group"], (args["warmup"] + args["steps"]) * args["batch"]
    if args["lengths"] == "msmarco":
        queries = msmarco_texts(n, "query", words, rng, args["qlen"])
        keys = msmarco_texts(n * G, "key", words, rng, args["klen"])
    else:
        queries = [text_of(args["qlen"], words, rng) for _ in range(n)]
        keys = [text_of(args["klen"], words, rng) for _ in range(n * G)]
    return [{"query": queries[i], "keys": keys[i * G:(i + 1) * G], "teacher_scores": [rng.gauss(0, 1) for _ in range(G)],
             "record_kind": "qa", "dataset": "bench"} for i in range(n)]


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


def _peak(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    from embedder.progress import peak_rss_gib

    return peak_rss_gib()


def run_lightning(args: dict, unpadded: str, items: list[dict], path: str, device,
                  gradcache_mini_batch: int | None = None) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoConfig

    from embedder.data.collator import RetrievalCollator
    from embedder.lit_module import RetrieverModule
    from embedder.modeling import DualEncoder
    from embedder.record_kinds import build_record_kinds

    decoder = AutoConfig.from_pretrained(path).model_type in ("llama", "mistral", "qwen2", "qwen3")
    lora = {"r": args["lora"], "alpha": 2 * args["lora"], "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"] if decoder else ["query", "key", "value"]
            } if args.get("lora") else None
    # a decoder pools its last token (the WordPiece vocabulary has no EOS to append: [SEP] ends every text)
    enc = DualEncoder(path, pooling="last_token" if decoder else "cls", gradient_checkpointing=args["grad_ckpt"],
                      unpadded=unpadded, lora=lora, append_eos=False, tokenizer_name_or_path=tokenizer_folder(path),
                      attention_dropout=args.get("attention_dropout"))
    tasks = build_record_kinds({"qa": {"losses": [  # contrastive + stable distillation, both weighted
        {"_target_": "embedder.losses.InfoNCELoss", "weight": 0.2},
        {"_target_": "embedder.losses.StableDistillLoss", "weight": 1.0}]}}, group_size=args["group"])
    module = RetrieverModule(enc, tasks, combine_rule="weighted", cross_device=False,
                             optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-5),
                             gradcache_mini_batch=gradcache_mini_batch)
    collate = RetrievalCollator(enc.tokenizer, args["qlen"], args["klen"])
    from embedder.data.workers import resolve_num_workers

    # train.py's data.num_workers, resolved as train.py resolves it (auto: 4 on a GPU machine with the CPUs, 0 on CPU)
    loader = DataLoader(items, batch_size=args["batch"], shuffle=False, collate_fn=collate,
                        num_workers=resolve_num_workers(args["num_workers"], device.type == "cuda"),
                        pin_memory=device.type == "cuda")

    class Timer(L.Callback):
        t0 = t1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args["warmup"]:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                Timer.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.type == "cuda":
                torch.cuda.synchronize()
            Timer.t1 = time.perf_counter()
            Timer.loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)

    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}[args["precision"]]
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                        max_steps=args["warmup"] + args["steps"], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[Timer()])
    trainer.fit(module, train_dataloaders=loader)
    return {"queries_per_s": args["steps"] * args["batch"] / (Timer.t1 - Timer.t0), "peak_gib": _peak(device),
            "loss": Timer.loss}


def run_reference(args: dict, items: list[dict], path: str, device) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, attn_implementation="eager").to(device)
    model.train()
    if args["grad_ckpt"]:
        model.gradient_checkpointing_enable()
    tok = AutoTokenizer.from_pretrained(path)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args["precision"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B, G = args["batch"], args["group"]
    t0 = loss = None
    for s in range(args["warmup"] + args["steps"]):
        if s == args["warmup"]:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        batch = items[s * B:(s + 1) * B]
        qi = tok([b["query"] for b in batch], padding=True, truncation=True, max_length=args["qlen"],
                 return_tensors="pt").to(device)
        ki = tok([k for b in batch for k in b["keys"]], padding=True, truncation=True, max_length=args["klen"],
                 return_tensors="pt").to(device)
        ts = torch.tensor([b["teacher_scores"] for b in batch], device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            q = F.normalize(model(**qi).last_hidden_state[:, 0], dim=-1)
            k = F.normalize(model(**ki).last_hidden_state[:, 0], dim=-1)
            con = F.cross_entropy(q.float() @ k.float().T / 0.01, torch.arange(B, device=device) * G)
            loss = 0.2 * con + naive_stable_distill(q.float(), k.float(), ts, 0.01)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"queries_per_s": args["steps"] * B / (time.perf_counter() - t0), "peak_gib": _peak(device),
            "loss": float(loss)}


def worker(side: str, args: dict, queue) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    device = torch.device(args["device"])
    path = model_folder(args["model"])
    items = make_items(args, AutoTokenizer.from_pretrained(tokenizer_folder(path)))
    if side == "reference":
        out = run_reference(args, items, path, device)
    else:
        out = run_lightning(args, "false" if side == "sdpa_padded" else "auto", items, path, device,
                            gradcache_mini_batch=args["mini_batch"] if side == "gradcache" else None)
    queue.put({"side": side, **out})


def side_result(side: str, proc, q) -> dict:
    """The side's result, or exit with the child's status when it died without one (OOM-killed, a crash): never a
    parent blocked forever on the queue of a dead child."""
    import queue

    while True:
        try:
            result = q.get(timeout=1.0)
            proc.join()
            return result
        except queue.Empty:
            if not proc.is_alive():
                try:  # it may have put its result just before exiting
                    return q.get(timeout=1.0)
                except queue.Empty:
                    code = proc.exitcode
                    why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                    sys.exit(f"error: the {side} side's process died without a result ({why}; an OOM kill shows "
                             f"as signal 9)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="`minilm` (bundled), `bert-base` or `qwen-0.5b` (random weights, "
                   "those shapes) or a folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=16, help="queries per step")
    p.add_argument("--group", type=int, default=8, help="keys per query")
    p.add_argument("--qlen", type=int, default=256, help="query max length (tokens)")
    p.add_argument("--klen", type=int, default=256, help="key max length (tokens)")
    p.add_argument("--lengths", default="msmarco", choices=["msmarco", "max"])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--num-workers", default="auto",
                   help="DataLoader workers for the Lightning sides: auto (train.py's default data.num_workers) or a "
                        "number; the reference-like side tokenises in its loop, as the reference (HF Trainer's "
                        "dataloader_num_workers=0) does")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="our sides' attention dropout in training (model.attention_dropout); default: the checkpoint's")
    p.add_argument("--sides", default=",".join(SIDES), help="any of reference, sdpa_padded, embedder, gradcache")
    p.add_argument("--mini-batch", type=int, default=16, help="queries per forward pass of the gradcache side")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on the attention projections (0: full fine-tune)")
    p.add_argument("--json", help="also write the results to this file")
    args = vars(p.parse_args(argv))
    ctx = mp.get_context("spawn")
    results = {}
    for side in args["sides"].split(","):
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=(side, args, q))
        proc.start()
        results[side] = side_result(side, proc, q)
    shape = (f"model={args['model']} device={args['device']} precision={args['precision']} B={args['batch']} "
             f"G={args['group']} max_len={args['qlen']}/{args['klen']} lengths={args['lengths']} "
             f"grad_ckpt={args['grad_ckpt']} attention_dropout={args.get('attention_dropout')} "
             f"warmup={args['warmup']} steps={args['steps']}")
    print(shape)
    for side, r in results.items():
        print(f"  {side:<12} {r['queries_per_s']:8.2f} queries/s   peak {r['peak_gib']:.2f} GiB   loss {r['loss']:.3f}")
    out = {"args": args, "results": results}
    if "embedder" in results and "reference" in results:
        e, b = results["embedder"], results["reference"]
        out.update(embedder_queries_per_s=e["queries_per_s"], baseline_queries_per_s=b["queries_per_s"],
                   speedup=e["queries_per_s"] / b["queries_per_s"], peak_gib=e["peak_gib"],
                   baseline_peak_gib=b["peak_gib"])
        if "sdpa_padded" in results:
            out["speedup_vs_sdpa_padded"] = e["queries_per_s"] / results["sdpa_padded"]["queries_per_s"]
        print(f"  speed-up x{out['speedup']:.2f} vs reference"
              + (f", x{out['speedup_vs_sdpa_padded']:.2f} vs padded SDPA" if "sdpa_padded" in results else "")
              + f"; peak memory {e['peak_gib']:.2f} vs {b['peak_gib']:.2f} GiB")
    if args["json"]:
        with open(args["json"], "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
