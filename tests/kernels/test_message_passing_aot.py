"""Ahead-of-time compile of the message-passing kernels for sm_90 (H100/H200) at the paper's size
(H=512, R=128). Needs no GPU; catches compile errors the CPU interpreter cannot see, and checks the
compiler's facts the kernels are designed for (ptxas's log and the SASS):

* no spills, float32 and float64 (except the float64 backward: a strict xfail, still open); the
  float32 forward within 128 registers (two CTAs of 8 warps per SM) and at most half an H100's
  shared memory;
* the radial basis evaluated once per edge in the forward: no ``MUFU.EX2`` inside the channel loop
  (the loop that holds the FFMAs), and no more in the whole kernel than one per edge slot and
  centre of a tile (BLOCK_E x R over the CTA's threads).
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import H100_MAX_SHARED, compile_in_subprocess  # noqa: E402

SCRIPT = r"""
import contextlib, glob, io, json, os, subprocess, sys, tempfile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"          # ptxas -v of each compile, on stdout
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # a cached kernel would print no log
import torch, triton
from e3relax_fast.kernels import message_passing as m
dtype = getattr(torch, sys.argv[1])
log = io.StringIO()
with contextlib.redirect_stdout(log):
    out = m.aot_compile(dtype, hidden=512, num_rbf=128, arch=90)
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
cuobjdump = next(iter(glob.glob(os.path.join(tools, "cuobjdump"))), None)
result = {"log": log.getvalue(), "tiles": m.gpu_tiles(dtype, 512), "kernels": {}}
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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiles_for_sm90(dtype):
    result = compile_in_subprocess(SCRIPT, dtype)
    kernels = result["kernels"]
    assert set(kernels) == {"fwd", "bwd"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
        facts = ptxas_facts(result["log"], info["entry"])
        if (dtype, name) != ("float64", "bwd"):  # known to spill: test_float64_backward_spills
            assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0, f"{name} ({dtype}) spills: {facts}"
        if dtype == "float32" and name == "fwd":
            # Two CTAs of 8 warps per SM: 65,536 registers, 228 KB of shared memory.
            assert facts["registers"] <= 128, f"forward: {facts['registers']} registers"
            assert 2 * info["shared"] <= H100_MAX_SHARED, f"forward: {info['shared']} bytes of shared memory"


@pytest.mark.xfail(strict=True, reason="open (issue 15): the float64 backward (three chunks, dW of its channel "
                   "block in registers, fp64 mma) spills ~1 KB at every tile tried (block_e 16-32, block_h 16-32, "
                   "block_k 16-64, 2-8 warps, 1-2 stages); strict: passing means the table above can be updated")
def test_float64_backward_spills():
    result = compile_in_subprocess(SCRIPT, "float64")
    facts = ptxas_facts(result["log"], result["kernels"]["bwd"]["entry"])
    assert facts["spill_stores"] == 0 and facts["spill_loads"] == 0, facts


def test_forward_basis_once_per_edge():
    """float32 forward: the exponentials of the basis are outside the channel loop, one per edge slot
    and centre of a tile (the old design evaluated them per chunk and channel block: 48x more)."""
    result = compile_in_subprocess(SCRIPT, "float32")
    info = result["kernels"]["fwd"]
    if not info["sass"]:
        pytest.skip("no cuobjdump next to Triton's ptxas")
    instructions, loops = sass_loops(info["sass"])
    ffma = count(instructions, "FFMA")
    assert ffma > 0 and loops
    # The channel loop: the innermost loop holding most of the FFMAs (the gate GEMMs).
    inner = min((loop for loop in loops if count(instructions, "FFMA", *loop) > ffma // 2),
                key=lambda loop: loop[1] - loop[0])
    assert count(instructions, "MUFU.EX2", *inner) == 0, "exponentials inside the channel loop"
    tiles = result["tiles"]
    per_thread = tiles["block_e"] * 128 // (32 * info["warps"])
    assert 0 < count(instructions, "MUFU.EX2") <= per_thread
