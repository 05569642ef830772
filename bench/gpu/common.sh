# Sourced by the GPU scripts: where results go, the script's time budget, and `step`, which runs one command
# under `timeout` (capped by what is left of the budget) and records it. Results go to $OUT (what a device
# call brings back; at most ~8 files per call) or bench/results/gpu:
#   run.txt  the script, date and commit; one line per command: name, exit status (124: timed out), seconds,
#            limit, the command itself; the device and library versions (after the install);
#   run.log  every command's full output.
# BUDGET_S (default 510 s = 8.5 minutes) bounds the whole script; pass less when less device time is left.
# COMMIT names the commit in run.txt where the copy on the device has no .git (pass `git rev-parse --short HEAD`).
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0 FASTALIGN_KERNELS=auto
export MAX_JOBS=${MAX_JOBS:-16}  # parallel compilation of the native extension
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-510}
SCRIPT_START=$SECONDS
LOGS=$(mktemp -d)
{
    echo "# $(basename "$0") at $(date -u +%FT%TZ), commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    printf 'name\tstatus\tseconds\tlimit\tcommand\n'
} | tee -a "$RESULTS/run.txt"

quoted() { printf '%q ' "$@"; }

step() {  # step LIMIT_S NAME COMMAND...: run COMMAND under timeout min(LIMIT_S, budget left)
    local limit=$1 name=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - SCRIPT_START)))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        printf '%s\tskipped: budget spent\t\t\t%s\n' "$name" "$(quoted "$@")" | tee -a "$RESULTS/run.txt"
        return 0
    fi
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? took=$((SECONDS - t0)) command
    command=$(quoted "$@")
    { echo "=== $name (rc=$rc, $took s, limit $limit s): $command"; cat "$LOGS/$name.log"; } >> "$RESULTS/run.log"
    printf '%s\trc=%s\t%ss\tlimit %ss\t%s\n' "$name" "$rc" "$took" "$limit" "$command" | tee -a "$RESULTS/run.txt"
    tail -n "${TAIL_LINES:-12}" "$LOGS/$name.log"
    return 0
}

record_environment() {  # the device and library versions (after the install: the native extension's build)
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
        timeout 60 "$PY" - <<'PY' 2>&1
import torch, transformers, fastalign
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
cuda = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name() if cuda else "cpu", "| torch", torch.__version__, "| cuda",
      torch.version.cuda, "| triton", triton_version, "| transformers", transformers.__version__)
print("native:", fastalign.native_info())
PY
    } | tee -a "$RESULTS/run.txt"
}
