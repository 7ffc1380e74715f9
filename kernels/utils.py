"""Host-side helpers shared by the kernel modules: the interpreter switch, output buffers that tests
can poison, the launch-configuration base classes, and the ahead-of-time compile for a GPU target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
from torch import Tensor

# Tests set this to True so every buffer a kernel must fill starts poisoned (NaN, or a sentinel
# integer): an element the kernel leaves unwritten then fails the comparison with the reference.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """Whether Triton runs the kernels on its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty(shape, dtype: torch.dtype, device, poison=float("nan")) -> Tensor:
    """An output buffer the kernels fill; all ``poison`` when :data:`POISON_OUTPUTS` is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, poison, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def alloc(shape, like: Tensor) -> Tensor:
    """:func:`empty` in the dtype and on the device of ``like`` (NaN when poisoned)."""
    return empty(shape, like.dtype, like.device)


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Launch parameters of a kernel; ``None`` fields are chosen from the problem and device.

    num_warps: warps per program.
    """

    num_warps: int | None = None

    def with_defaults(self, defaults: dict):
        """A copy whose ``None`` fields take their values from ``defaults`` (field name -> value)."""
        return replace(self, **{name: value for name, value in defaults.items() if getattr(self, name) is None})


_PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclass(frozen=True, kw_only=True)
class GateConfig(LaunchConfig):
    """Tiles of the gated-message ops, whose gates are a K-loop GEMM ``(tile, R) x (R, block_h)``.

    block_h: channels per program (>= 16). block_k: radial functions per step of the K-loop (>= 16).
    num_stages: software-pipelining stages. input_precision: ``"ieee"`` (exact float32, the default)
    or ``"tf32"`` / ``"tf32x3"`` (tensor cores; float32 only).
    """

    block_h: int | None = None
    block_k: int | None = None
    num_stages: int | None = None
    input_precision: str = "ieee"

    def check(self, dtype: torch.dtype, row_tile: str) -> None:
        """Raise ``ValueError`` for a precision ``dtype`` does not allow or a tile below the ``tl.dot``
        minimum; ``row_tile`` names the field holding the GEMM's M side."""
        if self.input_precision not in _PRECISIONS or (dtype == torch.float64 and self.input_precision != "ieee"):
            raise ValueError(f"input_precision {self.input_precision!r}: use 'ieee' (float64 and float32), "
                             "'tf32' or 'tf32x3' (float32 only)")
        if min(getattr(self, row_tile), self.block_h, self.block_k) < 16:
            raise ValueError(f"{row_tile}, block_h and block_k must be >= 16 (tl.dot tile minimum)")


def compile_for_gpu(kernel, types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 1,
                    maxnreg: int | None = None, aligned: tuple[str, ...] = ()):
    """Compile the ``@triton.jit`` ``kernel`` for CUDA ``sm_{arch}`` without a device.

    ``types`` gives every runtime parameter's Triton type (``"*fp32"``, ``"*i64"``, ``"i32"``, ...),
    ``constexprs`` every constexpr parameter's value; ``maxnreg`` caps the registers per thread
    (ptxas ``.maxnreg``), as the launch option of the same name. ``aligned`` names the parameters
    to compile as multiples of 16 (pointers: 16-byte aligned), the specialization Triton's launcher
    makes at run time for such values (fresh torch tensors, H = 512), so the code compiled here
    is the code that would run. Returns the compiled kernel (``.asm`` holds
    ``ttgir``/``ptx``/``cubin``, ``.metadata.shared`` its shared memory).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise RuntimeError("compiling for a GPU needs the kernels defined without TRITON_INTERPRET=1 "
                           "(import the kernel module in a process where it is unset)")
    signature = {name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages,
                                   **({} if maxnreg is None else {"maxnreg": maxnreg})})
