"""Ahead-of-time compile of the radius-graph kernels for sm_90 (H100/H200). Needs no GPU;
catches compile errors the CPU interpreter cannot see."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import CUBIN_RESOURCES, H100_MAX_SHARED, compile_in_subprocess  # noqa: E402

RADIUS_SCRIPT = CUBIN_RESOURCES + r"""
import json, torch
from e3relax_fast.kernels import radius_graph as m

out = m.aot_compile(arch=90, max_neighbors=50)
block, warps = m._tiles(torch.device("cuda"), None)
print(json.dumps({"select_lanes": [block, 32 * warps, out["select"].metadata.num_warps],
                  **{name: {"cubin": len(k.asm["cubin"]), "ptx": k.asm["ptx"], "shared": k.metadata.shared,
                            **resources(k)} for name, k in out.items()}}))
"""


def test_radius_graph_compiles_for_sm90_without_f64_fma():
    """The radius-graph kernels compile for sm_90 with no local memory (n_spills == 0), the selection
    kernel with one distance test per lane (block = 32 x num_warps), and their float64 arithmetic is the explicitly
    rounded PTX (mul/add/sub/div/sqrt .rn.f64): no fused multiply-add may change a distance bit.
    FP fusion is left enabled (Triton's default) to show the kernels do not depend on it."""
    kernels = compile_in_subprocess(RADIUS_SCRIPT)
    block, lanes, compiled_warps = kernels.pop("select_lanes")
    assert block == lanes == 32 * compiled_warps, "the selection kernel must do one distance test per lane"
    assert set(kernels) == {"select", "fill"}
    for name, info in kernels.items():
        ptx = info["ptx"]
        assert info["cubin"] > 0, name
        assert ".target sm_90" in ptx, name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
        assert info["local"] == 0, f"{name}: {info['local']} bytes of local memory (spills), {info['n_regs']} registers"
        assert "fma.rn.f64" not in ptx and "fma.rz.f64" not in ptx and "mad.rn.f64" not in ptx, \
            f"{name}: float64 FMA in the PTX"
        for op in ("mul.rn.f64", "add.rn.f64", "sqrt.rn.f64"):
            assert op in ptx, f"{name}: {op} missing"
    assert "div.rn.f64" in kernels["select"]["ptx"]
