#!/usr/bin/env bash
# One prepared GPU session, under 10 minutes, that fails when a step fails. First, where there is PyPI access:
#   bash bench/gpu_setup.sh          # builds .whl (hydra, DeepSpeed, faiss-gpu-cu12 ...) and .gpu (tokenizers)
# then on the GPU machine (the device tool: carry [".whl", ".gpu"]):
#   bash bench/gpu_session.sh        # writes its logs and JSON results under $OUT
# Steps (each is run even when an earlier one failed, so one session shows everything; the exit status is non-zero
# when any failed, and the summary at the end names them):
#   1. GPU tests (-ra: every skip and xfail with its reason): bf16/fp16 mixed precision, DeepSpeed ZeRO 0/2/3 (the
#      export equals the checkpoint's gathered weights), GPU encoding, the CUDA varlen kernel against padded SDPA and
#      used in a bf16 fit, faiss-gpu top-k against CPU faiss (a missing faiss-gpu fails, not skips);
#   2. training throughput at the recipe's shape: bert-base size, B=100, G=8, gradient checkpointing, bf16,
#      MS MARCO-like lengths: embedder (unpadded) vs padded SDPA vs the reference-like eager step;
#   3. encoding throughput: 30k MS MARCO-like passages, embedder encode_to_stores with the defaults a user gets
#      vs sentence-transformers; then the host side alone (tokenising vs cached ids vs the forward);
#   4. a LoRA (r=16) step of a Qwen2.5-0.5B-shape decoder embedder (random weights), B=32, G=8, bf16: packed
#      (varlen kernel) vs padded SDPA;
#   5. LM scoring throughput: 1,000 MS MARCO-like pairs on a random Llama-2-7B shape, packed vs padded vs the
#      reference's batch-4 left-padded full-logits approach.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
for need in .whl .gpu/tok .gpu/lmtok; do
  [ -e "$need" ] || { echo "error: $need is missing: run bench/gpu_setup.sh where there is PyPI access, and carry .whl and .gpu" >&2; exit 2; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EMBEDDER_BENCH_TOKENIZER=$PWD/.gpu/tok
export EMBEDDER_REQUIRE_GPU_FAISS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, lightning, sentence_transformers as st, faiss; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'lightning', lightning.__version__, 'sentence-transformers', st.__version__, \
'faiss', faiss.__version__, 'faiss GPUs', faiss.get_num_gpus())" | tee -a "$OUT/gpu.txt"

failed=()
step() {  # step NAME SECONDS COMMAND...: the command's whole output goes to $OUT/NAME.log, its tail to stdout
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local rc=0
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  grep -v -i warn "$OUT/$name.log" | tail -15 || true
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED (exit $rc${rc/124/, timed out}); the whole log: $OUT/$name.log"
    failed+=("$name")
  fi
}
step gpu_tests 200 python3 -m pytest -ra -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_unpadded.py -k "not minilm"
step train_bench 240 python3 bench/train_throughput.py --model bert-base --device cuda --precision bf16 --batch 100 \
  --group 8 --grad-ckpt --lengths msmarco --warmup 3 --steps 10 --json "$OUT/train_bench_gpu.json"
step encode_bench 150 python3 bench/encode_search.py --model bert-base --device cuda --passages 30000 \
  --lengths msmarco --repeats 2 --skip faiss bm25 --json "$OUT/encode_bench_gpu.json"
step profile_encode 90 python3 bench/profile_encode.py --model bert-base --device cuda --passages 30000
step lora_bench 150 python3 bench/train_throughput.py --model qwen-0.5b --lora 16 --sides embedder,sdpa_padded \
  --device cuda --precision bf16 --batch 32 --group 8 --grad-ckpt --lengths msmarco --warmup 2 --steps 6 \
  --json "$OUT/lora_bench_gpu.json"
step score_bench 200 python3 bench/score_throughput.py --lm .gpu/lmtok --random-init --shape llama2-7b --device cuda \
  --lengths msmarco --pairs 1000 --batch-size 128 --max-tokens 32768 --rounds 2 --json "$OUT/score_bench_gpu.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED steps: ${failed[*]}" >&2
  exit 1
fi
echo "every step passed"
