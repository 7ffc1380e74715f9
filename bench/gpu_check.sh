#!/usr/bin/env bash
# One-shot check of e3relax-fast on a GPU machine, in the order that puts the most valuable
# measurement first: environment, in-place build of the compiled extension, the op-level message
# benchmark (Triton ieee / tf32x3 / tf32, CUDA, cuEquivariance) and the atom–lattice benchmark, the
# GPU tests, a short Nsight Compute pass and a compute-sanitizer pass on one op (small problem), the
# graph-building series capped at 4,096 atoms, relax_batch end to end with the canonical frame (with
# and without frame worker processes; needs moyopy, from a carried wheel), and a summary.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --plan          # print the stage plan and check its time arithmetic
#   bash bench/gpu_check.sh --cpu-dry-run   # here: the plan check, then the same stages on CPU, tiny sizes
#
# Results go to ${OUT:-bench/out/gpu} (dry run: ${OUT:-bench/out/gpu-dry-run}), at most 9 files:
#   gpu_summary.md            card, versions, every stage's status and time, both reports inlined
#   env.txt                   nvidia-smi, nvcc, ncu, Python / torch / triton / numpy versions
#   build.log                 the extension build (setup.py build_ext --inplace; pip -e as fallback)
#   bench_message_passing.md  the message op per backend and precision, then the atom–lattice ops
#   pytest.log                the GPU tests (-p no:cacheprovider, explicit file list, -k GPU_TEST_K)
#   profile.log               ncu (one op, forward + backward kernels) and compute-sanitizer memcheck
#   bench_radius_graph.md     graph building on the MP-like mix + scaling series up to 4,096 atoms
#   bench.log                 the benchmarks' console output
#   extras.tar.gz             junit XML and the benchmarks' CSV rows
#
# Every stage runs under `timeout` with its limit from PLAN below; a failing or timed-out stage is
# logged and the script goes on. The limits plus the summary's reserve must fit GPU_CHECK_BUDGET_S
# (default 540): every run (--plan alone, --cpu-dry-run, the real one) first checks that arithmetic
# and stops loudly (exit 3) when it does not fit, or when a stage has no limit in PLAN. Needs no network and none of pymatgen, ASE, vesin (inputs from bench/data/mp_like_1000.npz).
#
# Environment: PYTHON (interpreter; default: the first of python3, python that imports torch),
# GPU_CHECK_BUDGET_S, OUT, MP_BENCH_ARGS (extra arguments for bench.bench_message_passing),
# GRAPH_BENCH_N (crystals of the graph benchmark, default 1000), GPU_TEST_K (pytest -k expression of
# the GPU tests), GPU_CHECK_DRY_SCALE (the dry run's limits and budget, times the plan's; default 3).

set -u -o pipefail

# Stage plan, in running order: NAME:LIMIT_S. Their sum plus SUMMARY_RESERVE_S must be <= the budget.
PLAN=(env:15 build:100 backends:15 bench_message_op:100 bench_lattice:35 tests:110 ncu:40 sanitizer:40
      graph_series:45 relax_frames:25)
SUMMARY_RESERVE_S=15
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"

DRY=0
PLAN_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (use --plan, --cpu-dry-run or --help)" >&2; exit 2 ;;
  esac
done

limit_of() {  # limit_of NAME -> the plan's limit in seconds (0 when NAME is not in the plan)
  local entry
  for entry in "${PLAN[@]}"; do
    [ "${entry%%:*}" = "$1" ] && { echo "${entry##*:}"; return 0; }
  done
  echo 0
}

