"""Benchmark corpus encoding, faiss search and BM25 search, each against a baseline in the same run.

    python bench/encode_search.py                     # CPU defaults (a few minutes on 2 cores)
    python bench/encode_search.py --device cuda --passages 20000 --json out.json

1. Encoding: passages/s of `embedder.retrieval.encode.encode_to_stores` (Lightning predict, length-sorted batches, shards
   written to disk) against sentence-transformers' `SentenceTransformer.encode` on the same model (the bundled
   all-MiniLM-L6-v2 unless --model), the same texts, batch size and max length; the ratio is printed. embedder is
   timed twice: a first encode (tokenises, and caches the token ids) and a later one (reads the cached ids, as
   every re-encode of the same texts does). The in-process `DualEncoder.encode_texts` is timed too. Order
   alternates and the best of --repeats runs counts.
2. faiss: queries/s for Flat (exact) and HNSW32 (efSearch 128) over clustered synthetic vectors, and HNSW's
   recall@k of the exact top k.
3. BM25: index build time and queries/s of the pyserini (Lucene, Java subprocess: JVM start-up included) and bm25s
   backends, same corpus, queries and k.

Texts are generated from the model's own vocabulary with a seeded RNG (lengths lognormal, 10 to 300 words), so the
benchmark needs no data download.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
# tokenizers may use its threads (sentence-transformers and embedder alike); DataLoader workers turn them off

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402


def make_texts(vocab_file: str, n: int, seed: int, min_words: int = 10, max_words: int = 300) -> list[str]:
    words = [w.strip() for w in open(vocab_file, encoding="utf-8")]
    words = [w for w in words if w.isalpha() and w.isascii() and len(w) > 2]
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(60), sigma=0.6, size=n), min_words, max_words).astype(int)
    zipf = 1.0 / np.arange(1, len(words) + 1)  # frequent words more often, like real text
    zipf /= zipf.sum()
    return [" ".join(rng.choice(words, size=k, p=zipf)) for k in lengths]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_encoding(args, texts: list[str]) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedder.modeling.encoder import DualEncoder
    from embedder.retrieval.encode import EncodeJob, encode_to_stores, make_predict_trainer

    torch.manual_seed(0)
    device = args.device
    encoder = DualEncoder(args.model, pooling="mean", normalize=True).to(device)
    st = SentenceTransformer(args.model, device=device)
    st.max_seq_length = args.max_length
    dtype = "auto" if device == "cuda" else "fp32"
    if device == "cuda":  # both in bf16, so the comparison is about the pipeline, not the arithmetic
        st = st.to(torch.bfloat16)
    work = tempfile.mkdtemp(prefix="bench-encode-")
    trainer_kw = {"accelerator": "gpu" if device == "cuda" else "cpu", "devices": 1, "enable_progress_bar": False}

    def ours(cache: str):
        # the token cache lives under $EMBEDDER_CACHE: a fresh folder = a first encode (tokenises and caches the ids),
        # the primed folder = any later encode of the same texts (another model, the next evaluation or mining round)
        os.environ["EMBEDDER_CACHE"] = cache
        path = tempfile.mkdtemp(dir=work)
        job = EncodeJob("corpus", texts, path, kind="key", max_length=args.max_length, shard_size=args.shard_size)
        encode_to_stores(encoder, [job], make_predict_trainer(None, **trainer_kw), batch_size=args.batch_size,
                         dtype=dtype, batch_tokens=args.batch_tokens, num_workers=args.num_workers)

    def sentence_transformers():
        st.encode(texts, batch_size=args.batch_size, show_progress_bar=False, convert_to_numpy=True,
                  normalize_embeddings=True)

    def in_process():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            encoder.encode_texts(texts, kind="key", max_length=args.max_length, batch_size=args.batch_size)

    # warm-up (kernels, tokenizer caches) on a slice, then alternate the timed runs
    st.encode(texts[:args.batch_size], batch_size=args.batch_size, show_progress_bar=False)
    encoder.encode_texts(texts[:args.batch_size], max_length=args.max_length, batch_size=args.batch_size)
    primed = tempfile.mkdtemp(dir=work)
    ours(primed)  # also the warm-up of the predict path
    t_ours, t_cached, t_st, t_inproc = [], [], [], []
    for _ in range(args.repeats):
        t_st.append(best_of(sentence_transformers, 1))
        t_ours.append(best_of(lambda: ours(tempfile.mkdtemp(dir=work)), 1))
        t_cached.append(best_of(lambda: ours(primed), 1))
        t_inproc.append(best_of(in_process, 1))
    shutil.rmtree(work, ignore_errors=True)
    n = len(texts)
    res = {"passages": n, "batch_size": args.batch_size, "max_length": args.max_length, "lengths": args.lengths,
           "batch_tokens": args.batch_tokens, "num_workers": args.num_workers,
           "embedder_encode_to_stores_pps": n / min(t_ours), "sentence_transformers_encode_pps": n / min(t_st),
           "embedder_encode_to_stores_cached_tokens_pps": n / min(t_cached),
           "embedder_encode_texts_pps": n / min(t_inproc)}
    res["ratio_vs_sentence_transformers"] = (res["embedder_encode_to_stores_pps"]
                                             / res["sentence_transformers_encode_pps"])
    res["cached_ratio_vs_sentence_transformers"] = (res["embedder_encode_to_stores_cached_tokens_pps"]
                                                    / res["sentence_transformers_encode_pps"])
    return res


def bench_faiss(args) -> dict:
    import faiss

    from embedder.retrieval.faiss_index import FaissIndex

    # clustered vectors, like text embeddings (topics), rather than structureless Gaussian noise on which every
    # approximate index looks bad: 1000 centres, each point a centre plus noise; queries are perturbed points
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, args.dim), dtype=np.float32)
    x = centres[rng.integers(0, 1000, args.index_size)] + 0.6 * rng.standard_normal((args.index_size, args.dim),
                                                                                   dtype=np.float32)
    q = x[rng.integers(0, args.index_size, args.queries)] + 0.3 * rng.standard_normal((args.queries, args.dim),
                                                                                     dtype=np.float32)
    out = {"vectors": args.index_size, "dim": args.dim, "queries": args.queries, "k": args.k,
           "faiss_threads": faiss.omp_get_max_threads()}
    exact_ids = None
    for name, factory, params in (("flat", "Flat", None), ("hnsw32", "HNSW32", {"efSearch": 128})):
        t = time.perf_counter()
        index = FaissIndex(factory, "cos", use_gpu=False, search_params=params).build(x)
        build = time.perf_counter() - t
        index.search(q[:10], args.k)  # warm-up
        t = time.perf_counter()
        _, ids = index.search(q, args.k)
        search = time.perf_counter() - t
        out[f"{name}_build_s"] = build
        out[f"{name}_qps"] = args.queries / search
        if exact_ids is None:
            exact_ids = ids
        else:
            out[f"{name}_recall_at_k"] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids)]))
    out["hnsw_vs_flat_qps_ratio"] = out["hnsw32_qps"] / out["flat_qps"]
    return out


def bench_bm25(args, corpus: list[str]) -> dict:
    from embedder.retrieval import bm25

    rng = np.random.default_rng(1)
    queries = []
    for i in rng.integers(0, len(corpus), size=args.bm25_queries):
        words = corpus[i].split()
        start = int(rng.integers(0, max(1, len(words) - 5)))
        queries.append(" ".join(words[start:start + 5]))
    out = {"documents": len(corpus), "queries": len(queries), "k": args.k, "threads": args.threads}
    backends = [("bm25s", lambda d: bm25.BM25sBM25(d, threads=args.threads, save_index=False))]
    try:
        bm25.find_java(bm25.required_java(bm25.anserini_jar()))
        backends.append(("pyserini", lambda d: bm25.PyseriniBM25(d, threads=args.threads)))
    except (ImportError, FileNotFoundError, bm25.JavaNotFound) as e:
        out["pyserini_skipped"] = str(e).splitlines()[0]
    tops = {}
    for name, make in backends:
        work = tempfile.mkdtemp(prefix=f"bench-{name}-")
        retriever = make(work)
        t = time.perf_counter()
        retriever.prepare(corpus, queries)
        out[f"{name}_index_s"] = time.perf_counter() - t
        t = time.perf_counter()
        retriever.search(range(1), args.k)  # one query: the fixed cost (a JVM start for pyserini)
        fixed = time.perf_counter() - t
        t = time.perf_counter()
        _, ids = retriever.search(range(len(queries)), args.k)
        total = time.perf_counter() - t
        out[f"{name}_qps"] = len(queries) / total
        out[f"{name}_fixed_cost_s"] = fixed
        out[f"{name}_qps_without_fixed_cost"] = len(queries) / max(total - fixed, 1e-9)
        tops[name] = ids[:, 0]
        shutil.rmtree(work, ignore_errors=True)
    if len(tops) == 2:
        out["top1_agreement"] = float(np.mean(tops["bm25s"] == tops["pyserini"]))
        out["pyserini_vs_bm25s_qps_ratio"] = out["pyserini_qps"] / out["bm25s_qps"]
    return out


def main() -> None:
    from embedder.bundled import minilm_path

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF/sentence-transformers folder (default: the bundled MiniLM)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--passages", type=int, default=1000, help="passages to encode")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--lengths", default="msmarco", choices=["msmarco", "lognormal-words"],
                   help="msmarco: passage lengths like MS MARCO (mean ~92 tokens, one-token words); lognormal-words: "
                        "10-300 Zipf-drawn words")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="embedder's token budget per batch (default: the dense retriever config's)")
    p.add_argument("--num-workers", default="auto",
                   help="embedder's tokenising DataLoader workers: auto (the default a user gets: up to 8 on a GPU, 0 "
                        "on a CPU) or a number")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per encoder (best counts)")
    p.add_argument("--index-size", type=int, default=100_000, help="vectors in the faiss benchmark")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000, help="faiss queries")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--bm25-docs", type=int, default=20_000)
    p.add_argument("--bm25-queries", type=int, default=2000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip", nargs="*", default=[], choices=["encode", "faiss", "bm25"])
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.model == "bert-base":  # bert-base shape with random weights (throughput only), no download
        from train_throughput import model_folder

        args.model = model_folder("bert-base")
    args.model = args.model or minilm_path()
    if args.batch_tokens is None:
        import yaml

        with open(os.path.join(os.path.dirname(HERE), "configs", "retriever", "dense.yaml")) as f:
            args.batch_tokens = yaml.safe_load(f).get("batch_tokens") or 0  # `auto`: resolved per device
        from embedder.data.encode_batches import resolve_batch_tokens

        args.batch_tokens = resolve_batch_tokens(args.batch_tokens, args.device)

    import torch

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}}
    vocab = os.path.join(args.model, "vocab.txt")
    if "encode" not in args.skip:
        if args.lengths == "msmarco":
            import random

            from lengths import msmarco_texts, one_token_words
            from transformers import AutoTokenizer

            words = one_token_words(AutoTokenizer.from_pretrained(args.model))
            texts = msmarco_texts(args.passages, "key", words, random.Random(0), args.max_length)
        else:
            texts = make_texts(vocab, args.passages, seed=0)
        results["encode"] = r = bench_encoding(args, texts)
        print(f"encoding {r['passages']} passages (batch {r['batch_size']}, max_length {r['max_length']}, "
              f"{args.device}):")
        print(f"  embedder encode_to_stores  {r['embedder_encode_to_stores_pps']:9.1f} passages/s (first encode)")
        print(f"    with cached token ids    {r['embedder_encode_to_stores_cached_tokens_pps']:9.1f} passages/s "
              f"(any later encode of the same texts)")
        print(f"  sentence-transformers      {r['sentence_transformers_encode_pps']:9.1f} passages/s")
        print(f"  embedder encode_texts      {r['embedder_encode_texts_pps']:9.1f} passages/s")
        print(f"  ratio embedder / sentence-transformers: {r['ratio_vs_sentence_transformers']:.2f} (first), "
              f"{r['cached_ratio_vs_sentence_transformers']:.2f} (cached token ids)")
    if "faiss" not in args.skip:
        results["faiss"] = r = bench_faiss(args)
        print(f"faiss search, {r['vectors']} x {r['dim']} vectors, {r['queries']} queries, k={r['k']}, "
              f"{r['faiss_threads']} threads:")
        print(f"  Flat     {r['flat_qps']:10.1f} queries/s   (build {r['flat_build_s']:.2f}s)")
        print(f"  HNSW32   {r['hnsw32_qps']:10.1f} queries/s   (build {r['hnsw32_build_s']:.2f}s, "
              f"recall@{r['k']} of exact {r['hnsw32_recall_at_k']:.3f})")
        print(f"  ratio HNSW / Flat: {r['hnsw_vs_flat_qps_ratio']:.2f}")
    if "bm25" not in args.skip:
        results["bm25"] = r = bench_bm25(args, make_texts(vocab, args.bm25_docs, seed=2, max_words=150))
        print(f"BM25, {r['documents']} documents, {r['queries']} queries, k={r['k']}, {r['threads']} threads:")
        print(f"  bm25s     {r['bm25s_qps']:10.1f} queries/s   (index {r['bm25s_index_s']:.2f}s)")
        if "pyserini_qps" in r:
            print(f"  pyserini  {r['pyserini_qps']:10.1f} queries/s   (index {r['pyserini_index_s']:.2f}s; "
                  f"JVM start-up included; {r['pyserini_qps_without_fixed_cost']:.1f} queries/s without the "
                  f"{r['pyserini_fixed_cost_s']:.1f}s a one-query call takes)")
            print(f"  ratio pyserini / bm25s: {r['pyserini_vs_bm25s_qps_ratio']:.2f}; top-1 agreement "
                  f"{r['top1_agreement']:.3f}")
        else:
            print(f"  pyserini skipped: {r['pyserini_skipped']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
