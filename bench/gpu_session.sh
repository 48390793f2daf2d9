#!/usr/bin/env bash
# One prepared GPU session that fails when a step fails and ends before its deadline. First, where there is PyPI
# access:
#   bash bench/gpu_setup.sh          # builds .whl (hydra, DeepSpeed, faiss ...) and .gpu (tokenizers)
# then on the GPU machine (the device tool: carry [".whl", ".gpu"]):
#   DEADLINE=560 bash bench/gpu_session.sh [STEP ...]     # default: every step, in the order of ALL below (what the
#                                                           last session could not verify first)
# Every log and JSON result is written under $LOGS and packed, after each step, into $OUT/gpu_logs.tgz (the device
# tool brings back at most 8 files); the summary is $OUT/summary.txt. Each step runs under `timeout`, cut to what is
# left of DEADLINE seconds (a step with under 30 s left is skipped, and counts as failed), so the packing always
# happens. Steps run even when an earlier one failed, so one session shows everything; the exit status is non-zero
# when any failed, and the summary names them.
#   probe       the GPU, the versions, whether faiss sees the GPU, and whether the CUDA 12 cuBLAS/runtime that
#               faiss-gpu-cu12 links are on the machine
#   gpu_tests   pytest -ra --runxfail --tb=long (an xfail's whole traceback is in the log) on tests/test_gpu.py and
#               tests/test_unpadded.py, 6 processes: bf16/fp16 mixed precision, DeepSpeed ZeRO 0/2/3 (the export
#               equals the checkpoint's gathered weights), ZeRO-3 in-training evaluation, LoRA under ZeRO-2, GPU
#               encoding, the CUDA varlen kernel against padded SDPA and used in a bf16 fit, faiss-gpu top-k against
#               CPU faiss (skipped without faiss-gpu, and a failure when EMBEDDER_REQUIRE_GPU_FAISS=1)
#   train_bench training throughput at the recipe's shape: bert-base size, B=100, G=8, gradient checkpointing, bf16,
#               MS MARCO-like lengths: embedder (unpadded) vs padded SDPA vs the reference-like eager step
#   encode_bench 30k MS MARCO-like passages, embedder encode_to_stores with the defaults a user gets (first encode
#               and cached token ids) vs sentence-transformers
#   score_bench LM scoring, 1,000 MS MARCO-like pairs on a random Llama-2-7B shape, packed vs padded vs the
#               reference's batch-4 left-padded full-logits approach
#   lora_bench  a LoRA (r=16) step of a Qwen2.5-0.5B-shape decoder embedder (random weights), B=32, G=8, bf16:
#               packed (varlen kernel) vs padded SDPA
#   profile_encode the host side of encoding alone (tokenising vs cached ids vs the forward)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
LOGS=${LOGS:-/tmp/gpu-logs}
DEADLINE=${DEADLINE:-560}
START=$(date +%s)
mkdir -p "$OUT" "$LOGS"
for need in .whl .gpu/tok .gpu/lmtok; do
  [ -e "$need" ] || { echo "error: $need is missing: run bench/gpu_setup.sh where there is PyPI access, and carry .whl and .gpu" >&2; exit 2; }
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "error: installing the carried wheels failed" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 EMBEDDER_BENCH_TOKENIZER=$PWD/.gpu/tok
export EMBEDDER_CACHE=/tmp/embedder-cache
pack() { tar czf "$OUT/gpu_logs.tgz.part" -C "$LOGS" . && mv "$OUT/gpu_logs.tgz.part" "$OUT/gpu_logs.tgz"; }
say() { echo "$@" | tee -a "$OUT/summary.txt"; }

failed=()
step() {  # step NAME SECONDS COMMAND...: the whole output goes to $LOGS/NAME.log, its tail to stdout and the summary
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - ($(date +%s) - START) - 15 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    say "=== $name SKIPPED: ${left}s left of the ${DEADLINE}s deadline"
    failed+=("$name(skipped)")
    return
  fi
  say "=== $name (limit ${limit}s, at $(( $(date +%s) - START ))s)"
  local rc=0 t0=$(date +%s)
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  grep -v -i warn "$LOGS/$name.log" | tail -15 | tee -a "$OUT/summary.txt"
  if [ "$rc" -ne 0 ]; then
    local why=""
    [ "$rc" -eq 124 ] && why=", timed out"
    say "=== $name FAILED (exit $rc$why) after $(( $(date +%s) - t0 ))s; the whole log: $name.log"
    failed+=("$name")
  else
    say "=== $name passed in $(( $(date +%s) - t0 ))s"
  fi
  pack
}
probe() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || return 1
  python3 -c "import torch, transformers, lightning, sentence_transformers as st, deepspeed, peft, faiss; \
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__, 'sentence-transformers', st.__version__, \
'deepspeed', deepspeed.__version__, 'peft', peft.__version__, 'faiss', faiss.__version__, \
'faiss GPUs', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0)" || return 1
  echo "cuBLAS libraries (faiss-gpu-cu12 links libcublas.so.12):"
  find /usr/local /opt \( -name 'libcublas.so.*' -o -name 'libcudart.so.*' \) 2>/dev/null | head -8
}
export -f probe
ALL=(probe gpu_tests lora_bench score_bench train_bench encode_bench profile_encode)  # unverified fixes first
STEPS=("${@:-${ALL[@]}}")
for s in "${STEPS[@]}"; do
  case $s in
    probe) step probe 60 bash -c probe ;;
    gpu_tests) step gpu_tests 170 python3 -m pytest -ra -q -n 6 --runxfail --tb=long -p no:cacheprovider \
      -o addopts="" tests/test_gpu.py tests/test_unpadded.py -k "not minilm" ;;
    train_bench) step train_bench 150 python3 bench/train_throughput.py --model bert-base --device cuda --precision bf16 \
      --batch 100 --group 8 --grad-ckpt --lengths msmarco --warmup 3 --steps 10 --json "$LOGS/train_bench_gpu.json" ;;
    encode_bench) step encode_bench 200 python3 bench/encode_search.py --model bert-base --device cuda --passages 30000 \
      --lengths msmarco --repeats 2 --skip faiss bm25 --json "$LOGS/encode_bench_gpu.json" ;;
    score_bench) step score_bench 120 python3 bench/score_throughput.py --lm .gpu/lmtok --random-init --shape llama2-7b \
      --device cuda --lengths msmarco --pairs 1000 --batch-size 128 --max-tokens 32768 --rounds 2 \
      --json "$LOGS/score_bench_gpu.json" ;;
    lora_bench) step lora_bench 100 python3 bench/train_throughput.py --model qwen-0.5b --lora 16 \
      --sides embedder,sdpa_padded --device cuda --precision bf16 --batch 32 --group 8 --grad-ckpt --lengths msmarco \
      --warmup 2 --steps 6 --json "$LOGS/lora_bench_gpu.json" ;;
    profile_encode) step profile_encode 60 python3 bench/profile_encode.py --model bert-base --device cuda \
      --passages 30000 ;;
    *) say "unknown step $s (steps: ${ALL[*]})"; failed+=("$s") ;;
  esac
done
pack
if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED steps: ${failed[*]}"
  exit 1
fi
say "every step passed"