# check_plan: prints the plan; exit status 3 when the stage limits and the reserve exceed the budget.
check_plan() {
  local entry total=0 name limit
  echo "== plan (budget ${BUDGET_S} s):"
  for entry in "${PLAN[@]}"; do
    name="${entry%%:*}"; limit="${entry##*:}"
    case "$limit" in ''|*[!0-9]*) echo "PLAN ERROR: stage '$name' has no limit in seconds ('$entry')" >&2; return 3 ;; esac
    total=$(( total + limit ))
    printf '   %-18s %4s s  (cumulative %4s s)\n' "$name" "$limit" "$total"
  done
  # Every stage the script runs must have a limit in the plan (one without would be skipped).
  for name in $(grep -oE '^[[:space:]]*run_stage [A-Za-z_]+' "$0" | awk '{print $2}' | sort -u); do
    if [ "$(limit_of "$name")" = 0 ]; then
      echo "PLAN ERROR: stage '$name' runs but has no limit in PLAN" >&2; return 3
    fi
  done
  total=$(( total + SUMMARY_RESERVE_S ))
  printf '   %-18s %4s s  (total %4s s)\n' "summary reserve" "$SUMMARY_RESERVE_S" "$total"
  if [ "$total" -gt "$BUDGET_S" ]; then
    echo "PLAN ERROR: stage limits + reserve = ${total} s exceed the budget of ${BUDGET_S} s" >&2
    return 3
  fi
  echo "== plan ok: ${total} s of ${BUDGET_S} s"
}

check_plan || exit 3
[ "$PLAN_ONLY" = 1 ] && exit 0
# The dry run's CPU is far slower than the GPU machine: its limits and budget scale alike.
SCALE=1
[ "$DRY" = 1 ] && SCALE="${GPU_CHECK_DRY_SCALE:-3}"
BUDGET_S=$(( BUDGET_S * SCALE ))

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT="$PWD"
if [ "$DRY" = 1 ]; then OUT_DIR="${OUT:-bench/out/gpu-dry-run}"; else OUT_DIR="${OUT:-bench/out/gpu}"; fi
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
SUMMARY_ROWS="$WORK/stages.tsv"
: > "$SUMMARY_ROWS"

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DRY ROOT OUT_DIR WORK
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- interpreter -------------------------------------------------------------------------------
PY=""
for cand in ${PYTHON:-} python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$(command -v "$cand")"; break; fi
done
if [ -z "$PY" ]; then
  echo "no Python with torch found (set PYTHON)" | tee "$OUT_DIR/gpu_summary.md"
  exit 1
fi
export PY

# --- dry run: CPU only, tiny sizes, and the GPU machine's missing packages made unimportable -----
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  SHIM="$WORK/shim"
  for pkg in pymatgen ase vesin matscipy; do
    mkdir -p "$SHIM/$pkg"
    echo "raise ModuleNotFoundError('$pkg is blocked by gpu_check.sh --cpu-dry-run (the GPU machine has no $pkg)')" \
      > "$SHIM/$pkg/__init__.py"
  done
  export PYTHONPATH="$SHIM:$PYTHONPATH"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

elapsed() { echo $(( $(date +%s) - START )); }

# run_stage NAME LOGFILE COMMAND...: runs COMMAND with stdout+stderr appended to LOGFILE, under
# min(the plan's limit for NAME (times SCALE), what is left of the budget minus the summary's reserve).
run_stage() {
  local name="$1" log="$2"; shift 2
  local limit=$(( $(limit_of "$name") * SCALE ))
  local left=$(( BUDGET_S - $(elapsed) - SUMMARY_RESERVE_S * SCALE ))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "== [$name] skipped: time budget spent ($(elapsed) s of ${BUDGET_S} s)" | tee -a "$log"
    printf '%s\tskipped (budget)\t0\t%s\n' "$name" "$(basename "$log")" >> "$SUMMARY_ROWS"
    return 0
  fi
  echo "== [$name] start at $(elapsed) s, limit ${limit} s -> $(basename "$log")"
  echo "== [$name] $*" >> "$log"
  local t0 rc status
  t0=$(date +%s)
  if command -v timeout >/dev/null 2>&1; then
    # Through a child bash, so that COMMAND may be one of the (exported) stage functions below.
    timeout -k 5 "$limit" bash -c '"$@"' stage "$@" >> "$log" 2>&1; rc=$?
  else
    "$@" >> "$log" 2>&1; rc=$?
  fi
  local dt=$(( $(date +%s) - t0 ))
  case "$rc" in
    0) status="ok" ;;
    124|137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "== [$name] $status in ${dt} s" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$(basename "$log")" >> "$SUMMARY_ROWS"
  return 0
}

