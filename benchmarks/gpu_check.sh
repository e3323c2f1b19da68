#!/usr/bin/env bash
# The GPU check: install ropescope on a machine with an NVIDIA GPU, run the tests marked `gpu`, and measure the
# streaming entropy against a plain sdpa forward on random weights of Llama-3.1-8B's shape in bfloat16 at 8K, 16K
# and 32K tokens (targets: at most 1.2x the plain forward's peak GPU memory and 2x its time), then eager
# output_attentions beside it at 2K and 4K, the lengths where its matrices fit.
#
# Not yet run: this script was written on a machine without a GPU. Check what it prints before trusting it, and
# record the card and the tables in benchmarks/README.md.
#
# Usage, from the repository root:
#     bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]        # default folder: gpu-check
# Needs: an Ampere or newer GPU (the flash kernel) with about 40 GB free (16 GB of bfloat16 weights plus a 32K
# forward), Python 3.11, and either network access for pip (PyPI's torch==2.13.0 wheel for Linux is a CUDA build)
# or, offline, ROPESCOPE_GPU_PYTHON naming an interpreter that already has CUDA torch 2.13.0 and the other
# dependencies (ropescope is then installed into it without dependencies). About 10 minutes on an H100.
set -euo pipefail

out="${1:-gpu-check}"
mkdir -p "$out"

source "$(dirname "$0")/gpu_env.sh"

# Entropy capture against a plain sdpa forward (and eager where it fits), one fresh process per measurement.
"$python" benchmarks/entropy_memory.py --model llama-3.1-8b --device cuda --dtype bfloat16 \
    2>&1 | tee "$out/entropy_memory_8b.txt"
"$python" benchmarks/entropy_memory.py --model llama-3.1-8b --device cuda --dtype bfloat16 \
    --lengths 2048 4096 --streaming-lengths 2>&1 | tee "$out/entropy_memory_8b_eager.txt"

echo "results in $out/"
