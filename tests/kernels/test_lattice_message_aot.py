"""Ahead-of-time compile of the atom–lattice kernels and the per-crystal mean
for sm_90 (H100/H200) at H=512, R=128. Needs no GPU; catches compile errors the CPU interpreter cannot see."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import H100_MAX_SHARED, compile_in_subprocess  # noqa: E402

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
    kernels = compile_in_subprocess(LATTICE_SCRIPT, dtype)
    assert set(kernels) == {"fwd_centred", "bwd_centred", "fwd_paper", "bwd_paper", "pool"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
