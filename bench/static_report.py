"""Static performance report of the GPU kernels for sm_90 (H100/H200), made without a GPU.

``python -m bench.static_report`` compiles every Triton kernel (each ``kernels/<op>.py``'s
``aot_compile``: message passing, the atom–lattice message in its centred and paper forms, the
lattice pool, the radius graph) at float32 and float64, H=512, R=128, once per supported Triton
version (each in a subprocess of its own interpreter), and the CUDA kernels of ``csrc/*.cu`` with the
nvcc flags of setup.py, and tabulates per kernel:

* registers, spill stores/loads and stack frame (the ``ptxas -v`` log of the compile itself);
* shared memory (Triton: the kernel's dynamic shared memory; CUDA: the static part only);
* theoretical occupancy against the sm_90 limits (:data:`SM90`): CTAs and warps per SM and what
  limits them, by the rules of CUDA's occupancy calculator (registers allocated per warp in units of
  256 across 4 sub-partitions, 1 KB of shared memory reserved per CTA);
* the SASS instruction mix (``nvdisasm`` of the cubin): FFMA/DFMA, MUFU (EX2, RCP, ...), LDS/LDG/STG
  shares, tensor-core instructions (HMMA, HGMMA = wgmma, DMMA); static counts, not executed ones;
* the spec §14 cost model (``bench/cost_model.py``) per edge next to the message kernels;
* exponentials evaluated per edge, counted while the model runs the kernels on Triton's CPU
  interpreter (every lane of every ``exp``/``exp2`` tensor operation, masked lanes included: a GPU
  issues MUFU.EX2 for them too);

and flags them against the targets of issue 15 (:data:`TARGETS`). The markdown section is written
into ``bench/RESULTS.md`` between :data:`BEGIN` and :data:`END` (appended when absent), leaving the
rest of the file as it is. No GPU timing is in it.

Options: ``--triton-python PATH`` (repeatable; default: this interpreter plus
``/work/venvs/triton36/bin/python`` when present; an interpreter that cannot compile is reported, not
dropped), ``--no-cuda``, ``--no-exp-count``, ``--out PATH`` (``-`` prints only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import cost_model, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- static-report -->", "<!-- /static-report -->"  # report.splice_section's markers
TRITON36 = Path("/work/venvs/triton36/bin/python")
HIDDEN, NUM_RBF, ARCH = 512, 128, 90
# Edges per receiver at which the fused cost model's bytes per edge are quoted (spec §14: ~56).
EDGES_PER_ATOM = 56

# sm_90 (H100/H200) per-SM limits used for the theoretical occupancy.
SM90 = {
    "regs_per_sm": 65536, "reg_alloc_unit": 256, "sub_partitions": 4, "max_regs_per_thread": 255,
    "smem_per_sm": 228 * 1024, "smem_per_block": 227 * 1024, "smem_reserved_per_block": 1024,
    "smem_alloc_unit": 128, "warps_per_sm": 64, "blocks_per_sm": 32,
}
# Issue 15's acceptance targets.
TARGETS = {"fwd_max_registers": 128, "fwd_min_ctas": 2, "exp_per_edge": 128, "exp_factor": 2.0}

# (module, label, extra aot_compile keywords)
TRITON_MODULES = [
    ("message_passing", "message_passing", {}),
    ("lattice_message", "lattice_message (centred)", {"centred": True}),
    ("lattice_message", "lattice_message (paper)", {"centred": False}),
    ("lattice_pool", "lattice_pool", {}),
    ("radius_graph", "radius_graph", {}),
]
DTYPES = ("float32", "float64")


# --------------------------------------------------------------------------------------------------
# Pure parsing and arithmetic (tested on fixed text in tests/bench/test_static_report.py)
# --------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str) -> dict[str, dict]:
    """``{entry function: {registers, spill_stores, spill_loads, stack, smem}}`` from ``ptxas -v``
    output (Triton's ``TRITON_DUMP_PTXAS_LOG`` or ``nvcc -Xptxas -v``)."""
    out: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": None, "spill_stores": 0, "spill_loads": 0,
                                                  "stack": 0, "smem": 0})
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return out


_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def parse_sass(text: str) -> dict[str, Counter]:
    """Static instruction counts per function (``.text.<name>`` section) of ``nvdisasm`` /
    ``cuobjdump -sass`` output: ``{function: Counter(full opcode with modifiers)}``."""
    out: dict[str, Counter] = {}
    current = "?"
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            current = m.group(1)
            out.setdefault(current, Counter())
            continue
        m = _INSTR.match(line)
        if m:
            out.setdefault(current, Counter())[m.group(1)] += 1
    return out


