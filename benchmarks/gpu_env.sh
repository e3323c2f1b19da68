# Sourced by the GPU scripts: records the card, installs ropescope into "$out/venv" (or into
# $ROPESCOPE_GPU_PYTHON, an interpreter that already has CUDA torch 2.13.0), checks that torch sees CUDA and runs
# the tests marked `gpu`. Sets $python. Needs $out.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.csv"

if [[ -n "${ROPESCOPE_GPU_PYTHON:-}" ]]; then
    python="$ROPESCOPE_GPU_PYTHON"
    "$python" -m pip install -q --no-deps -e '.[test]'
else
    python3.11 -m venv "$out/venv"
    python="$out/venv/bin/python"
    "$python" -m pip install -q -e '.[test]'
fi

"$python" - <<'PY' | tee "$out/torch.txt"
import torch
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} sees no CUDA device: install a CUDA build of torch 2.13.0")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"capability {torch.cuda.get_device_capability()}, "
      f"flash attention available: {torch.backends.cuda.is_flash_attention_available()}")
PY

# The GPU tests: the CUDA kernels against float64 brute force, and capture on CUDA against eager attention.
"$python" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/pytest_gpu.txt"
