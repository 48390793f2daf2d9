#!/usr/bin/env bash
# Builds, on a machine with PyPI access (this checkout, after `make setup`), everything bench/gpu_session.sh needs on
# a GPU machine that has no network: run it, then send .whl and .gpu along with the checkout (the device tool's
# `carry: [".whl", ".gpu"]`; both are git-ignored).
#   .whl/      wheels the GPU image may lack (hydra-core, omegaconf, antlr4, DeepSpeed built here with
#              DS_BUILD_OPS=0, and faiss-gpu-cu12 for GPU_PY, the GPU machine's Python: one binary, to stay under the
#              device tool's 64 MiB carry limit)
#   .gpu/tok   bert-base-uncased WordPiece files (the bundled MiniLM's), for the bert-base-shape benchmarks
#   .gpu/lmtok the bundled SmolLM2's tokenizer and Llama config, saved with save_pretrained (the 7B scoring shape is
#              built from it with random weights)
# Usage: bash bench/gpu_setup.sh [GPU_PY=3.11]        then check `du -sh .whl .gpu` (the carry limit is 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU_PY=${GPU_PY:-3.11}
rm -rf .whl .gpu
mkdir -p .whl .gpu
# pure-Python wheels (no deps: the image's torch, transformers, lightning and sentence-transformers are used)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
  "hydra-core>=1.3" "omegaconf>=2.3" "antlr4-python3-runtime==4.9.3" 2>/dev/null \
  || "$PY" -m pip wheel --quiet --no-deps --wheel-dir .whl "hydra-core>=1.3" "omegaconf>=2.3" "antlr4-python3-runtime==4.9.3"
# faiss with GPU support, for the GPU machine's Python (CUDA 12 libraries come with the image's torch)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl --python-version "$GPU_PY" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 "faiss-gpu-cu12>=1.8"
# DeepSpeed: built here from source without its CUDA ops (it JIT-compiles what it needs there)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir .whl "deepspeed>=0.14"
"$PY" - <<'EOF'
import os

from transformers import AutoConfig, AutoTokenizer

from embedder.bundled import minilm_path, smollm2_path

AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(".gpu/tok")
folder = smollm2_path()
gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(".gpu/lmtok")
AutoConfig.from_pretrained(folder, gguf_file=gguf).save_pretrained(".gpu/lmtok")
print("tokenizers and the LM config saved under .gpu/")
EOF
du -sh .whl .gpu
size=$(du -sm .whl .gpu | awk '{s += $1} END {print s}')
if [ "$size" -gt 60 ]; then
  echo "error: .whl + .gpu are ${size} MiB; the device tool carries 64 MiB in all" >&2
  exit 1
fi