# --- 1. environment ----------------------------------------------------------------------------
env_info() {
  echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); dry run: $DRY"
  echo "# repo: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed/untracked paths"
  echo; echo "## nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv; else echo "nvidia-smi not found"; fi
  echo; echo "## ncu / compute-sanitizer"
  for tool in ncu compute-sanitizer; do command -v "$tool" >/dev/null 2>&1 && echo "$tool: $("$tool" --version 2>/dev/null | tail -1)" || echo "$tool: not found"; done
  echo; echo "## nvcc"
  if command -v nvcc >/dev/null 2>&1; then nvcc --version; else ls -d /usr/local/cuda*/bin/nvcc 2>/dev/null || echo "nvcc not found"; fi
  echo; echo "## python"
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.replace("\n", " "), "at", sys.executable)
for name in ("torch", "triton", "numpy", "scipy", "pytest", "nanobind", "setuptools", "cuequivariance_torch",
             "pymatgen", "ase", "vesin"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:22s} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:22s} - ({type(exc).__name__}: {str(exc)[:80]})")
import torch
print("torch.version.cuda", torch.version.cuda, "| cuda available", torch.cuda.is_available(),
      "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"compute capability {p.major}.{p.minor}")
print("platform", platform.platform())
EOF
}
echo "== gpu_check: output in $OUT_DIR, python $PY, budget ${BUDGET_S} s$([ "$DRY" = 1 ] && echo ', CPU DRY RUN')"
rm -f "$OUT_DIR"/{gpu_summary.md,env.txt,build.log,pytest.log,profile.log,bench_radius_graph.md,bench_message_passing.md,bench.log,extras.tar.gz}
export -f env_info
run_stage env "$OUT_DIR/env.txt" env_info
sed -n '/^## nvidia-smi/,/^## nvcc/p' "$OUT_DIR/env.txt" | head -30


# --- 2. build the compiled extension in place (no network) -----------------------------------
build_ext() {
  if [ "$DRY" = 1 ]; then
    # Same build, but into a scratch folder: the checkout's own extension stays untouched.
    "$PY" setup.py build_ext -b "$WORK/build_lib" -t "$WORK/build_tmp" || return $?
    ls -l "$WORK"/build_lib/e3relax_fast/ 2>/dev/null
    return 0
  fi
  if ! "$PY" setup.py build_ext --inplace; then
    echo "setup.py build_ext --inplace failed; trying pip install --no-build-isolation --no-deps -e ."
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . || return $?
  fi
}
check_ext() {
  "$PY" - <<'PYEOF'
from e3relax_fast import ops
from e3relax_fast.ops import compiled
print("e3relax_fast._C:", getattr(compiled._C, "__file__", None), "| import error:", compiled.IMPORT_ERROR)
for op in (ops.RADIUS_GRAPH, ops.MESSAGE_PASSING, ops.LATTICE_MESSAGE):
    print(f"{op}: available {ops.available(op)}")
PYEOF
}
export -f build_ext check_ext
run_stage build "$OUT_DIR/build.log" build_ext
run_stage backends "$OUT_DIR/build.log" check_ext
grep -E "^(e3relax_fast._C|radius_graph|message_passing|lattice_message):" "$OUT_DIR/build.log" | tail -4

