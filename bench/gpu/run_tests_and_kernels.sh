#!/usr/bin/env bash
# GPU call 1 of 2 (at most BUDGET_S, default 8.5 minutes; steps in order of priority, each under a timeout):
# install with the native CUDA extension; the CUDA-graph checks of the compiled path first
# (tests/test_cuda_graphs.py: fp32 tokens of Engine(compile=True) on CUDA, graphs on and off, equal the eager
# engine's, and no graph skipped); the whole test suite with the Triton kernels compiled
# (TRITON_INTERPRET=0: the kernel tests move to CUDA through the kernel_device fixture), without the real-model
# and vLLM tiers (they need PyPI packages / network the GPU machine lacks); the kernel microbenchmarks at real
# sizes (bench_kernels: entropy/sample/... vs PyTorch and % of peak bandwidth; bench_verify --full: spec_verify
# vs its baseline over V 32k/128k/152k, B 1..256, K 1/4/8); then qalign against its no-cache baseline at ~1B
# shapes (bf16). With a 15-minute device lease, give this call BUDGET_S=360 and the second the rest.
# Run from the repository root; results in $OUT (or bench/results/gpu): run.txt, run.log (bench/gpu/common.sh),
# kernels_<device>.json/.md, verify_<device>.json/.md, qalign_<device>.json/.md.
set -uo pipefail
. "$(dirname "$0")/common.sh"
step 240 install "$PY" -m pip install -q --no-deps --no-build-isolation -e .
record_environment
# pytest-xdist, when the machine has it, spreads the suite over processes (one GPU is plenty for tiny models)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8" || true)
TAIL_LINES=20 step 150 cuda_graphs "$PY" -m pytest tests/test_cuda_graphs.py -p no:cacheprovider -rfEs \
    --durations=5
TAIL_LINES=40 step 210 tests "$PY" -m pytest tests --ignore=tests/real --ignore=tests/test_cuda_graphs.py \
    -m "not real and not vllm" -p no:cacheprovider -rfEs --durations=15 $XDIST
step 80 bench_kernels "$PY" bench/bench_kernels.py --device cuda --out-dir "$RESULTS"
step 80 bench_verify "$PY" bench/bench_verify.py --device cuda --full --out-dir "$RESULTS"
step 60 bench_qalign "$PY" bench/bench_qalign.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 \
    --vocab 32000 --prompt-lens 512 2048 --out-dir "$RESULTS"
ls -la "$RESULTS"
