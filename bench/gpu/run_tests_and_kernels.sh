#!/usr/bin/env bash
# GPU call 1 of 2 (about 8 minutes on an H100): install with the native CUDA extension, run the whole test
# suite with the Triton kernels compiled (not interpreted), then the kernel microbenchmarks at real sizes.
# Run from the repository root on a CUDA machine; results go to $OUT (or bench/results/gpu).
set -uo pipefail
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0 FASTALIGN_KERNELS=auto
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 - <<'PY' | tee "$RESULTS/environment.txt"
import torch, triton, transformers, fastalign
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| transformers", transformers.__version__)
print("native:", fastalign.native_info())
PY
timeout 300 python3 -m pytest -q -x tests -p no:cacheprovider 2>&1 | tail -40 | tee "$RESULTS/tests.log"
timeout 150 python3 bench/bench_kernels.py --device cuda --out-dir "$RESULTS" 2>&1 | tail -5
timeout 150 python3 bench/bench_verify.py --device cuda --full --out-dir "$RESULTS" 2>&1 | tail -5
ls -la "$RESULTS"