# --- 3. benchmarks of the ops: the message op per backend and precision, the atom–lattice ops ------
mp_bench() {
  # The op part only: eager, compile, triton (ieee) / triton-tf32x3 / triton-tf32, cuda, cueq.
  local extra=(--parts op --compile-budget-s 30 --no-accuracy)
  if [ "$DRY" = 1 ]; then
    extra=(--parts op --n 2 --sizes 32x2 --repeats 2 --warmup 1 --compile-budget-s 30 --no-accuracy --interpreter-check)
  fi
  # shellcheck disable=SC2086
  "$PY" -m bench.bench_message_passing --md "$OUT_DIR/bench_message_passing.md" "${extra[@]}" ${MP_BENCH_ARGS:-}
}
# Appended to bench_message_passing.md (one report file for the ops).
lattice_bench() {
  local args=(--n 1000 --device cuda)
  [ "$DRY" = 1 ] && args=(--n 5 --sizes 32 --repeats 2 --device cpu)
  "$PY" -m bench.bench_lattice_message "${args[@]}" > "$WORK/lattice.md" && cat "$WORK/lattice.md" \
    && { echo; sed -n '/^## /,$p' "$WORK/lattice.md"; } >> "$OUT_DIR/bench_message_passing.md"
}
export -f mp_bench lattice_bench
run_stage bench_message_op "$OUT_DIR/bench.log" mp_bench
run_stage bench_lattice "$OUT_DIR/bench.log" lattice_bench

# --- 4. GPU tests (each places its tensors on the device it tests: tests/helpers.backend_device) ------
TEST_FILES=()
for f in tests/ops/test_message_passing.py tests/ops/test_lattice_message.py tests/ops/test_lattice_pool.py \
         tests/ops/test_radius_graph*.py tests/ops/test_registry.py tests/model/test_model_capture.py \
         tests/model/test_model_golden.py tests/model/test_edge_cutoff.py; do
  [ -f "$f" ] || continue
  # A test file importing pymatgen or ASE at module level cannot be collected on the GPU machine.
  if grep -qE '^(import|from) (pymatgen|ase)([ .]|$)' "$f"; then
    echo "not collected: $f imports pymatgen/ase at module level" >> "$OUT_DIR/pytest.log"
    continue
  fi
  TEST_FILES+=("$f")
done
# The tests of the GPU backends and those marked gpu (-k also matches marker names).
GPU_TEST_K="${GPU_TEST_K:-triton or cuda or cueq or gpu or capture}"
if [ "${#TEST_FILES[@]}" -gt 0 ]; then
  run_stage tests "$OUT_DIR/pytest.log" "$PY" -m pytest -p no:cacheprovider -v -rs --durations=15 \
    --continue-on-collection-errors --junitxml="$WORK/junit.xml" -k "$GPU_TEST_K" "${TEST_FILES[@]}"
else
  echo "no test files to run" | tee -a "$OUT_DIR/pytest.log"
fi
grep -v '^== ' "$OUT_DIR/pytest.log" | tail -n 2

# --- 5. one op under Nsight Compute and under compute-sanitizer (small problem) -----------------------
cat > "$WORK/one_op.py" <<'PYEOF'
"""One message-passing op, forward and backward, with the registry's Triton backend (small problem)."""
import argparse

import torch

from bench.bench_message_passing import make_inputs, op_arguments
from e3relax_fast import ops

ap = argparse.ArgumentParser()
ap.add_argument("--hidden", type=int, default=512)
ap.add_argument("--crystals", type=int, default=4)
a = ap.parse_args()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
inputs = make_inputs(a.crystals, torch.float32, device)
args, kwargs = op_arguments(inputs, a.hidden)
name, fn = ops.resolve(ops.MESSAGE_PASSING, "triton", device.type, needs_grad=True)
args = list(args)
for i in (0, 1, 7, 8):  # x_proj, vec, edge weight, edge bias
    args[i] = args[i].detach().clone().requires_grad_(True)
ds, dv = fn(*args, **kwargs)
(ds.square().sum() + dv.square().sum()).backward()
if device.type == "cuda":
    torch.cuda.synchronize()
