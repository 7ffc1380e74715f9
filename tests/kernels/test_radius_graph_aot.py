"""Ahead-of-time compile of the radius-graph kernels for sm_90 (H100/H200). Needs no GPU;
catches compile errors the CPU interpreter cannot see."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import H100_MAX_SHARED, compile_in_subprocess  # noqa: E402

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
    kernels = compile_in_subprocess(RADIUS_SCRIPT)
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
