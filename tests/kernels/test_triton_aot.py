"""Ahead-of-time compile of the Triton kernels for sm_90 (H100/H200) at the paper's size
(H=512, R=128). Needs no GPU; catches compile errors the CPU interpreter cannot see.

Runs in a subprocess because the test session sets ``TRITON_INTERPRET=1`` (conftest.py), under which
Triton hands out interpreted functions that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

import e3relax_fast  # noqa: E402

H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90

SCRIPT = r"""
import json, sys, torch
from e3relax_fast.kernels import message_passing as m
out = m.aot_compile(getattr(torch, sys.argv[1]), hidden=512, num_rbf=128, arch=90)
print(json.dumps({name: {"cubin": len(k.asm["cubin"]), "ptx": k.asm["ptx"][:4000],
                         "shared": k.metadata.shared} for name, k in out.items()}))
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiles_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    package_root = str(Path(e3relax_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, dtype], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(kernels) == {"fwd", "bwd0", "bwd1", "bwd2"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"


LATTICE_SCRIPT = r"""
import json, sys, torch
from e3relax_fast.kernels import lattice_message as m, lattice_pool as p
dtype = getattr(torch, sys.argv[1])
out = {f"{name}_{form}": k for form, centred in (("centred", True), ("paper", False))
       for name, k in m.aot_compile(dtype, hidden=512, num_rbf=128, arch=90, centred=centred).items()}
out["pool"] = p.aot_compile(dtype, features=3 * 512, arch=90)["fwd"]
print(json.dumps({name: {"cubin": len(k.asm["cubin"]), "ptx": k.asm["ptx"][:4000],
                         "shared": k.metadata.shared} for name, k in out.items()}))
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lattice_kernels_compile_for_sm90(dtype):
    """The atom–lattice message kernels (both geometry forms) and the per-crystal mean."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    package_root = str(Path(e3relax_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", LATTICE_SCRIPT, dtype], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(kernels) == {"fwd_centred", "bwd_centred", "fwd_paper", "bwd_paper", "pool"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"


RADIUS_SCRIPT = r"""
import json
from e3relax_fast.kernels import radius_graph as m
out = m.aot_compile(arch=90, max_neighbors=50)
print(json.dumps({name: {"cubin": len(k.asm["cubin"]), "ptx": k.asm["ptx"], "shared": k.metadata.shared}
                  for name, k in out.items()}))
"""


def test_radius_graph_compiles_for_sm90_without_f64_fma():
    """The radius-graph kernels compile for sm_90, and their float64 arithmetic is the explicitly
    rounded PTX (mul/add/sub/div/sqrt .rn.f64): no fused multiply-add may change a distance bit.
    FP fusion is left enabled (Triton's default) to show the kernels do not depend on it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    package_root = str(Path(e3relax_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", RADIUS_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(kernels) == {"select", "fill"}
    for name, info in kernels.items():
        ptx = info["ptx"]
        assert info["cubin"] > 0, name
        assert ".target sm_90" in ptx, name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
        assert "fma.rn.f64" not in ptx and "fma.rz.f64" not in ptx and "mad.rn.f64" not in ptx, \
            f"{name}: float64 FMA in the PTX"
        for op in ("mul.rn.f64", "add.rn.f64", "sqrt.rn.f64"):
            assert op in ptx, f"{name}: {op} missing"
    assert "div.rn.f64" in kernels["select"]["ptx"]