ok = bool(torch.isfinite(ds).all() and torch.isfinite(dv).all() and torch.isfinite(args[0].grad).all())
print(f"one op: {name} on {device}, {inputs.n_atoms} atoms, {inputs.n_edges} edges, H={a.hidden}: finite {ok}")
raise SystemExit(0 if ok else 1)
PYEOF
one_op() {  # one_op TOOL: the op under ncu or compute-sanitizer; in the dry run, on the interpreter
  local tool="$1"
  if [ "$DRY" = 1 ]; then
    echo "dry run: $tool not used; the op once on Triton's CPU interpreter (H=32)"
    TRITON_INTERPRET=1 "$PY" "$WORK/one_op.py" --hidden 32 --crystals 1
    return $?
  fi
  if ! command -v "$tool" >/dev/null 2>&1; then echo "$tool not found"; return 127; fi
  if [ "$tool" = ncu ]; then
    # The message kernels' first launches (forward + backward), a few sections each.
    ncu --target-processes all --kernel-name-base function --kernel-name 'regex:_mp_|mp_kernel' --launch-count 4 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      "$PY" "$WORK/one_op.py" --hidden 512 --crystals 4
  else
    compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 --target-processes all \
      "$PY" "$WORK/one_op.py" --hidden 64 --crystals 2
  fi
}
export -f one_op
run_stage ncu "$OUT_DIR/profile.log" one_op ncu
run_stage sanitizer "$OUT_DIR/profile.log" one_op compute-sanitizer

# --- 6. graph building: the MP-like mix and the scaling series, capped at 4,096 atoms -----------------
graph_bench() {
  local n="${GRAPH_BENCH_N:-1000}" sizes="8 64 512 1000 2000 4096" budget=10
  [ "$DRY" = 1 ] && { n=20; sizes="8 64 216"; budget=5; }
  "$PY" - "$OUT_DIR/bench_radius_graph.md" "$n" "$budget" $sizes <<'PYEOF'
"""bench.bench_radius_graph run_mix + run_scaling, with every provider registered here."""
import sys

from bench import bench_radius_graph as brg, harness, report

out, n, budget, sizes = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), [int(s) for s in sys.argv[4:]]
info = harness.machine()
md = report.header_md("Graph building", f"bash bench/gpu_check.sh (run_mix n={n}, run_scaling)", info)
mix_md, _ = brg.run_mix(n, repeats=5, info=info)
md += "\n" + mix_md
with open(out, "w") as fh:
    fh.write(md)
scaling_md, _ = brg.run_scaling(sizes, repeats=3, budget_s=budget, info=info)
md += "\n" + scaling_md
with open(out, "w") as fh:
    fh.write(md)
print(md)
PYEOF
}
export -f graph_bench
run_stage graph_series "$OUT_DIR/bench.log" graph_bench

# --- 7. relax_batch end to end with the canonical frame: the frame's share on a GPU node --------------
# With frame worker processes (auto: one per core beyond this one's, at most 8) and in one process
# (frame_workers=0). Needs moyopy, not part of the GPU machine's torch image: installed from a carried
# wheel (.whl/moyopy-*.whl, as bench/gpu_train.sh's header says) when it is not importable.
relax_bench() {
  if ! "$PY" -c "import moyopy" 2>/dev/null; then
    local wheel
    wheel="$(ls .whl/moyopy-*.whl 2>/dev/null | head -1)"
    [ -n "$wheel" ] && "$PY" -m pip install --no-index --no-deps "$wheel" > /dev/null 2>&1
    if ! "$PY" -c "import moyopy" 2>/dev/null; then
      echo "relax_frames skipped: moyopy is not importable (carry .whl/moyopy-*.whl, see bench/gpu_train.sh)"
      return 0
    fi
  fi
  local args=(--n 128 --sizes 64x4 --device cuda --repeats 2 --long-s 2 --no-backends --no-peaks)
  [ "$DRY" = 1 ] && args=(--n 8 --sizes 16x2 --device cpu --repeats 1 --no-backends --no-peaks)
  "$PY" -m bench.bench_relax_batch "${args[@]}" | tee "$WORK/relax.md"
}
export -f relax_bench
run_stage relax_frames "$OUT_DIR/bench.log" relax_bench

