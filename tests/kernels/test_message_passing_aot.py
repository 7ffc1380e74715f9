"""Ahead-of-time compile of the message-passing kernels for sm_90 (H100/H200) at the paper's size
(H=512, R=128). Needs no GPU; catches compile errors the CPU interpreter cannot see."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

from helpers import H100_MAX_SHARED, compile_in_subprocess  # noqa: E402

SCRIPT = r"""
import json, sys, torch
from e3relax_fast.kernels import message_passing as m
out = m.aot_compile(getattr(torch, sys.argv[1]), hidden=512, num_rbf=128, arch=90)
print(json.dumps({name: {"cubin": len(k.asm["cubin"]), "ptx": k.asm["ptx"][:4000],
                         "shared": k.metadata.shared} for name, k in out.items()}))
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiles_for_sm90(dtype):
    kernels = compile_in_subprocess(SCRIPT, dtype)
    assert set(kernels) == {"fwd", "bwd0", "bwd1", "bwd2"}
    for name, info in kernels.items():
        assert info["cubin"] > 0, name
        assert ".target sm_90" in info["ptx"], name
        assert info["shared"] <= H100_MAX_SHARED, f"{name}: {info['shared']} bytes of shared memory"
