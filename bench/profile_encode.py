"""Where encoding time goes: tokenisation alone (and batches from cached token ids), the GPU forward alone on pre-tokenised length-sorted batches, and
`encode_to_stores` end to end under cProfile (top functions by own time). For the host-side work of issue 9.

    python bench/profile_encode.py --model bert-base --device cuda --passages 30000
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--passages", type=int, default=2000)
    p.add_argument("--batch-tokens", type=int, default=32768)
    args = p.parse_args()
    import torch
    from lengths import msmarco_texts, one_token_words
    from train_throughput import model_folder

    from embedder.modeling.encoder import DualEncoder
    from embedder.retrieval.encode import EncodeJob, encode_to_stores, make_predict_trainer
    from embedder.retrieval.encode.predict import _BatchStream, model_inputs, token_keys

    path = model_folder(args.model)
    enc = DualEncoder(path, pooling="cls").to(args.device)
    texts = msmarco_texts(args.passages, "key", one_token_words(enc.tokenizer), random.Random(0))
    # the batches encode_to_stores makes (tokenised, length-sorted, filled to the token budget), built up front
    job = EncodeJob("c", texts, os.path.join(tempfile.mkdtemp(), "s"), kind="key", max_length=256)
    stream = _BatchStream([(0, 0)], [job], [[range(len(texts))]], enc.tokenizer, 256, args.batch_tokens)
    os.environ["EMBEDDER_CACHE"] = tempfile.mkdtemp()  # a fresh token cache: the first pass tokenises and caches
    keys = token_keys(enc.tokenizer, [job])
    cached = _BatchStream([(0, 0)], [job], [[range(len(texts))]], enc.tokenizer, 256, args.batch_tokens,
                          token_keys=keys)
    t = time.perf_counter()
    batches = [model_inputs(b) for b in stream]
    t_tok = time.perf_counter() - t
    t = time.perf_counter()
    n_cached = sum(len(b["input_ids"]) for b in cached)  # tokenises and writes the cache
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    n_cached = sum(len(b["input_ids"]) for b in cached)  # reads it
    t_read = time.perf_counter() - t
    assert n_cached == len(texts)
    dev = torch.device(args.device)
    half = dev.type == "cuda"
    gpu_batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    enc.eval()
    for _ in range(2):
        if half:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=half):
            for b in gpu_batches:
                enc.encode(b, "key")
        if half:
            torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t
    print(f"{len(texts)} passages, one process: tokenise and batch {len(texts) / t_tok:,.0f}/s; the same writing the "
          f"token cache {len(texts) / t_write:,.0f}/s; batch from cached token ids {len(texts) / t_read:,.0f}/s; forward "
          f"only (pre-tokenised, on device, {len(batches)} batches) {len(texts) / t_fwd:,.0f}/s")
    prof = cProfile.Profile()
    work = tempfile.mkdtemp()
    trainer = make_predict_trainer(None, accelerator="gpu" if half else "cpu", devices=1, enable_progress_bar=False)
    t = time.perf_counter()
    prof.enable()
    encode_to_stores(enc, [EncodeJob("c", texts, os.path.join(work, "s"), kind="key", max_length=256)], trainer,
                     batch_tokens=args.batch_tokens)
    prof.disable()
    print(f"encode_to_stores end to end {len(texts) / (time.perf_counter() - t):,.0f}/s")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue()[-6000:])


if __name__ == "__main__":
    main()