# --- 8. summary --------------------------------------------------------------------------------------
card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
[ -z "$card" ] && card="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
[ -z "$card" ] && card="none (no CUDA device$([ "$DRY" = 1 ] && echo '; CPU dry run'))"
{
  echo "# GPU check summary"
  echo
  echo "- card: **$card**"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); total $(elapsed) s of a ${BUDGET_S} s budget (plan: $(IFS=' '; echo "${PLAN[*]}") reserve:${SUMMARY_RESERVE_S}$([ "$SCALE" != 1 ] && echo ", dry-run limits x$SCALE"))$([ "$DRY" = 1 ] && echo '; **CPU dry run** (tiny sizes, pymatgen/ASE/vesin/matscipy blocked, CUDA hidden)')"
  echo "- versions: $(grep -E '^(python|torch |triton |numpy )' "$OUT_DIR/env.txt" | sed -E 's/ at .*//; s/ +/ /g' | paste -sd ';' - | sed 's/;/; /g')"
  echo "- extension: $(grep -E '^e3relax_fast._C' "$OUT_DIR/build.log" | tail -1)"
  echo "- backends: $(grep -E '^(radius_graph|message_passing):' "$OUT_DIR/build.log" | tail -2 | paste -sd ';' - | sed 's/;/; /g')"
  echo "- tests: $(grep -E '(passed|failed|error)' "$OUT_DIR/pytest.log" | grep -E '^=+ ' | tail -1 | tr -d '=' | sed 's/^ *//')"
  echo
  echo "| stage | status | seconds | log |"
  echo "|---|---|---|---|"
  while IFS=$'\t' read -r name status secs log; do echo "| $name | $status | $secs | $log |"; done < "$SUMMARY_ROWS"
  echo
  if grep -qE '(FAILED|ERROR) ' "$OUT_DIR/pytest.log"; then
    echo "## Failing tests"; echo; echo '```'; grep -E '^(FAILED|ERROR) ' "$OUT_DIR/pytest.log" | head -40; echo '```'; echo
  fi
  if [ -s "$OUT_DIR/profile.log" ]; then
    echo "## profile.log (ncu, compute-sanitizer): outcome lines"; echo; echo '```'
    grep -E '^(== \[|one op:|========= (ERROR SUMMARY|Invalid|Program hit)|==PROF==|==ERROR==|ncu|compute-sanitizer|dry run)' \
      "$OUT_DIR/profile.log" | head -30
    echo '```'; echo
  fi
  echo "## relax_batch with the canonical frame (bench.bench_relax_batch)"; echo
  if [ -s "$WORK/relax.md" ]; then grep -E '^(\| H=|\| model|\|---|- H=|\[relax_batch\] frame worker)' "$WORK/relax.md"
  else grep -E '^relax_frames skipped' "$OUT_DIR/bench.log" || echo "(not run: see bench.log)"; fi
  echo
  for f in bench_message_passing.md bench_radius_graph.md; do
    echo "## $f"; echo
    if [ -s "$OUT_DIR/$f" ]; then cat "$OUT_DIR/$f"; else echo "(not written: see bench.log)"; fi
    echo
  done
} > "$OUT_DIR/gpu_summary.md"

# junit XML and the CSV rows the benchmarks appended (bench/out/*.csv) in one archive
cp "$WORK/junit.xml" "$WORK/pytest_junit.xml" 2>/dev/null
tar -czf "$OUT_DIR/extras.tar.gz" -C "$WORK" $(cd "$WORK" && ls pytest_junit.xml 2>/dev/null) \
  -C "$ROOT" $(cd "$ROOT" && ls bench/out/*.csv 2>/dev/null) 2>/dev/null
echo "== gpu_check done in $(elapsed) s: $OUT_DIR/gpu_summary.md"
sed -n '1,20p' "$OUT_DIR/gpu_summary.md"
