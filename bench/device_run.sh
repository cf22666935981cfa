#!/usr/bin/env bash
# One unattended run of the real backbones on a CUDA machine that has PyTorch and timm but no
# MLflow or Optuna (docs/gpu.md). From the project root:
#
#   OUT=/somewhere bash bench/device_run.sh            # the real thing, on the GPU
#   OUT=/tmp/smoke bash bench/device_run.sh --smoke    # the same steps on the CPU, tiny (< 2 min)
#   ... --steps bench,compile,main                     # a subset, in this order (default: all three)
#
# 1. wheels: every .whl/*.whl is installed into $WORK/site (no index, no deps; skipped by --smoke,
#    which uses the current environment);
# 2. data: every .devdata*/*.tar (or $DEVDATA/*.tar) is extracted; the Aria root is the folder holding
#    Original/, the phase-1 root the PBC subset's folder (see docs/gpu.md for staging them);
# 3. bench: python -m bench.throughput for resnet50, efficientnet_b3, inception_v3 in bf16 (step "bench"),
#    then the same with --compile (step "compile": model-only ceiling and project path only);
# 4. main: dtl main --config real-gpu (experiments/real-gpu.yaml: trials, epochs and data stated there).
#
# Everything is written into $OUT as it goes: device_run.log (every command and its output),
# summary.md (bench table, results table, champion's model card), and results.tar.gz (all JSON,
# Markdown, report files and cards), refreshed after every step; at most 8 files, so that a
# machine that returns only a few files from $OUT returns all of it.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
STEPS=bench,compile,main
while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --steps) STEPS=$2; shift ;;
    *) echo "usage: bash bench/device_run.sh [--smoke] [--steps bench,compile,main]" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$ROOT/outputs/device-run}
# staged data: every .devdata*/ folder (several, when a transfer limit splits them), or $DEVDATA (a:b:c)
DEVDATA=${DEVDATA:-$(ls -d "$ROOT"/.devdata*/ 2>/dev/null | tr '\n' ':')}
WORK=${WORK:-$(mktemp -d /tmp/dtl-device-run.XXXXXX)}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK/run"
LOG=$OUT/device_run.log
: >"$LOG"
FAILED=0

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME CMD...: run, log its output, record failure without stopping the later steps
  local name=$1; shift
  log "== $name: $*"
  local t0=$SECONDS
  if "$@" >>"$LOG" 2>&1; then log "== $name ok ($((SECONDS - t0)) s)"; else
    log "== $name FAILED (exit $?, $((SECONDS - t0)) s)"; FAILED=1; fi
  pack
}
pack() {  # refresh what $OUT holds: the tarball of $WORK/run and the summary
  tar -czf "$OUT/results.tar.gz" -C "$WORK/run" . 2>/dev/null
  "$PY" -m bench.summary "$WORK/run" >"$OUT/summary.md" 2>>"$LOG" || true
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# --- environment --------------------------------------------------------------------------
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if [[ $SMOKE == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $WORK/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    >>"$LOG" 2>&1 || { log "wheel install FAILED"; exit 1; }
  export PYTHONPATH=$ROOT:$WORK/site${PYTHONPATH#"$ROOT"}
fi
{ "$PY" - <<'PY'
import platform, torch, timm
print("python", platform.python_version(), "| torch", torch.__version__, "| timm", timm.__version__,
      "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee "$WORK/run/environment.txt" | tee -a "$LOG"
"$PY" -c "import mlflow, optuna" 2>>"$LOG" || { log "mlflow/optuna missing: put their wheels in .whl/ (docs/gpu.md)"; exit 1; }

# --- data ---------------------------------------------------------------------------------
mkdir -p "$WORK/data"
IFS=: read -r -a DATADIRS <<<"$DEVDATA"
for d in "${DATADIRS[@]}"; do
  for a in "$d"/*.tar "$d"/*.tar.gz; do
    [[ -f $a ]] && { log "extracting $a"; tar -xf "$a" -C "$WORK/data"; }
  done
done
for d in "${DATADIRS[@]}" "$WORK/data"; do  # already extracted folders work too
  [[ -d $d ]] || continue
  ARIA=${ARIA:-$(find -L "$d" -maxdepth 4 -type d -name Original -printf '%h\n' 2>/dev/null | head -1)}
  PBC=${PBC:-$(find -L "$d" -maxdepth 3 -type d -name 'pbc-*' 2>/dev/null | head -1)}
done
if [[ -z ${ARIA:-} || -z ${PBC:-} ]]; then
  log "no staged data in ${DEVDATA:-.devdata*/} (need Aria's Original/ and the PBC subset; docs/gpu.md says how)"; exit 1
fi
log "phase-1 data: $PBC; phase-2 data: $ARIA"

# --- what runs where ----------------------------------------------------------------------
if [[ $SMOKE == 1 ]]; then
  # the compile step traces with Dynamo but skips inductor's C++ code generation (minutes on a small CPU)
  BACKBONES=(test_resnet); BENCH=(--device cpu --image-size 64 --steps 2 --warmup 1 --workers 0 --batch-size 8
                                  --eval-batch-size 8 --pyfunc-images 8); COMPILE=eager
  MAIN=(-o "backbones=[test_resnet]" -o image_size=64 -o device=cpu -o precision=bf16 -o bootstrap=50
        -o phase1.n_trials=1 -o phase1.epochs=1 -o phase2.n_trials=1 -o phase2.epochs=1 -o phase2.head_channels=16
        -o phase1.batch_size=8 -o phase2.batch_size=8 -o eval_batch_size=16)
else
  BACKBONES=(resnet50 efficientnet_b3 inception_v3); BENCH=(--device cuda); MAIN=(); COMPILE=inductor
fi
COMMON=(--precision bf16 --data "$ARIA" --cache-dir "$WORK/cache" --out "$WORK/run/bench")

if want bench; then
  for b in "${BACKBONES[@]}"; do step "bench $b bf16" "$PY" -m bench.throughput --backbone "$b" "${COMMON[@]}" "${BENCH[@]}"; done
fi
if want compile; then  # the compiled model twice (ceiling, project path); the plain path and pyfunc do not change
  for b in "${BACKBONES[@]}"; do
    step "bench $b bf16 --compile $COMPILE" "$PY" -m bench.throughput --backbone "$b" --compile "$COMPILE" \
      --skip plain,kornia,pyfunc \
      "${COMMON[@]}" "${BENCH[@]}"
  done
fi
if want main; then
  step "dtl main --config real-gpu" "$PY" -m dtl main --config real-gpu \
    --tracking-uri "sqlite:///$WORK/mlflow.db" --storage "sqlite:///$WORK/optuna.db" \
    -o "phase1.data.root=$PBC" -o "phase2.data.root=$ARIA" -o "cache_dir=$WORK/cache" -o "work_dir=$WORK/runs" \
    -o "report_dir=$WORK/run/report" -o "cards_dir=$WORK/run/cards" "${MAIN[@]}"
fi
pack
log "done: $( [[ $FAILED == 0 ]] && echo 'every step ok' || echo 'some step FAILED (see above)'); outputs in $OUT"
exit $FAILED
