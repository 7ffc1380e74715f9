#!/usr/bin/env bash
# A prepared training run for a lent GPU machine (the generalisation issue): a model this 2-core
# CPU cannot train in a session — wider (H = 128), larger batches, every pair set — in one call of
# about 8 minutes; its checkpoint and a first evaluation come back in $OUT. Afterwards, here: the
# card's evaluations (CHGNet energies, StructureMatcher) and leave-one-family-out.
#
#   bash bench/gpu_train.sh                 # on the GPU machine, from the repository root (device
#                                           # call: carry .whl, timeout_s 600; ends within BUDGET_S)
#   bash bench/gpu_train.sh --cpu-dry-run   # here: the same stages on CPU, tiny sizes (~3 min)
#
# The GPU machine has no ASE and no moyopy: carry them as wheels in .whl/, made here once with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl ase==3.29.0 moyopy==0.21.0
# (the device call names .whl in `carry`). The compiled extension is not needed: training runs the
# Triton message kernels on CUDA (backend auto), or the reference ops.
#
# Stages, each under `timeout`:
#   env    nvidia-smi, versions; the wheels installed into $WORK/site when ase/moyopy are missing
#   smoke  2 optimiser steps with backend auto; if they fail, the run trains with backend reference
#          (pure PyTorch) and the summary says why
#   train  e3relax-fast train ... --time-limit TRAIN_S (stops at a pseudo-epoch boundary; best.pt
#          holds the best validation EMA weights so far; the graph cache is built first)
#   eval   e3relax-fast eval on the val split (--no-match: pymatgen is not there)
# Files back in ${OUT:-bench/out/gpu_train} (at most 8, each under 16 MB): best.pt in 15 MB parts
# (here: cat best.pt.part-* > best.pt), train.log, eval.md, summary.md.
#
# Environment: HIDDEN (128), LAYERS (4), BATCH (64), LR (5e-4), MINIMA (1.0), VAL_MINIMA (as MINIMA: the
# validation split's already-relaxed twins, their share kept within 3 % logged per pseudo-epoch), BALANCE (0.5),
# ELEMENT_FEATURES (0; 1: train --element-features, the elements' descriptors beside the embedding),
# CELL_STRAIN (0; 1: train --cell-strain, each lattice vector's update gains the vector times a learned scalar),
# TRAIN_S (300), STEPS_PER_EPOCH (100), DATA ("data/chgnet_v13sym data/chgnet_v4h data/chgnet_v5f"),
# BUDGET_S (570: every stage's timeout is cut to what is left of it, the eval's minute kept for last),
# PYTHON (default: the first of python3, python that imports torch).

