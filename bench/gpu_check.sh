#!/usr/bin/env bash
# One-shot check of e3relax-fast on a GPU machine: environment, in-place build of the compiled
# extension, the GPU tests, the graph-building and message-passing benchmarks, and a summary.
#
#   bash bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --cpu-dry-run   # here: the same stages on CPU at tiny sizes
#
# Results go to ${OUT:-bench/out/gpu} (dry run: ${OUT:-bench/out/gpu-dry-run}), at most 8 files:
#   gpu_summary.md            card, versions, every stage's status and time, both reports inlined
#   env.txt                   nvidia-smi, nvcc, Python / torch / triton / numpy versions
#   build.log                 the extension build (setup.py build_ext --inplace; pip -e as fallback)
#   pytest.log                the GPU test files (-p no:cacheprovider, explicit file list)
#   bench_radius_graph.md     graph building on the MP-like mix (+ scaling series), cuda providers included
#   bench_message_passing.md  message op / layer / model microbenchmarks, peaks, accuracy vs float64,
#                             and the atom–lattice ops (bench.bench_lattice_message)
#   bench.log                 both benchmarks' console output
#   extras.tar.gz             junit XML and the benchmarks' CSV rows
#
# Every stage runs under `timeout`; a failing or timed-out stage is logged and the script goes on.
# The whole run stays within GPU_CHECK_BUDGET_S seconds (default 540). Needs no network and none
# of pymatgen, ASE, vesin (the benchmark inputs come from bench/data/mp_like_1000.npz).
#
# Environment: PYTHON (interpreter; default: the first of python3, python that imports torch),
# GPU_CHECK_BUDGET_S, OUT, MP_BENCH_ARGS (extra arguments for bench.bench_message_passing),
# GRAPH_BENCH_N (crystals of the graph benchmark, default 1000).

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
if [ "$DRY" = 1 ]; then OUT_DIR="${OUT:-bench/out/gpu-dry-run}"; else OUT_DIR="${OUT:-bench/out/gpu}"; fi
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
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

# run_stage NAME LIMIT_S LOGFILE COMMAND...: runs COMMAND with stdout+stderr appended to LOGFILE,
# under min(LIMIT_S, what is left of the budget minus a reserve for the summary).
run_stage() {
  local name="$1" limit="$2" log="$3"; shift 3
  local left=$(( BUDGET_S - $(elapsed) - 15 ))
  [ "$limit" -gt "$left" ] && limit="$left"
  if [ "$limit" -lt 10 ]; then
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
    timeout -k 10 "$limit" bash -c '"$@"' stage "$@" >> "$log" 2>&1; rc=$?
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
rm -f "$OUT_DIR"/{gpu_summary.md,env.txt,build.log,pytest.log,bench_radius_graph.md,bench_message_passing.md,bench.log,extras.tar.gz}
export -f env_info
run_stage env 60 "$OUT_DIR/env.txt" env_info
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
  "$PY" - <<'EOF'
from e3relax_fast import ops
from e3relax_fast.ops import compiled
print("e3relax_fast._C:", getattr(compiled._C, "__file__", None), "| import error:", compiled.IMPORT_ERROR)
for op in (ops.RADIUS_GRAPH, ops.MESSAGE_PASSING):
    print(f"{op}: available {ops.available(op)}")
EOF
}
export -f build_ext check_ext
run_stage build 240 "$OUT_DIR/build.log" build_ext
run_stage backends 60 "$OUT_DIR/build.log" check_ext
grep -E "^(e3relax_fast._C|radius_graph|message_passing):" "$OUT_DIR/build.log" | tail -3

# --- 3. GPU tests --------------------------------------------------------------------------------
TEST_FILES=()
for f in tests/test_radius_graph*.py tests/test_message_passing_triton.py tests/test_message_passing_cuda.py \
         tests/test_lattice_*_triton.py tests/test_triton_aot.py tests/test_model_capture.py \
         tests/test_model_golden.py tests/test_model_symmetry.py; do
  [ -f "$f" ] || continue
  # A test file importing pymatgen or ASE at module level cannot be collected on the GPU machine.
  if grep -qE '^(import|from) (pymatgen|ase)([ .]|$)' "$f"; then
    echo "not collected: $f imports pymatgen/ase at module level" >> "$OUT_DIR/pytest.log"
    continue
  fi
  TEST_FILES+=("$f")
done
if [ "${#TEST_FILES[@]}" -gt 0 ]; then
  run_stage tests 200 "$OUT_DIR/pytest.log" "$PY" -m pytest -p no:cacheprovider -v -rs --durations=15 \
    --junitxml="$WORK/junit.xml" "${TEST_FILES[@]}"
else
  echo "no test files to run" | tee -a "$OUT_DIR/pytest.log"
fi
grep -v '^== ' "$OUT_DIR/pytest.log" | tail -n 2

# --- 4. benchmarks ---------------------------------------------------------------------------------
graph_bench() {
  local n="${GRAPH_BENCH_N:-1000}" sizes="8 64 512 1000 2000 4096 8000 12000 20000" budget=10
  [ "$DRY" = 1 ] && { n=20; sizes="8 64 216"; budget=5; }
  "$PY" - "$OUT_DIR/bench_radius_graph.md" "$n" "$budget" $sizes <<'EOF'
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
EOF
}
mp_bench() {
  local extra=(--compile-budget-s 120)
  if [ "$DRY" = 1 ]; then
    extra=(--n 2 --sizes 32x2 --repeats 2 --warmup 1 --compile-budget-s 30 --accuracy --interpreter-check)
  fi
  # shellcheck disable=SC2086
  "$PY" -m bench.bench_message_passing --md "$OUT_DIR/bench_message_passing.md" "${extra[@]}" ${MP_BENCH_ARGS:-}
}
# The atom–lattice ops: appended to bench_message_passing.md (the output folder holds at most 8 files).
lattice_bench() {
  local args=(--n 1000 --device cuda)
  [ "$DRY" = 1 ] && args=(--n 5 --sizes 32 --repeats 2 --device cpu)
  "$PY" -m bench.bench_lattice_message "${args[@]}" > "$WORK/lattice.md" && cat "$WORK/lattice.md" \
    && { echo; sed -n '/^## /,$p' "$WORK/lattice.md"; } >> "$OUT_DIR/bench_message_passing.md"
}
export -f graph_bench mp_bench lattice_bench
run_stage bench_radius_graph 100 "$OUT_DIR/bench.log" graph_bench
run_stage bench_message_passing 300 "$OUT_DIR/bench.log" mp_bench
run_stage bench_lattice_message 30 "$OUT_DIR/bench.log" lattice_bench

# --- 5. summary --------------------------------------------------------------------------------------
card="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
[ -z "$card" ] && card="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)"
[ -z "$card" ] && card="none (no CUDA device$([ "$DRY" = 1 ] && echo '; CPU dry run'))"
{
  echo "# GPU check summary"
  echo
  echo "- card: **$card**"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); total $(elapsed) s of a ${BUDGET_S} s budget$([ "$DRY" = 1 ] && echo '; **CPU dry run** (tiny sizes, pymatgen/ASE/vesin/matscipy blocked, CUDA hidden)')"
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
