"""Ahead-of-time compile of the message-passing kernels for sm_90 (H100/H200) at the paper's size
(H=512, R=128). Needs no GPU; catches compile errors the CPU interpreter cannot see, and checks the
compiler's facts the kernels are designed for (ptxas's log and the SASS), under this environment's
Triton and under Triton 3.6 (the version on the GPU machines) when its interpreter is present
(``E3RELAX_TRITON36_PYTHON``, default ``/work/venvs/triton36/bin/python``; skipped otherwise):

* no spills in any kernel (forward, backward, the backward's basis kernel), float32 and float64;
  the float32 forward within 128 registers (two CTAs of 8 warps per SM) and at most half an
  H100's shared memory;
* the radial basis evaluated once per edge: in the forward, no ``MUFU.EX2`` inside the channel loop
  (the loop that holds the FFMAs) and no more in the whole kernel than one per edge slot and centre
  of a tile; in the backward, none in the main kernel (it reads the basis kernel's buffers) and no
  more in the basis kernel than one per edge slot and centre of its tile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import H100_MAX_SHARED  # noqa: E402

TRITON36 = os.environ.get("E3RELAX_TRITON36_PYTHON", "/work/venvs/triton36/bin/python")

SCRIPT = r"""
import contextlib, glob, io, json, os, subprocess, sys, tempfile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"          # ptxas -v of each compile, on stdout
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # a cached kernel would print no log
import torch, triton
from e3relax_fast.ops.table import _kernel_module  # the kernels/ folder, installed or not
m = _kernel_module("message_passing")
dtype = getattr(torch, sys.argv[1])
log = io.StringIO()
with contextlib.redirect_stdout(log):
    out = m.aot_compile(dtype, hidden=512, num_rbf=128, arch=90)
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
cuobjdump = next(iter(glob.glob(os.path.join(tools, "cuobjdump"))), None)
result = {"triton": triton.__version__, "log": log.getvalue(), "tiles": m.gpu_tiles(dtype, 512), "kernels": {}}
for name, k in out.items():
    sass = ""
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
            fh.write(k.asm["cubin"])
            fh.flush()
            sass = subprocess.run([cuobjdump, "-sass", fh.name], capture_output=True, text=True).stdout
    result["kernels"][name] = {"entry": k.metadata.name, "cubin": len(k.asm["cubin"]), "ptx": k.asm["ptx"][:4000],
                               "shared": k.metadata.shared, "warps": k.metadata.num_warps, "sass": sass}
print(json.dumps(result))
"""

_RESULTS: dict = {}


def compile_with(python: str, dtype: str) -> dict:
    """SCRIPT's JSON for ``dtype`` under the interpreter ``python`` (a subprocess: this session runs
    Triton's CPU interpreter, whose functions cannot be compiled), once per session."""
    key = (python, dtype)
    if key not in _RESULTS:
        import e3relax_fast

        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, stated
        env.setdefault("OMP_NUM_THREADS", "1")
        package_root = str(Path(e3relax_fast.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([python, "-c", SCRIPT, dtype], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        _RESULTS[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return _RESULTS[key]


def _interpreters():
    yield pytest.param(sys.executable, id="this-triton")
    yield pytest.param(TRITON36, id="triton36", marks=pytest.mark.skipif(
        not Path(TRITON36).exists(), reason=f"no Triton 3.6 interpreter at {TRITON36} (E3RELAX_TRITON36_PYTHON)"))


INTERPRETERS = list(_interpreters())


def ptxas_facts(log: str, entry: str) -> dict:
    """Registers and spill bytes of ``entry`` from a ``ptxas -v`` log."""
    section = log[log.index(f"Compiling entry function '{entry}'"):]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", section)
    regs = re.search(r"Used (\d+) registers", section)
    assert spills and regs, section[:2000]
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_loops(sass: str) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """``(instructions, loops)``: (address, text) of every instruction, and (first, last address)
    of every loop (a branch to an earlier address)."""
    instructions = [(int(m.group(1), 16), m.group(2).strip()) for m in _LINE.finditer(sass)]
    loops = []
    for address, text in instructions:
        target = re.search(r"\bBRA\s+(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((int(target.group(1), 16), address))
    return instructions, loops


def count(instructions, opcode: str, lo: int = -1, hi: int = 1 << 60) -> int:
    return sum(1 for address, text in instructions if lo <= address <= hi and re.search(rf"\b{opcode}\b", text))


@pytest.mark.parametrize("python", INTERPRETERS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiles_for_sm90_without_spills(python, dtype):
    result = compile_with(python, dtype)
    kernels = result["kernels"]
    assert set(kernels) == {"fwd", "bwd", "bwd_basis"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
        facts = ptxas_facts(result["log"], info["entry"])
        assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0, \
            f"{name} ({dtype}, Triton {result['triton']}) spills: {facts}"
        if dtype == "float32" and name == "fwd":
            # Two CTAs of 8 warps per SM: 65,536 registers, 228 KB of shared memory.
            assert facts["registers"] <= 128, f"forward: {facts['registers']} registers"
            assert 2 * info["shared"] <= H100_MAX_SHARED, f"forward: {info['shared']} bytes of shared memory"


def _sass_or_skip(info: dict) -> str:
    if not info["sass"]:
        pytest.skip("no cuobjdump next to Triton's ptxas")
    return info["sass"]


@pytest.mark.parametrize("python", INTERPRETERS)
def test_forward_basis_once_per_edge(python):
    """float32 forward: the exponentials of the basis are outside the channel loop, one per edge slot
    and centre of a tile (the old design evaluated them per chunk and channel block: 48x more)."""
    result = compile_with(python, "float32")
    info = result["kernels"]["fwd"]
    instructions, loops = sass_loops(_sass_or_skip(info))
    ffma = count(instructions, "FFMA")
    assert ffma > 0 and loops
    # The channel loop: the innermost loop holding most of the FFMAs (the gate GEMMs).
    inner = min((loop for loop in loops if count(instructions, "FFMA", *loop) > ffma // 2),
                key=lambda loop: loop[1] - loop[0])
    assert count(instructions, "MUFU.EX2", *inner) == 0, "exponentials inside the channel loop"
    tiles = result["tiles"]
    per_thread = tiles["block_e"] * 128 // (32 * info["warps"])
    assert 0 < count(instructions, "MUFU.EX2") <= per_thread


@pytest.mark.parametrize("python", INTERPRETERS)
def test_backward_basis_once_per_edge(python):
    """float32 backward: the main kernel (one program per source run, channel block and chunk)
    evaluates no exponential at all; the basis kernel evaluates one per edge slot and centre of its
    tile (the previous backward evaluated the basis once per channel block: 32x more at H = 512)."""
    result = compile_with(python, "float32")
    bwd = sass_loops(_sass_or_skip(result["kernels"]["bwd"]))[0]
    assert count(bwd, "FFMA") > 0
    assert count(bwd, "MUFU.EX2") == 0, "exponentials in the main backward kernel"
    info = result["kernels"]["bwd_basis"]
    basis = sass_loops(info["sass"])[0]
    per_thread = result["tiles"]["basis_block_e"] * 128 // (32 * info["warps"])
    assert 0 < count(basis, "MUFU.EX2") <= per_thread
