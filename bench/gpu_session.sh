#!/usr/bin/env bash
# One prepared GPU session (run through the device tool; see docs/benchmarks.md), under 10 minutes:
#   1. GPU tests: bf16/fp16 mixed precision, DeepSpeed ZeRO 0/2/3, GPU encoding, the CUDA varlen kernel against
#      padded SDPA (embeddings and gradients), an unpadded bf16 fit with gradient checkpointing;
#   2. training throughput at the recipe's shape: bert-base size, B=100, G=8, gradient checkpointing, bf16,
#      MS MARCO-like lengths: embedder (unpadded) vs padded SDPA vs the reference-like eager step;
#   3. encoding throughput: 30k MS MARCO-like passages, embedder encode_to_stores (a first encode, and one from cached
#      token ids) vs sentence-transformers; then the host side alone (tokenising vs cached ids vs the forward);
#   4. LM scoring throughput: 1,000 MS MARCO-like pairs on a random Llama-2-7B shape, packed vs padded vs the
#      reference's batch-4 left-padded full-logits approach.
# Carried: .whl (wheels the GPU image lacks: hydra, omegaconf, antlr4, deepspeed built with DS_BUILD_OPS=0, faiss-cpu,
# pydantic), .gpu/tok (bert-base-uncased WordPiece files from the bundled MiniLM), .gpu/lmtok (the bundled SmolLM2's
# tokenizer and Llama config, saved with save_pretrained: the 7B shape is built from it with random weights), .gpu/tx (this checkout's
# transformers, used where it imports).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .gpu/tx/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-tx .gpu/tx/*.whl \
    && PYTHONPATH=/tmp/site-tx:$PYTHONPATH python3 -c "import transformers.models.bert.modeling_bert" \
    && export PYTHONPATH=/tmp/site-tx:$PYTHONPATH || echo "carried transformers does not import here; using the image's"
fi
export EMBEDDER_BENCH_TOKENIZER=$PWD/.gpu/tok
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, lightning, sentence_transformers as st; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'lightning', lightning.__version__, 'sentence-transformers', st.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout 170 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_unpadded.py \
  -k "not minilm" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 240 python3 bench/train_throughput.py --model bert-base --device cuda --precision bf16 --batch 100 \
    --group 8 --grad-ckpt --lengths msmarco --warmup 3 --steps 10 --num-workers 4 --json "$OUT/train_bench_gpu.json" \
    2>&1 | grep -v -i warn | tee "$OUT/train_bench_gpu.log" | tail -6
timeout 150 python3 bench/encode_search.py --model bert-base --device cuda --passages 30000 --batch-size 256 \
    --lengths msmarco --num-workers 8 --repeats 2 --skip faiss bm25 --json "$OUT/encode_bench_gpu.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/encode_bench_gpu.log" | tail -8
timeout 90 python3 bench/profile_encode.py --model bert-base --device cuda --passages 30000 2>&1 | grep -v -i warn \
    | tee "$OUT/profile_encode_gpu.log" | grep -E "one process|end to end"
timeout 200 python3 bench/score_throughput.py --lm .gpu/lmtok --random-init --shape llama2-7b --device cuda \
    --lengths msmarco --pairs 1000 --batch-size 128 --max-tokens 32768 --rounds 2 --json "$OUT/score_bench_gpu.json" \
    2>&1 | grep -v -i warn | tee "$OUT/score_bench_gpu.log" | tail -8
