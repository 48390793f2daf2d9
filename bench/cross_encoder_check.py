"""Is a cross-encoder trained on the train qrels a teacher worth building into `task=beir` (RocketQA style, issue 22)?

    python bench/cross_encoder_check.py /tmp/bb/scifact-train/seed1/lr1e4maskpos        # a protocol run's folder
    python bench/cross_encoder_check.py <run> --epochs 2 --lr 5e-5 --negatives 7 --depth 30

From a finished `task=beir` run folder (its prepared data, its dense mining and its metrics.json) this trains a
cross-encoder the way the teacher would be trained inside `prepare`: sentence-transformers' `CrossEncoder` from the
same base model (the bundled MiniLM; a fresh one-logit head), `BinaryCrossEntropyLoss` on every (train query,
labelled positive) = 1 and (train query, its first `--negatives` mined negatives) = 0, `pos_weight` = negatives per
query (sentence-transformers' hard-negative example). Then, on the run's dev queries only (never test):
- `base_dev_ndcg@10`: the base bi-encoder (embedder's own loader and encode routine) over the whole corpus;
- `ce_rerank_dev_ndcg@10`: the cross-encoder reranking the base's top `--depth` (graded nDCG, `graded_ndcg`);
- `run_dev_ndcg@10`: the run's fine-tuned bi-encoder, from its metrics.json (the same split and metric).
A teacher is worth distilling only when it ranks dev well above the student the recipe already trains; when the
reranked number is at or below the fine-tuned bi-encoder's, distilling it cannot add much and the build is not worth
its cost (a cross-encoder forward per (query, candidate) pair, ~2x the CPU of the bi-encoder's training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished task=beir run folder (data/, data/mine-dense/, metrics.json)")
    parser.add_argument("--epochs", type=int, default=2, help="cross-encoder epochs over the train pairs")
    parser.add_argument("--lr", type=float, default=5e-5, help="cross-encoder learning rate")
    parser.add_argument("--negatives", type=int, default=7, help="mined negatives per train query (label 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per training step")
    parser.add_argument("--depth", type=int, default=30, help="base top-k the cross-encoder reranks on dev")
    parser.add_argument("--seed", type=int, default=1, help="training seed")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    from embedder.bundled import minilm_path
    from embedder.config import compose
    from embedder.data.corpus import open_corpus
    from embedder.data.jsonl import iter_jsonl
    from embedder.evaluation.metrics import graded_ndcg
    from embedder.retrieval.encode.model import load_encoder
    from embedder.retrieval.faiss_index import FaissIndex

    data = os.path.join(args.run, "data")
    mined = os.path.join(data, "mine-dense", "train.neg.dense.json")
    for path in (mined, os.path.join(data, "dev.json"), os.path.join(data, "corpus.json")):
        if not os.path.isfile(path):
            sys.exit(f"{path}: missing: pass a finished task=beir run with dense negatives")
    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(args.seed)

    # train pairs: every labelled positive (1) and the first N mined negatives (0) of each train query
    anchors, docs, labels = [], [], []
    for _, r in iter_jsonl(mined):
        for p in r["pos"]:
            anchors.append(r["query"]), docs.append(p), labels.append(1.0)
        for n in r["neg"][:args.negatives]:
            anchors.append(r["query"]), docs.append(n), labels.append(0.0)
    train = Dataset.from_dict({"query": anchors, "doc": docs, "label": labels})
    model = CrossEncoder(minilm_path(), num_labels=1, max_length=256, device="cpu")
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor(float(args.negatives)))
    train_args = CrossEncoderTrainingArguments(
        output_dir=os.path.join(args.run, "ce-check-ckpt"), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_ratio=0.1, seed=args.seed,
        save_strategy="no", report_to="none", logging_steps=20, use_cpu=True)
    CrossEncoderTrainer(model=model, args=train_args, train_dataset=train.shuffle(seed=args.seed), loss=loss).train()
    train_s = time.time() - t0

    # dev: the base bi-encoder's ranking of the whole corpus, and the cross-encoder's reranking of its top `depth`
    cfg = compose("train", ["task=beir", "model=minilm"])
    # the corpus texts exactly as the run's in-training evaluation formats them (task=beir's eval_set.key_template)
    # read once into memory: the encode below and the reranking's candidate lookups both use it
    texts = list(open_corpus(os.path.join(data, "corpus.json"), str(cfg.beir.eval_set.key_template)))
    dev = [r for _, r in iter_jsonl(os.path.join(data, "dev.json"))]
    qrels = {r["query_id"]: dict(zip(r["pos_index"], r.get("pos_relevance") or [1] * len(r["pos_index"])))
             for r in dev}
    encoder = load_encoder(cfg.model)
    d_emb = encoder.encode_texts(texts, kind="key")  # (D, d), normalised
    q_emb = encoder.encode_texts([r["query"] for r in dev], kind="query")  # (Q, d)
    _, top = FaissIndex("Flat", "cos", use_gpu=False).build(d_emb).search(q_emb, 100)  # (Q, 100): the one search path
    base = {r["query_id"]: top[i].tolist() for i, r in enumerate(dev)}
    reranked = {}
    for i, r in enumerate(dev):
        cand = top[i, :args.depth].tolist()
        scores = model.predict([(r["query"], texts[c]) for c in cand], batch_size=64, show_progress_bar=False)
        order = np.argsort(-np.asarray(scores), kind="stable")
        reranked[r["query_id"]] = [cand[j] for j in order] + top[i, args.depth:].tolist()
    with open(os.path.join(args.run, "metrics.json"), encoding="utf-8") as f:
        run_metrics = json.load(f)
    out = {"run": args.run, "train_pairs": len(train), "dev_queries": len(dev),
           "base_dev_ndcg@10": graded_ndcg(base, qrels, [10])["ndcg@10"],
           "ce_rerank_dev_ndcg@10": graded_ndcg(reranked, qrels, [10])["ndcg@10"],
           "run_before_dev_ndcg@10": run_metrics["before"]["val/dev/ndcg@10"],
           "run_dev_ndcg@10": run_metrics["after"]["val/dev/ndcg@10"],
           "ce_train_wall_s": train_s, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "settings": {k: v for k, v in vars(args).items() if k != "run"}}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
