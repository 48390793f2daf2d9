#!/usr/bin/env bash
# Builds, on a machine with PyPI access (this checkout, after `make setup`), everything bench/gpu_session.sh needs on
# a GPU machine that has no network: run it, then send .whl and .gpu along with the checkout (the device tool's
# `carry: [".whl", ".gpu"]`; both are git-ignored).
#   .whl/      wheels the GPU image lacks, for GPU_PY (the GPU machine's Python, 3.12 in the device image of
#              2026-12): hydra-core, omegaconf and antlr4 (the versions this checkout's venv runs), DeepSpeed built
#              here with DS_BUILD_OPS=0 and what it imports that the image lacks (pydantic, hjson), and faiss:
#              FAISS=cpu (default) carries faiss-cpu; FAISS=gpu carries faiss-gpu-cu12 (48 MB: it links the CUDA 12
#              cuBLAS and runtime, which a CUDA 13 image may not have: gpu_session.sh probes for them first)
#   .gpu/tok   bert-base-uncased WordPiece files (the bundled MiniLM's), for the bert-base-shape benchmarks
#   .gpu/lmtok the bundled SmolLM2's tokenizer and Llama config, saved with save_pretrained (the 7B scoring shape is
#              built from it with random weights)
# Usage: [GPU_PY=3.12] [FAISS=cpu|gpu] bash bench/gpu_setup.sh     (the carry limit is 64 MiB with the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU_PY=${GPU_PY:-3.12}
FAISS=${FAISS:-cpu}
rm -rf .whl .gpu
mkdir -p .whl .gpu
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
binary() {  # binary wheels for the GPU machine's Python and platform, no dependencies
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest .whl --python-version "$GPU_PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
# the versions this venv runs (no deps: the image's torch, transformers, lightning and sentence-transformers are used)
binary "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" "pydantic==$(version pydantic)" \
  "pydantic-core==$(version pydantic-core)" "annotated-types==$(version annotated-types)" \
  "typing-inspection==$(version typing-inspection)" "typing-extensions==$(version typing-extensions)" \
  "hjson==$(version hjson)"
# antlr4 4.9.3 (what hydra 1.3 pins) exists only as a source distribution: build its pure-Python wheel
"$PY" -m pip wheel --quiet --no-deps --wheel-dir .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
if [ "$FAISS" = gpu ]; then
  binary "faiss-gpu-cu12>=1.8" "nvidia-cuda-runtime-cu12>=12.1"
else
  binary "faiss-cpu==$(version faiss-cpu)"
fi
# DeepSpeed: built here from source without its CUDA ops (it JIT-compiles what it needs there)
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir .whl "deepspeed==$(version deepspeed)"
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
