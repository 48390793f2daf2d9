#!/usr/bin/env bash
# One prepared GPU session (run through the device tool; see docs/benchmarks.md):
#   GPU tests (bf16/fp16 mixed precision, DeepSpeed ZeRO 0/2/3, GPU encoding) and the training-throughput benchmark
#   at the recipe's shapes (BERT-base size, batch 100, group 8, lengths 256/256, gradient checkpointing, bf16).
# Carried: .whl (wheels for packages the GPU image lacks: hydra, omegaconf, deepspeed built with DS_BUILD_OPS=0,
# faiss-cpu) and .gpu/tok (the bert-base-uncased WordPiece tokenizer from the bundled MiniLM).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import torch, transformers, lightning, deepspeed, hydra
print("torch", torch.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__,
      "deepspeed", deepspeed.__version__, "hydra", hydra.__version__)
from transformers import AutoTokenizer, BertConfig, BertModel
tok = AutoTokenizer.from_pretrained(".gpu/tok")
torch.manual_seed(0)
BertModel(BertConfig()).save_pretrained("/tmp/bert-base")  # bert-base shape, random weights: throughput only
tok.save_pretrained("/tmp/bert-base")
PY
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout 100 python3 bench/train_throughput.py --model /tmp/bert-base --device cuda --precision bf16 --batch 100 \
    --group 8 --qlen 256 --klen 256 --grad-ckpt --steps 3 --warmup 1 --json "$OUT/train_bench_gpu.json" 2>&1 \
    | grep -v Warning | tee "$OUT/train_bench_gpu.log" | tail -6