def instruction_mix(counts: Counter) -> dict:
    """Summary of a function's static SASS counts: totals per family and shares of the instructions
    (NOPs excluded)."""
    base = Counter()
    mufu = Counter()
    for op, n in counts.items():
        head = op.split(".")[0]
        base[head] += n
        if head == "MUFU":
            mufu[op.split(".")[1] if "." in op else "?"] += n
    total = sum(n for op, n in base.items() if op != "NOP")

    def share(*ops: str) -> float:
        return sum(base[o] for o in ops) / total if total else 0.0

    mma = sorted(op for op in ("HMMA", "HGMMA", "DMMA", "IMMA", "WGMMA") if base[op])
    return {
        "total": total, "ffma": base["FFMA"], "dfma": base["DFMA"], "mufu": sum(mufu.values()),
        "mufu_kinds": dict(sorted(mufu.items())), "ex2": mufu.get("EX2", 0),
        "fma_share": share("FFMA", "DFMA"), "lds_share": share("LDS", "LDSM"), "ldg_share": share("LDG", "LDGSTS"),
        "stg_share": share("STG"), "local": base["LDL"] + base["STL"], "mma": mma,
    }


def occupancy(registers: int, shared: int, warps: int, limits: dict = SM90) -> dict:
    """Theoretical occupancy of a CTA of ``warps`` warps using ``registers`` per thread and ``shared``
    bytes of shared memory, by the occupancy calculator's rules: registers are allocated per warp in
    units of ``reg_alloc_unit``, each of the ``sub_partitions`` holds a quarter of the register file
    and a CTA's warps are spread over them; every CTA also takes ``smem_reserved_per_block``.

    Returns ``{ctas, warps_per_sm, occupancy, limiter}`` (``ctas`` 0: cannot launch)."""
    sub = limits["sub_partitions"]
    if registers > limits["max_regs_per_thread"] or shared > limits["smem_per_block"] or warps < 1:
        return {"ctas": 0, "warps_per_sm": 0, "occupancy": 0.0, "limiter": "cannot launch"}
    regs_per_warp = math.ceil(max(registers, 1) * 32 / limits["reg_alloc_unit"]) * limits["reg_alloc_unit"]
    warps_per_partition = (limits["regs_per_sm"] // sub) // regs_per_warp
    by_regs = warps_per_partition // math.ceil(warps / sub)
    per_cta_smem = math.ceil((shared + limits["smem_reserved_per_block"]) / limits["smem_alloc_unit"]) \
        * limits["smem_alloc_unit"]
    by_smem = limits["smem_per_sm"] // per_cta_smem
    by_warps = limits["warps_per_sm"] // warps
    candidates = {"registers": by_regs, "shared": by_smem, "warps": by_warps, "blocks": limits["blocks_per_sm"]}
    ctas = min(candidates.values())
    limiter = "/".join(k for k, v in candidates.items() if v == ctas)
    return {"ctas": ctas, "warps_per_sm": ctas * warps, "occupancy": ctas * warps / limits["warps_per_sm"],
            "limiter": limiter}


def is_message_forward(row: dict) -> bool:
    """The forward atom–atom message kernel (the issue's register and occupancy target): Triton's
    ``fwd`` of message_passing, or a CUDA kernel marked ``forward``."""
    return row["module"] == "message_passing" and ("fwd" in row["kernel"].lower() or bool(row.get("forward")))


def error_text(exc: BaseException) -> str:
    """One line for a table cell: the exception's type and first line, and the innermost cause's
    last line (Triton's CompilationError puts the reason there)."""
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
    text = f"{type(exc).__name__}: {lines[0]}"
    last = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    if inner is not exc or len(lines) > 1:
        text += f" … {(last or [''])[-1]}"
    return text.replace("|", "\\|")[:300]


def flags_for(row: dict, exp_per_edge: float | None = None, targets: dict = TARGETS) -> list[str]:
    """Which of issue 15's targets ``row`` misses (``[]`` = none): spills anywhere; the float32
    message forward over the register cap or under the CTA floor; exponentials per edge over
    ``exp_factor`` × ``exp_per_edge`` (when counted)."""
    out = []
    if row.get("error"):
        return ["did not compile"]
    if (row.get("spill_stores") or 0) + (row.get("spill_loads") or 0) > 0:
        out.append(f"spills {row['spill_stores']}+{row['spill_loads']} B")
    if is_message_forward(row) and row.get("dtype") == "float32":
        if row["registers"] is not None and row["registers"] > targets["fwd_max_registers"]:
            out.append(f"regs {row['registers']} > {targets['fwd_max_registers']}")
        if row["ctas"] < targets["fwd_min_ctas"]:
            out.append(f"{row['ctas']} CTA/SM < {targets['fwd_min_ctas']}")
    if exp_per_edge is not None and exp_per_edge > targets["exp_factor"] * targets["exp_per_edge"]:
        out.append(f"exp/edge {exp_per_edge:,.0f} > {targets['exp_factor']:g}×{targets['exp_per_edge']}")
    return out


def splice(text: str, section: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``section``
    (appended, with the markers, when they are absent)."""
    return report.splice_section(text, "static-report", section)


def cost_per_edge(module: str, dtype: str) -> tuple[float, float] | None:
    """Spec §14 FLOP and fused DRAM bytes per edge (per atom–node pair for the lattice message: the
    same gated radial form) at H=512, R=128, k=56; None for kernels the model does not cover."""
    if module not in ("message_passing", "lattice_message"):
        return None
    b = 4 if dtype == "float32" else 8
    return (cost_model.op_flops_per_edge(HIDDEN, NUM_RBF),
            cost_model.op_bytes_per_edge(HIDDEN, NUM_RBF, b, EDGES_PER_ATOM, fused=True))


# --------------------------------------------------------------------------------------------------
# Worker side: runs inside each Triton version's interpreter
# --------------------------------------------------------------------------------------------------
def _triton_tool(name: str) -> str | None:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _sass(cubin: bytes, nvdisasm: str | None) -> dict[str, Counter]:
    if nvdisasm is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        proc = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True)
    return parse_sass(proc.stdout) if proc.returncode == 0 else {}


def _aot_kwargs(fn, dtype: str, extra: dict) -> dict | None:
    """Keywords of ``aot_compile`` for ``dtype`` (None: the kernel has no such dtype)."""
    import inspect

    import torch

    params = inspect.signature(fn).parameters
    kw = {"arch": ARCH, **{k: v for k, v in extra.items() if k in params}}
    if "dtype" in params:
        kw["dtype"] = getattr(torch, dtype)
    elif dtype != "float64":  # float64-only kernels (the radius graph) are compiled once
        return None
    for name, value in (("hidden", HIDDEN), ("num_rbf", NUM_RBF), ("features", 3 * HIDDEN)):
        if name in params:
            kw[name] = value
    return kw


def _compile_one(module, label: str, extra: dict, dtype: str, nvdisasm: str | None) -> list[dict]:
    """Rows of one ``aot_compile`` call: one per kernel of its dict, or one error row."""
    base = {"module": module.__name__.rsplit(".", 1)[-1], "label": label, "dtype": dtype}
    kw = _aot_kwargs(module.aot_compile, dtype, extra)
    if kw is None:
        return []
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernels = module.aot_compile(**kw)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a row of the report
        return [{**base, "kernel": "*", "error": error_text(exc)}]
    ptxas = parse_ptxas_log(log.getvalue())
    rows = []
    for name, k in kernels.items():
        md = k.metadata
        entry = getattr(md, "name", name)
        info = ptxas.get(entry, {})
        sass = _sass(k.asm["cubin"], nvdisasm)
        rows.append({**base, "kernel": name, "entry": entry, "num_warps": md.num_warps,
                     "num_stages": getattr(md, "num_stages", None), "shared": md.shared,
                     "registers": info.get("registers"), "spill_stores": info.get("spill_stores"),
                     "spill_loads": info.get("spill_loads"), "stack": info.get("stack"),
                     "sass": dict(sum(sass.values(), Counter())), "error": None})
    return rows


def worker(out_path: str) -> None:
    """Compile every kernel with this interpreter's Triton; write ``{triton, rows}`` as JSON."""
    import triton

    from e3relax_fast.ops.table import _kernel_module

    nvdisasm = _triton_tool("nvdisasm")
    rows = []
    for module_name, label, extra in TRITON_MODULES:
        try:
            module = _kernel_module(module_name)
        except Exception as exc:  # noqa: BLE001
            rows.append({"module": module_name, "label": label, "dtype": "-", "kernel": "*",
                         "error": f"import failed: {type(exc).__name__}: {exc}"})
            continue
        if not hasattr(module, "aot_compile"):
            rows.append({"module": module_name, "label": label, "dtype": "-", "kernel": "*",
                         "error": "no aot_compile"})
            continue
        for dtype in DTYPES:
            rows.extend(_compile_one(module, label, extra, dtype, nvdisasm))
    Path(out_path).write_text(json.dumps({"triton": triton.__version__, "python": sys.version.split()[0],
                                          "nvdisasm": nvdisasm, "rows": rows}))


# --------------------------------------------------------------------------------------------------
# CUDA kernels of csrc/*.cu, with setup.py's nvcc flags
# --------------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """nvcc as setup.py looks for it: $CUDA_HOME/$CUDA_PATH, PATH, /usr/local/cuda*."""
    import glob

    cands = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    cands += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    return next((c for c in cands if c and os.path.isfile(c)), None)


def setup_nvcc_flags(src: str, setup_py: Path = ROOT / "setup.py") -> tuple[list[str], str]:
    """The flags setup.py passes nvcc for ``src`` (its ``compile_cu`` command list up to ``-c``),
    with its ``-gencode`` architecture list left out (the report builds one cubin for sm_90).
    Returns ``(flags, how)``; when setup.py cannot be read that way, a fixed copy of its flags."""
    import ast

    fallback = ["-std=c++17", "-O3", "-fmad=false", "-DE3RELAX_WITH_CUDA", "-DNDEBUG", "-I", "csrc"]
    try:
        tree = ast.parse(setup_py.read_text())
        ns: dict = {"__file__": str(setup_py), "__name__": "setup_flags"}
        keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.Assign, ast.AnnAssign)
        exec(compile(ast.Module([n for n in tree.body if isinstance(n, keep)], []), str(setup_py), "exec"), ns)
        func = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "compile_cu")
        cmd = next(n.value for n in ast.walk(func) if isinstance(n, ast.Assign) and isinstance(n.value, ast.List)
                   and any(isinstance(t, ast.Name) and t.id == "cmd" for t in n.targets))
        local = {"src": src, "nvcc": "nvcc", "obj": "out.o"}
        flags: list[str] = []
        for elt in cmd.elts[1:]:
            if isinstance(elt, ast.Starred):
                if "arch" in ast.unparse(elt.value):
                    continue
                flags += [str(v) for v in eval(compile(ast.Expression(elt.value), "setup.py", "eval"), ns, local)]
                continue
            value = eval(compile(ast.Expression(elt), "setup.py", "eval"), ns, local)
            if value == "-c":
                break
            flags.append(str(value))
        return flags, "setup.py compile_cu"
    except Exception as exc:  # noqa: BLE001 - setup.py rewritten beyond this reader
        return fallback, f"fixed copy (setup.py not read: {type(exc).__name__})"


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=False)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::mp_kernel<double>(ns::Params<double>)`` -> ``mp_kernel<double>``."""
    s = demangled.replace("(anonymous namespace)::", "")
    s = s.split("(")[0].strip()
    return s.split(" ")[-1].split("::")[-1]


def parse_max_threads(elf_text: str) -> dict[str, int]:
    """``{function: EIATTR_MAX_THREADS x}`` (its ``__launch_bounds__``) from ``cuobjdump -elf``."""
    out, current, pending = {}, None, False
    for line in elf_text.splitlines():
        if line.startswith(".nv.info."):
            current, pending = line[len(".nv.info."):].strip(), False
        elif "EIATTR_MAX_THREADS" in line or "EIATTR_REQNTID" in line:
            pending = current is not None
        elif pending and line.strip().startswith("Value:"):
            out.setdefault(current, int(line.split()[1], 16))
            pending = False
    return out


def cuda_rows(tools: dict) -> tuple[list[dict], dict]:
    """One row per ``__global__`` function of csrc/*.cu (both template instances)."""
    nvcc = find_nvcc()
    meta = {"nvcc": None, "flags": {}}
    if nvcc is None:
        return [], meta
    meta["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = []
    for src in sorted((ROOT / "csrc").glob("*.cu")):
        rel = str(src.relative_to(ROOT))
        flags, how = setup_nvcc_flags(rel)
        meta["flags"][rel] = (flags, how)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            proc = subprocess.run([nvcc, *flags, "-cubin", f"-arch=sm_{ARCH}", "-Xptxas", "-v", rel, "-o", str(cubin)],
                                  cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                why = " ".join((proc.stderr or proc.stdout).split())[-300:].replace("|", "\\|")
                rows.append({"module": src.name, "label": src.name, "dtype": "-", "kernel": "*",
                             "error": f"nvcc failed: {why}"})
                continue
            ptxas = parse_ptxas_log(proc.stdout + proc.stderr)
            sass = parse_sass(_run([tools.get("nvdisasm"), "-c", str(cubin)]))
            threads = parse_max_threads(_run([tools.get("cuobjdump"), "-elf", str(cubin)]))
        names = _demangle(list(ptxas))
        for entry, info in ptxas.items():
            pretty = short_name(names[entry])
            dtype = "float64" if "<double>" in pretty else "float32" if "<float>" in pretty else "-"
            bound = threads.get(entry)
            op = src.name.removesuffix("_cuda.cu").removesuffix(".cu")
            rows.append({"module": op, "label": src.name, "dtype": dtype, "kernel": pretty, "entry": entry,
                         "forward": op == "message_passing",
                         "num_warps": math.ceil((bound or 256) / 32), "threads_known": bound is not None,
                         "num_stages": None, "shared": info["smem"], "registers": info["registers"],
                         "spill_stores": info["spill_stores"], "spill_loads": info["spill_loads"],
                         "stack": info["stack"], "sass": dict(sass.get(entry, Counter())), "error": None})
    return rows, meta


def _run(cmd: list) -> str:
    if not cmd or cmd[0] is None:
        return ""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else ""


# --------------------------------------------------------------------------------------------------
# Exponentials per edge, counted on Triton's CPU interpreter (TRITON_INTERPRET=1 subprocess)
# --------------------------------------------------------------------------------------------------
@dataclass
class _ExpCounter:
    """Counts the lanes of every exp/exp2 the interpreter evaluates, per launched kernel."""

    exps: Counter
    launches: Counter
    current: list

    @classmethod
    def install(cls) -> _ExpCounter:
        import triton.runtime.interpreter as interp

        self = cls(Counter(), Counter(), [None])
        builder = interp.InterpreterBuilder
        for meth in ("create_exp", "create_exp2"):
            orig = getattr(builder, meth)

            def counted(b, arg, _orig=orig):
                self.exps[self.current[-1]] += int(getattr(arg.data, "size", 1))
                return _orig(b, arg)

            setattr(builder, meth, counted)
        orig_call = interp.GridExecutor.__call__

        def call(executor, *args, **kwargs):
            name = getattr(executor.fn, "__name__", "?")
            self.launches[name] += 1
            self.current.append(name)
            try:
                return orig_call(executor, *args, **kwargs)
            finally:
                self.current.pop()

        interp.GridExecutor.__call__ = call
        return self

    def take(self) -> dict:
        """``{kernel function: (exp lanes, launches)}`` since the last call."""
        out = {k: (self.exps[k], self.launches[k]) for k in self.launches}
        self.exps.clear()
        self.launches.clear()
        return out


def _gpu_config(module, dtype):
    """The module's GPU tiles as an explicit config (the interpreter's defaults differ), or None."""
    if hasattr(module, "KernelConfig") and hasattr(module, "gpu_tiles"):
        return module.KernelConfig().with_defaults(module.gpu_tiles(dtype, HIDDEN))
    return None


def _count_message(counter: _ExpCounter, n_crystals: int) -> list[dict]:
    import torch

    from bench.bench_message_passing import make_inputs, op_arguments
    from e3relax_fast.ops.table import _kernel_module

    km = _kernel_module("message_passing")
    inputs = make_inputs(n_crystals, torch.float32, torch.device("cpu"))
    args, kwargs = op_arguments(inputs, HIDDEN)
    args = list(args)
    for i in (0, 1, 2, 7, 8):  # x_proj, vec, positions, edge weight and bias
        args[i] = args[i].detach().clone().requires_grad_(True)
    ds, dv = km.message_passing(*args, **kwargs, config=_gpu_config(km, torch.float32))
    fwd = counter.take()
    (ds.square().sum() + dv.square().sum()).backward()
    bwd = counter.take()
    e = inputs.n_edges
    return _exp_rows("message_passing", fwd, bwd, e, f"{inputs.n_atoms} atoms, {e} edges")


def _count_lattice(counter: _ExpCounter, n_crystals: int) -> list[dict]:
    import torch

    from bench.bench_lattice_message import make_case
    from e3relax_fast.ops.table import _kernel_module
    from e3relax_fast.reference.lattice_pool import lattice_pool

    km = _kernel_module("lattice_message")
    c = make_case(n_crystals, HIDDEN, torch.float32, "cpu")
    centres = lattice_pool(c["positions"], c["ptr"], c["graph_index"])
    xp, vec, pos, w, b = (c[k].clone().requires_grad_(True)
                          for k in ("x_proj", "vec", "positions", "edge_weight", "edge_bias"))
    ds, vo = km.lattice_message(xp, vec, pos, c["cells"], c["graph_index"], centres, 0, w, b, c["rbf_centres"],
                                c["rbf_coeff"], c["cutoff"], config=_gpu_config(km, torch.float32))
    fwd = counter.take()
    (ds.square().sum() + vo.square().sum()).backward()
    bwd = counter.take()
    n = c["num_atoms"]
    return _exp_rows("lattice_message", fwd, bwd, n, f"{n} atom–node pairs (one lattice node)")


def _exp_rows(module: str, fwd: dict, bwd: dict, edges: int, problem: str) -> list[dict]:
    rows = []
    for phase, found in (("forward", fwd), ("backward", bwd)):
        for fn, (exps, launches) in sorted(found.items()):
            rows.append({"module": module, "phase": phase, "function": fn, "launches": launches, "exps": exps,
                         "edges": edges, "per_edge": exps / max(edges, 1), "problem": problem})
    return rows


# Crystals of the MP-like mix per count: the message op's 1 (24 atoms, ~1,300 edges) fills its edge
# tiles; the lattice op has one pair per atom, so it takes more crystals (~170 atoms) to fill its atom
# tiles as a real batch would (masked lanes of a part-filled tile count, as on a GPU).
COUNT_CRYSTALS = {"message": 1, "lattice": 10}


def count_exp_worker(out_path: str) -> None:
    """Run the message kernels once on the interpreter (float32, H=512, R=128, the GPU tiles) and
    write the exponentials each launch evaluated per edge as JSON."""
    counter = _ExpCounter.install()
    rows, errors = [], []
    for fn, n_crystals in ((_count_message, COUNT_CRYSTALS["message"]), (_count_lattice, COUNT_CRYSTALS["lattice"])):
        try:
            rows += fn(counter, n_crystals)
        except Exception as exc:  # noqa: BLE001 - a kernel being rewritten must not stop the report
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            errors.append(f"{fn.__name__[7:]}: {type(exc).__name__}: {first}")
            counter.take()
    Path(out_path).write_text(json.dumps({"rows": rows, "errors": errors}))


# --------------------------------------------------------------------------------------------------
# Driver: subprocesses, markdown
# --------------------------------------------------------------------------------------------------
def _worker_env(interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, stated (3.9 warns when it is unset)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env["TRITON_DUMP_PTXAS_LOG"] = "1"  # the ptxas -v log of each compile, on stdout
        env["TRITON_ALWAYS_COMPILE"] = "1"
    return env


def run_worker(python: str, flag: str, timeout: float) -> dict:
    """Run this module with ``flag`` under ``python``; its JSON, or ``{"error": why}``."""
    if not Path(python).exists() and shutil.which(python) is None:
        return {"error": f"interpreter not found: {python}"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = _worker_env(interpret=flag == "--count-exp")
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        try:
            proc = subprocess.run([python, "-m", "bench.static_report", flag, str(out)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"{python}: timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"{python}: exit {proc.returncode}: {tail[0][:300]}"}
        return json.loads(out.read_text())


def finish_row(row: dict) -> dict:
    """Occupancy, instruction mix and the cost model added to a compiled row."""
    if row.get("error"):
        return row
    regs = row["registers"] if row["registers"] is not None else SM90["max_regs_per_thread"]
    row.update(occupancy(regs, row["shared"] or 0, row["num_warps"]))
    row["mix"] = instruction_mix(Counter(row.get("sass") or {}))
    row["cost"] = cost_per_edge(row["module"], row["dtype"])
    return row


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def kernel_table(rows: list[dict], exp_by_entry: dict) -> list[str]:
    lines = ["| kernel | dtype | warps × stages | regs | spills st+ld (B) | shared (KB) | CTAs/SM (limit) | warps/SM "
             "| SASS instr | FFMA+DFMA | MUFU (kinds) | LDS | LDG | STG | MMA | §14 FLOP/edge | §14 B/edge | flags |",
             "|" + "---|" * 18]
    for r in rows:
        name = f"{r['label']} `{r['kernel']}`"
        if r.get("error"):
            lines.append(f"| {name} | {r['dtype']} | " + "| " * 15 + f"**{r['error']}** |")
            continue
        mix, cost = r["mix"], r["cost"]
        kinds = ", ".join(f"{k} {v}" for k, v in mix["mufu_kinds"].items())
        warps = f"{r['num_warps']}" + (f" × {r['num_stages']}" if r.get("num_stages") else "") \
            + ("" if r.get("threads_known", True) else " (256 threads assumed)")
        flags = flags_for(r, exp_by_entry.get(r.get("entry")) if r["dtype"] == "float32" else None)
        lines.append(
            f"| {name} | {r['dtype']} | {warps} | {r['registers']} | {r['spill_stores']}+{r['spill_loads']} | "
            f"{r['shared'] / 1024:.1f} | {r['ctas']} ({r['limiter']}) | {r['warps_per_sm']} | {mix['total']} | "
            f"{mix['ffma'] + mix['dfma']} ({_pct(mix['fma_share'])}) | {mix['mufu']}"
            f"{f' ({kinds})' if kinds else ''} | {_pct(mix['lds_share'])} | {_pct(mix['ldg_share'])} | "
            f"{_pct(mix['stg_share'])} | {', '.join(mix['mma']) or '—'} | "
            f"{f'{cost[0]:,.0f}' if cost else '—'} | {f'{cost[1]:,.0f}' if cost else '—'} | "
            f"{'**' + '; '.join(flags) + '**' if flags else 'ok'} |")
    return lines


def exp_table(exp: dict) -> list[str]:
    if "error" in exp:
        return [f"Not counted: {exp['error']}."]
    lines = []
    if exp.get("rows"):
        lines += ["| op | phase | kernel function | launches | exp lanes | per edge | target (≤ 2 × 128) |",
                  "|---|---|---|---|---|---|---|"]
        for r in exp["rows"]:
            ok = r["per_edge"] <= TARGETS["exp_factor"] * TARGETS["exp_per_edge"]
            lines.append(f"| {r['module']} | {r['phase']} | `{r['function']}` | {r['launches']} | {r['exps']:,} | "
                         f"{r['per_edge']:,.1f} | {'ok' if ok else '**missed**'} |")
        problems = sorted({f"{r['module']}: {r['problem']}" for r in exp["rows"]})
        lines += ["", "Problems: " + "; ".join(problems) + "."]
    for err in exp.get("errors", []):
        lines.append(f"- not counted: {err}")
    return lines


def exp_per_function(exp: dict) -> dict:
    """``{kernel function: exponentials per edge per launch}`` (float32; the forward and backward
    of each function apart are summed per launch)."""
    out: dict = {}
    for r in exp.get("rows", []):
        out[r["function"]] = max(out.get(r["function"], 0.0), r["per_edge"] / max(r["launches"], 1))
    return out


def _missed(rows: list[dict], exp_by_entry: dict) -> list[str]:
    out = []
    for r in rows:
        if r.get("error"):
            out.append(f"{r['label']} {r['dtype']}: {r['error']}")
            continue
        f = flags_for(r, exp_by_entry.get(r.get("entry")) if r["dtype"] == "float32" else None)
        if f:
            out.append(f"{r['label']} `{r['kernel']}` {r['dtype']}: {'; '.join(f)}")
    return out


def build_markdown(versions: list[dict], cuda: tuple[list[dict], dict] | None, exp: dict | None,
                   date: str) -> str:
    """The report section (without its markers)."""
    exp_by_entry = exp_per_function(exp or {})
    tv = ", ".join(f"{v['triton']} ({v['python']})" if "triton" in v else f"**missing: {v['error']}**"
                   for v in versions)
    nvcc = (cuda[1].get("nvcc") if cuda else None) or ("not found" if cuda else "not run (--no-cuda)")
    md = ["## Static performance report (sm_90, compilers only)", "",
          f"`python -m bench.static_report`, {date}. Triton: {tv}. nvcc: {nvcc}. H = {HIDDEN}, R = {NUM_RBF}. "
          "Everything here comes from the compilers (ptxas -v, nvdisasm) and, for the exponential count, "
          "Triton's CPU interpreter: no kernel ran on a GPU and there is no timing.", "",
          f"Targets (issue 15): no spills in any kernel; the float32 message forward at ≤ "
          f"{TARGETS['fwd_max_registers']} registers and ≥ {TARGETS['fwd_min_ctas']} CTAs per SM; exponentials per "
          f"edge ≤ {TARGETS['exp_factor']:g} × {TARGETS['exp_per_edge']}. Occupancy is theoretical (65,536 registers "
          "in 4 sub-partitions, allocated per warp in units of 256; 228 KB shared per SM, 227 KB per CTA plus 1 KB "
          "reserved; 64 warps and 32 CTAs per SM). SASS counts are static (instructions in the binary, not "
          "executed ones); LDS/LDG/STG are shares of all instructions. §14 columns: the spec's cost model per edge "
          f"(per atom–node pair for the lattice message), bytes for the fused path at {EDGES_PER_ATOM} edges per atom.",
          ""]
    for v in versions:
        if "error" in v:
            md += ["### Triton: not compiled", "", f"**{v['error']}**", ""]
            continue
        rows = [finish_row(r) for r in v["rows"]]
        md += [f"### Triton {v['triton']} (Python {v['python']})", "", *kernel_table(rows, exp_by_entry), ""]
        missed = _missed(rows, exp_by_entry)
        md += [f"Targets missed under Triton {v['triton']}: " + ("none." if not missed else ""),
               *[f"- {m}" for m in missed], ""]
    if cuda is not None:
        rows, meta = cuda
        md += ["### CUDA kernels (csrc/*.cu)", ""]
        if not meta.get("nvcc"):
            md += ["nvcc not found: not compiled.", ""]
        else:
            for src, (flags, how) in meta["flags"].items():
                md.append(f"- `{src}`: `nvcc {' '.join(flags)} -cubin -arch=sm_{ARCH}` (flags: {how})")
            md += ["", "Shared memory: the static part only (the dynamic part is chosen at launch); warps: "
                   "the kernel's launch bounds.", "", *kernel_table([finish_row(r) for r in rows], {}), ""]
    if exp is not None:
        md += ["### Exponentials per edge (Triton CPU interpreter, float32, the GPU tiles)", "",
               "Every lane of every exp/exp2 each kernel evaluates, masked lanes included (a GPU issues MUFU.EX2 "
               "for them too), divided by the edges of the launch; the basis needs 128 per edge.", "",
               *exp_table(exp), ""]
    return "\n".join(md).rstrip() + "\n"


def default_pythons() -> list[str]:
    """This interpreter, plus the Triton 3.6 environment when it exists (reported missing when not)."""
    return [sys.executable, str(TRITON36)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.static_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton-python", action="append", metavar="PATH",
                    help="an interpreter with the Triton version to compile with (repeatable; default: this "
                         f"one and {TRITON36})")
    ap.add_argument("--out", default=str(RESULTS), help="markdown file to splice the section into ('-': print only)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the CUDA kernels of csrc/")
    ap.add_argument("--no-exp-count", action="store_true", help="skip the interpreter's exponential count")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess (1800)")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--count-exp", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.count_exp:
        count_exp_worker(args.count_exp)
        return 0
    versions = []
    for py in args.triton_python or default_pythons():
        print(f"[static_report] compiling with {py} ...", flush=True)
        versions.append(run_worker(py, "--worker", args.timeout))
        print(f"[static_report]   {versions[-1].get('triton', versions[-1].get('error'))}", flush=True)
    tools = {}
    nvdisasm = next((v.get("nvdisasm") for v in versions if v.get("nvdisasm")), None) or shutil.which("nvdisasm")
    if nvdisasm:
        tools = {"nvdisasm": nvdisasm, "cuobjdump": str(Path(nvdisasm).with_name("cuobjdump"))}
    cuda = None if args.no_cuda else cuda_rows(tools)
    exp = None
    if not args.no_exp_count:
        print("[static_report] counting exponentials on the interpreter ...", flush=True)
        exp = run_worker(sys.executable, "--count-exp", args.timeout)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = build_markdown(versions, cuda, exp, date)
    if args.out == "-":
        print(md)
    else:
        path = Path(args.out)
        path.write_text(splice(path.read_text() if path.exists() else "", md))
        print(f"[static_report] section written to {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
