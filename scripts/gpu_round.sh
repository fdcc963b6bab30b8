#!/usr/bin/env bash
# One prepared round of GPU measurements, for a lent GPU machine (issues #4 and #6).
#
#   scripts/gpu_round.sh OUT_DIR [DATA_DIR]
#
# DATA_DIR: a dataset in the Oxford-IIIT Pet layout; without it, the synthetic sample, written
# into the round's scratch folder.
#
# Runs, most important first, each stage under a time limit and on to the next if one fails:
#   env            the GPU, driver, Python and package versions
#   bench-b32      labseg bench at 256 px, batch 32, bf16 autocast, with the 60-epoch estimate
#                  (issue #4's headline: resnet34_unet train images/s and a full 60-epoch run)
#   syncs          host-device syncs in 2 epochs of fit, counted by call site
#                  (torch.cuda.set_sync_debug_mode; the step loop should have none)
#   train-r34      labseg train --arch resnet34_unet --img-size 256 --evaluate on DATA_DIR
#   bench-b64      the same benchmark at batch 64
#   bench-fp32     batch 32 without autocast
#   train-unet     labseg train --arch unet --img-size 256 --evaluate on DATA_DIR
#   bench-compile  batch 64 with torch.compile
# and writes at most 7 flat files into OUT_DIR (what the device tool brings back): env.txt,
# log.txt (everything printed), bench.jsonl (every bench record, each tagged with its stage),
# runs.jsonl (per run: summary.json and the test evaluations of best.pt and last.pt) and one
# metrics-RUN.csv per run. Run folders, checkpoints and caches stay on the machine.
#
# The machine may lack labseg's notebook dependencies (jupyter, papermill): the CLI needs only
# torch, torchvision, numpy, pillow, scipy, matplotlib, tqdm, pyyaml and pandas, so the script
# runs labseg from this checkout (PYTHONPATH) with the machine's python3, uninstalled.
#
# Environment:
#   GPU_ROUND_DEADLINE  seconds for the whole round (default 420); a stage that would not fit in
#                       what is left is skipped and logged as skipped
#   GPU_ROUND_DEVICE    cuda (default), or cpu for a rehearsal on a machine without a GPU
#   GPU_ROUND_QUICK     1: tiny settings (64 px, 2 epochs, --quick benches) for that rehearsal
#   GPU_ROUND_STAGES    the stages to run, space-separated (default: all, in the order above)
#   PYTHON              the interpreter (default python3)
set -uo pipefail

OUT=${1:?usage: scripts/gpu_round.sh OUT_DIR [DATA_DIR]}
SYNTHETIC=
DATA=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_ROUND_DEVICE:-cuda}
DEADLINE=${GPU_ROUND_DEADLINE:-420}
QUICK=${GPU_ROUND_QUICK:-0}
STAGES=${GPU_ROUND_STAGES:-env bench-b32 syncs train-r34 bench-b64 bench-fp32 train-unet bench-compile}

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/log.txt"
: >"$LOG"
say() { echo "gpu_round: $*" | tee -a "$LOG"; }

if [ -n "$DATA" ]; then     # made absolute before the cd below
    if [ ! -d "$DATA" ]; then
        say "error: DATA_DIR $DATA is not a folder (expected the Oxford-IIIT Pet layout: images/, annotations/)"
        exit 2
    fi
    DATA=$(cd "$DATA" && pwd)
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$ROOT" || exit 2
START=$SECONDS
# Run folders and the data cache: their checkpoints (100-300 MB) cannot come back, and go at the end.
RUNS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/labseg-gpu-round-XXXXXX") || exit 2
trap 'rm -rf "$RUNS_DIR"' EXIT
if [ "$QUICK" = 1 ]; then   # a rehearsal of every command, in seconds (tests/test_gpu_round.py)
    SIZE=32; EPOCHS=1; TRAIN_BUDGET=60s; SMALL=2; LARGE=4; BENCH_MODE=(--quick --rounds 1)
    EXTRA_TRAIN=(--max-train-images 8)
else
    SIZE=256; EPOCHS=200; TRAIN_BUDGET=150s; SMALL=32; LARGE=64; BENCH_MODE=(); EXTRA_TRAIN=()
fi
if [ -z "$DATA" ]; then     # none given: the synthetic sample, written here (data/ is not in a checkout)
    DATA="$RUNS_DIR/sample"
    "$PYTHON" -c "import sys; from labseg.synthetic import write_synthetic_dataset as w; w(sys.argv[1])" "$DATA" \
        || { say "error: could not write the synthetic sample to $DATA"; exit 2; }
    SYNTHETIC=" (the synthetic sample)"
fi
DATA_ARGS=(--data "$DATA")

# stage NAME MIN_SECONDS LIMIT_SECONDS FUNCTION ARGS...: run the stage unless less than
# MIN_SECONDS are left of the deadline; its labseg command runs under `timeout LIMIT` (cut to what
# is left), and an interrupted `labseg train` still leaves its records (collect, below).
stage() {
    local name=$1 need=$2 limit=$3; shift 3
    case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((DEADLINE - (SECONDS - START)))
    if [ "$left" -lt "$need" ]; then
        say "$name: skipped, ${left}s left of the ${DEADLINE}s deadline and it needs ${need}s"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    LIMIT=$limit
    say "$name: start (limit ${limit}s, $((SECONDS - START))s into the round): $*"
    local t0=$SECONDS rc
    "$@" >>"$LOG" 2>&1
    rc=$?
    say "$name: rc $rc after $((SECONDS - t0))s"
    return 0
}

limited() { timeout --signal=INT --kill-after=20 "$LIMIT" "$@"; }

