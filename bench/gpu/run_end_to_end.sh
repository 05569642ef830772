#!/usr/bin/env bash
# GPU call 2 of 2 (at most BUDGET_S, default 8.5 minutes: pass what the device lease has left, less a minute;
# steps in order of priority, each under a timeout): end-to-end speed at realistic shapes, bf16,
# random-init Llama-style models (a ~1B target and a ~100M draft made of its first layer, calibrated so the
# acceptance is controlled):
# - bench_engine, world 1b: the eager engine vs the compiled one (Engine(compile=True)) in torch.compile's
#   default mode vs the compiled one with CUDA graphs (--graphs) vs transformers' generate (eager, and static
#   cache + torch.compile): sample at batch 1 and 16 and sd chain first, then sss chain, sd/sss tree (the file is
#   rewritten after every case: a timeout keeps the cases measured);
# - bench_speculative: sd/sss (chain and tree) against plain decoding and HF assisted generation at batch 1,
#   and against plain decoding at batch 16;
# - bench_cards: cards against its no-cache baseline (a ~1B target, a ~0.3B reward: bench/gpu/make_models.py).
# Run from the repository root after run_tests_and_kernels.sh (or on a fresh machine: it installs too); results
# in $OUT (or bench/results/gpu): run.txt, run.log (bench/gpu/common.sh), engine_<device>_1b.json/.md (rewritten
# after every case: a timeout keeps the cases measured), speculative_<device>.json/.md, cards_<device>.json/.md.
set -uo pipefail
. "$(dirname "$0")/common.sh"
MODELS=${MODELS:-/tmp/fastalign_models}
step 240 install "$PY" -m pip install -q --no-deps --no-build-isolation -e .
record_environment
step 300 bench_engine "$PY" bench/bench_engine.py --device cuda --dtype bf16 --worlds 1b --graphs \
    --cases sample_b1,sample_b16,sd_chain,sss_chain,sd_tree,sss_tree --max-new-tokens 64 --repeats 2 \
    --tag 1b --out-dir "$RESULTS"
step 150 bench_speculative "$PY" bench/bench_speculative.py --device cuda --dtype bf16 --target-size 1b \
    --draft-size 100m --batch 1,16 --max-new-tokens 128 --out-dir "$RESULTS"
step 60 make_models "$PY" bench/gpu/make_models.py "$MODELS"
step 75 bench_cards "$PY" bench/bench_cards.py --device cuda --dtype bf16 --target "$MODELS/target" \
    --reward "$MODELS/reward" --max-new-tokens 128 --out-dir "$RESULTS"
ls -la "$RESULTS"
