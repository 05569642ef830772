#!/usr/bin/env bash
# GPU call 2 of 2 (about 9 minutes on an H100): end-to-end benchmarks at realistic shapes, bf16, random-init
# Llama-style models (a ~1B target and a ~100M draft derived from it, so acceptance is controlled):
# sd / sss (chain and tree) against plain decoding and Hugging Face assisted generation at batch 1 and 16,
# cards and qalign against their no-cache baselines. Results go to $OUT (or bench/results/gpu).
set -uo pipefail
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
timeout 270 python3 bench/bench_speculative.py --device cuda --dtype bf16 --target-size 1b --draft-size 100m \
    --batch 1,16 --max-new-tokens 128 --out-dir "$RESULTS" 2>&1 | tail -20 | tee "$RESULTS/e2e.log"
python3 bench/gpu/make_models.py /tmp/fastalign_models
timeout 150 python3 bench/bench_cards.py --device cuda --dtype bf16 --target /tmp/fastalign_models/target \
    --reward /tmp/fastalign_models/reward --max-new-tokens 128 --out-dir "$RESULTS" 2>&1 | tail -10 | tee -a "$RESULTS/e2e.log"
timeout 120 python3 bench/bench_qalign.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000 \
    --prompt-lens 512 2048 --out-dir "$RESULTS" 2>&1 | tail -10 | tee -a "$RESULTS/e2e.log"
ls -la "$RESULTS"
