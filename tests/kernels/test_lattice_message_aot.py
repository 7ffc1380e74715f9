"""Ahead-of-time compile of the atom–lattice kernels and the per-crystal mean
for sm_90 (H100/H200) at H=512, R=128. Needs no GPU; catches compile errors the CPU interpreter cannot see,
and reads the compiled code's resources (registers, local memory: spills) with cuobjdump."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import CUBIN_RESOURCES, H100_MAX_SHARED, compile_in_subprocess  # noqa: E402

LATTICE_SCRIPT = CUBIN_RESOURCES + r"""
import json, sys, torch
from e3relax_fast.kernels import lattice_message as m, lattice_pool as p
dtype = getattr(torch, sys.argv[1])
out = {f"{name}_{form}": k for form, centred in (("centred", True), ("paper", False))
       for name, k in m.aot_compile(dtype, hidden=512, num_rbf=128, arch=90, centred=centred).items()}
out["pool"] = p.aot_compile(dtype, features=3 * 512, arch=90)["fwd"]
print(json.dumps({name: resources(k) for name, k in out.items()}))
"""

TF32_SCRIPT = CUBIN_RESOURCES + r"""
import json, sys, torch
from e3relax_fast.kernels import lattice_message as m
config = m.KernelConfig(input_precision=sys.argv[1])
out = m.aot_compile(torch.float32, hidden=512, num_rbf=128, arch=90, config=config)
print(json.dumps({name: resources(k) for name, k in out.items()}))
"""

BASIS_KERNELS = {"basis", "basis_slope"}
KERNELS = BASIS_KERNELS | {"fwd", "bwd", "bwd_dist", "bwd_weight"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lattice_kernels_compile_for_sm90_without_spills(dtype):
    """The atom–lattice message kernels (both geometry forms) and the per-crystal mean compile for
    sm_90 with the GPU default tiles, within the shared memory of a block, and use no local memory
    (n_spills == 0: no register spills). The radial basis is evaluated once, by the basis kernels: at
    float32 (where ``tl.exp`` lowers to ``ex2.approx``) the gate, dL/dd and dL/dW kernels read it
    and evaluate no exponential (no channel block or W block re-evaluates it)."""
    kernels = compile_in_subprocess(LATTICE_SCRIPT, dtype)
    assert set(kernels) == {f"{k}_{form}" for k in KERNELS for form in ("centred", "paper")} | {"pool"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx_head"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
        assert info["n_spills"] == 0, f"{name} ({dtype}): {info['local']} bytes of local memory (spills), " \
                                      f"{info['n_regs']} registers"
        assert info["n_regs"] <= 255, name
        if dtype == "float32":
            basis = name.rsplit("_", 1)[0] in BASIS_KERNELS
            assert (info["ex2"] > 0) == basis, f"{name}: {info['ex2']} ex2.approx"


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_lattice_tf32_uses_wgmma_without_spills(precision):
    """With tensor-core precisions the default float32 tiles (block_n = 64, 8 warps) let the gate
    GEMMs of the forward and backward and the dL/dd GEMM use Hopper's wgmma; still no spills."""
    kernels = compile_in_subprocess(TF32_SCRIPT, precision)
    assert set(kernels) == KERNELS
    for name in ("fwd", "bwd", "bwd_dist"):
        assert kernels[name]["wgmma"] > 0, f"{name}: no wgmma with {precision}"
    for name, info in kernels.items():
        assert info["n_spills"] == 0, f"{name} ({precision}): {info['local']} bytes of local memory (spills)"
        assert info["shared"] <= H100_MAX_SHARED, name