bench() {   # bench STAGE_NAME ARGS...: JSON records to bench.jsonl, tagged with the stage; the table to the log
    local tag=$1; shift
    # --budget: two thirds of the stage's limit, so that the bench cuts its rounds (up to 5, at
    # least 2) and writes its records before `timeout` would stop it with none
    limited "$PYTHON" -m labseg.cli bench --device "$DEVICE" --sizes "$SIZE" --budget $((LIMIT * 2 / 3)) \
        "${BENCH_MODE[@]}" "${DATA_ARGS[@]}" "$@" \
        | "$PYTHON" -c 'import json, sys
out = open(sys.argv[2], "a")
for line in sys.stdin:
    try:
        rec = json.loads(line)
    except ValueError:          # the table at the end
        print(line, end="", flush=True)
        continue
    rec["stage"] = sys.argv[1]
    out.write(json.dumps(rec) + "\n"); out.flush()' "$tag" "$OUT/bench.jsonl"
}

train() {   # train RUN ARCH: one run on DATA at SIZE, evaluated; its records are copied to OUT
    local run=$1 arch=$2 rc
    limited "$PYTHON" -m labseg.cli train --arch "$arch" "${DATA_ARGS[@]}" --img-size "$SIZE" --epochs "$EPOCHS" \
        --time-budget "$TRAIN_BUDGET" --device "$DEVICE" --output-dir "$RUNS_DIR" --cache-dir "$RUNS_DIR/cache" --run-name "$run" \
        --evaluate "${EXTRA_TRAIN[@]}"
    rc=$?
    collect "$run"
    return $rc
}

collect() { # whatever the run left, even after a timeout: metrics.csv and one runs.jsonl line
    local dir="$RUNS_DIR/$1"
    [ -f "$dir/metrics.csv" ] && cp "$dir/metrics.csv" "$OUT/metrics-$1.csv"
    "$PYTHON" - "$dir" >>"$OUT/runs.jsonl" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
def read(name):
    try:
        return json.loads((run / name).read_text())
    except (OSError, ValueError) as e:
        return {"missing": f"{name}: {e.__class__.__name__}"}
record = {"run": run.name, "summary": read("summary.json"), "config": read("config.json")}
for name in ("eval_test.json", "eval_test_last.json"):
    e = read(name)
    record[name[:-5]] = {k: e.get(k) for k in ("checkpoint", "dice", "iou", "images", "per_breed", "tta",
                                                "threshold_tuned", "tta_threshold_tuned", "missing") if k in e}
print(json.dumps(record))
EOF
}

syncs() {   # host-device syncs in 2 epochs of training, by the line of code that makes them (CUDA)
    limited "$PYTHON" - "$DEVICE" "$SIZE" "$RUNS_DIR" "${DATA_ARGS[@]}" <<'EOF'
import collections, sys, warnings
import torch
device, size, runs, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]    # argv[4]: --data
from labseg.train import fit
cuda = device == "cuda" and torch.cuda.is_available()
if not cuda:    # a rehearsal: the same run, nothing to count
    print("syncs: torch.cuda.set_sync_debug_mode needs CUDA; the run below only rehearses the stage")
if cuda:
    torch.cuda.set_sync_debug_mode("warn")      # a warning at every operation that waits for the GPU
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # EMA (off by default) is on so that its per-step update is counted too
    result = fit(arch="resnet34_unet", img_size=size, epochs=2, log_every=10**6, output_dir=runs, device=device,
                 run_name="syncs", cache_dir=f"{runs}/cache", progress=False, data_dir=data, ema=0.999)
if cuda:
    torch.cuda.set_sync_debug_mode(0)
steps = 2 * (result.summary["train_images"] // result.run.read_config().batch_size)
sites = collections.Counter(f"{w.filename.rsplit('/', 2)[-1]}:{w.lineno}" for w in caught
                            if "synchroniz" in str(w.message))
print(f"syncs: {sum(sites.values())} in 2 epochs of {steps} train steps, by call site:")
for site, n in sites.most_common(25):
    print(f"syncs: {n:6d}  {site}")
EOF
}

environment() {
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ"
        if command -v nvidia-smi >/dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
        fi
        "$PYTHON" - <<'EOF'
import platform, torch, torchvision
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs",
          "bf16", torch.cuda.is_bf16_supported())
try:
    import segmentation_models_pytorch as smp
    print("segmentation_models_pytorch", smp.__version__)
except Exception as e:  # the reference is skipped with a note by labseg bench
    print("segmentation_models_pytorch: not importable:", e)
EOF
        echo "cpus $(nproc)"
        git -C "$ROOT" log -1 --format='labseg %h %s' 2>/dev/null || true
    } >"$OUT/env.txt" 2>&1   # (nothing here can hang: no timeout needed)
    cat "$OUT/env.txt" >>"$LOG"
}

say "round of ${DEADLINE}s on $DEVICE, ${SIZE} px, data: $DATA${SYNTHETIC:-}; stages: $STAGES"
stage env            5  60 environment
stage bench-b32     60 200 bench bench-b32 --batch-size "$SMALL" --epoch-estimate
stage syncs         30  60 syncs
stage train-r34     60 200 train gpu-r34-$SIZE resnet34_unet
stage bench-b64     45 150 bench bench-b64 --batch-size "$LARGE"
stage bench-fp32    45 150 bench bench-fp32 --batch-size "$SMALL" --no-amp
stage train-unet    60 200 train gpu-unet-$SIZE unet
stage bench-compile 90 240 bench bench-compile --batch-size "$LARGE" --compile
say "done in $((SECONDS - START))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