set -u -o pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (use --cpu-dry-run or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT="$PWD"
if [ "$DRY" = 1 ]; then
  # The GPU machine's settings at a CPU's scale: a small model, one short pair set, a minute of training.
  : "${HIDDEN:=16}" "${BATCH:=8}" "${TRAIN_S:=20}" "${STEPS_PER_EPOCH:=5}" "${DATA:=data/chgnet_v1}"
  OUT_DIR="${OUT:-bench/out/gpu_train-dry-run}"
  DEVICE=cpu
else
  OUT_DIR="${OUT:-bench/out/gpu_train}"
  DEVICE=cuda
fi
HIDDEN="${HIDDEN:-128}" LAYERS="${LAYERS:-4}" BATCH="${BATCH:-64}" LR="${LR:-5e-4}" MINIMA="${MINIMA:-1.0}"
VAL_MINIMA="${VAL_MINIMA:-$MINIMA}" BALANCE="${BALANCE:-0.5}" TRAIN_S="${TRAIN_S:-300}" STEPS_PER_EPOCH="${STEPS_PER_EPOCH:-100}"
BUDGET_S="${BUDGET_S:-570}"
DATA="${DATA:-data/chgnet_v13sym data/chgnet_v4h data/chgnet_v5f}"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_train.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
SUMMARY="$OUT_DIR/summary.md"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

PY=""
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
done
[ -n "$PY" ] || { echo "no Python with torch found (set PYTHON)" | tee "$SUMMARY"; exit 1; }

if [ "$DRY" = 1 ]; then
  # As on the GPU machine: no GPU, no pymatgen (a stage that needs it fails here as it would there).
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  mkdir -p "$WORK/shim/pymatgen"
  echo "raise ModuleNotFoundError('pymatgen is blocked by gpu_train.sh --cpu-dry-run (the GPU machine has none)')" \
    > "$WORK/shim/pymatgen/__init__.py"
  export PYTHONPATH="$WORK/shim:$PYTHONPATH"
fi

elapsed() { echo $(( $(date +%s) - START )); }
# within LIMIT [RESERVE]: LIMIT, cut to what is left of the budget after RESERVE seconds (at least 1).
within() { local left=$(( BUDGET_S - $(elapsed) - ${2:-0} )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
note() { echo "$*" | tee -a "$SUMMARY"; }

: > "$SUMMARY"
note "# gpu_train.sh ($([ "$DRY" = 1 ] && echo 'CPU dry run' || echo 'GPU run'), $(date -u '+%F %T') UTC)"
note ""

# --- env ------------------------------------------------------------------------------------------
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$WORK/env.txt" 2>&1
if ! "$PY" -c "import ase, moyopy" >/dev/null 2>&1; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
      >> "$WORK/env.txt" 2>&1
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  fi
  "$PY" -c "import ase, moyopy" >> "$WORK/env.txt" 2>&1 || {
    note "stopped: ase and moyopy are not importable and .whl/ did not provide them (see the header)"
    cat "$WORK/env.txt" >> "$SUMMARY"; exit 1; }
fi
note "- env: $(tr '\n' ';' < "$WORK/env.txt")"

TRAIN=("$PY" -m e3relax_fast.cli train --device "$DEVICE" --hidden "$HIDDEN" --layers "$LAYERS" --cell-transport
       --batch-size "$BATCH" --lr "$LR" --steps-per-epoch "$STEPS_PER_EPOCH" --max-epochs 100000
       --minima "$MINIMA" --val-minima "$VAL_MINIMA" --family-balance "$BALANCE")
for d in $DATA; do TRAIN+=(--data "$d"); done
[ "${ELEMENT_FEATURES:-0}" = 1 ] && TRAIN+=(--element-features)
[ "${CELL_STRAIN:-0}" = 1 ] && TRAIN+=(--cell-strain)

# --- smoke: two steps with the default backends (Triton on CUDA has never trained on a GPU here) ------
BACKEND=auto
if ! timeout "$(within 200 300)" "${TRAIN[@]}" --out "$WORK/smoke" --max-steps 2 --backend auto > "$WORK/smoke.log" 2>&1; then
  BACKEND=reference
  note "- smoke: backend auto failed after $(elapsed) s; training with backend reference. Its last lines:"
  tail -n 5 "$WORK/smoke.log" | sed 's/^/      /' | tee -a "$SUMMARY"
else
  note "- smoke: backend auto trained 2 steps ($(elapsed) s so far)"
fi
# The smoke run built the graph cache; the real run reuses it (same pairs, same settings).
mkdir -p "$WORK/run" && cp -r "$WORK/smoke/graphs" "$WORK/run/" 2>/dev/null

# --- train ----------------------------------------------------------------------------------------
t0=$(elapsed)
# Loading the cached graphs and the last pseudo-epoch past the limit: up to 90 s more; the eval keeps 60.
TRAIN_S=$(within "$TRAIN_S" 150)
timeout "$(within $(( TRAIN_S + 90 )) 60)" "${TRAIN[@]}" --out "$WORK/run" --backend "$BACKEND" --time-limit "$TRAIN_S" \
  > "$OUT_DIR/train.log" 2>&1
status=$?
note "- train: exit $status after $(( $(elapsed) - t0 )) s (H=$HIDDEN L=$LAYERS batch $BATCH lr $LR minima $MINIMA val minima $VAL_MINIMA" \
     "family balance $BALANCE backend $BACKEND on $DEVICE; data: $DATA); last line: $(tail -n 1 "$OUT_DIR/train.log")"

# --- the checkpoint first (what matters most if the call runs out of time), then eval ---------------
if [ -f "$WORK/run/best.pt" ]; then
  ( cd "$OUT_DIR" && rm -f best.pt.part-* && split -b 15M -d "$WORK/run/best.pt" best.pt.part- )
  note "- best.pt: $(stat -c %s "$WORK/run/best.pt") bytes in $(ls "$OUT_DIR"/best.pt.part-* | wc -l) part(s):" \
       "cat best.pt.part-* > best.pt"
  EVAL=("$PY" -m e3relax_fast.cli eval --split val --checkpoint "$WORK/run/best.pt" --out "$WORK/eval" --device "$DEVICE"
        --no-match)
  for d in $DATA; do EVAL+=(--data "$d"); done
  if timeout "$(within 60)" "${EVAL[@]}" > "$WORK/eval.log" 2>&1; then
    cp "$WORK/eval/report.md" "$OUT_DIR/eval.md"
    note "- eval (val, no match rate): $(grep -m1 'coordinate MAE' "$OUT_DIR/eval.md")"
  else
    note "- eval failed: $(tail -n 1 "$WORK/eval.log")"
  fi
else
  note "- no best.pt: training did not finish a pseudo-epoch (see train.log)"
fi
note "- total: $(elapsed) s"
