"""Op ``lattice_pool``: the per-crystal mean of atom features in Triton (spec §6 Step 0 centres,
Step E pooling).

Twin of :func:`e3relax_fast.reference.lattice_pool.segment_mean`, same arguments. ``x`` of shape
``(N, ...)`` is read as ``(N, F)`` with ``F`` the product of its trailing dimensions.

Forward (``_lattice_pool_kernel``): grid ``(G, feature blocks)``. A program owns one crystal and
``block_f`` features; it walks the crystal's CSR atom range ``ptr[g]:ptr[g+1]`` in tiles of
``block_a`` atoms, sums each tile over its atoms and accumulates in registers, then divides by the
atom count (clamped to 1, so an empty crystal gets 0) and stores once. Every output element is
written by exactly one program in a fixed order: deterministic, no atomics, no host sync (the loop
bounds are read on the device).

Backward: the mean is linear, d x_i = grad[g_i] / count[g_i]: one division per crystal and a
gather over ``graph_index`` in PyTorch, deterministic and itself differentiable (so double
backward works).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import LaunchConfig, alloc, compile_for_gpu, interpreting


@triton.jit
def _lattice_pool_kernel(x_ptr, ptr_ptr, out_ptr, F, BLOCK_A: tl.constexpr, BLOCK_F: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    start = tl.load(ptr_ptr + g)
    end = tl.load(ptr_ptr + g + 1)
    acc = tl.zeros([BLOCK_F], dtype=x_ptr.dtype.element_ty)
    for a0 in range(start, end, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        tile = tl.load(x_ptr + a[:, None] * F + f[None, :], mask=(a < end)[:, None] & fm[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    count = tl.maximum(end - start, 1).to(x_ptr.dtype.element_ty)
    tl.store(out_ptr + g * F + f, acc / count, mask=fm)


@dataclass(frozen=True, kw_only=True)
class PoolConfig(LaunchConfig):
    """Launch parameters; ``None`` fields are chosen from the problem and device.

    block_a: atoms summed per loop step. block_f: features per program (powers of two). num_warps:
    warps per program.
    """

    block_a: int | None = None
    block_f: int | None = None


def gpu_tiles(features: int) -> dict:
    """Default GPU tiles (from an sm_90 ahead-of-time compile, not from timings: no GPU was
    available when they were picked)."""
    return dict(block_a=16, block_f=min(128, triton.next_power_of_2(features)), num_warps=4)


def _resolve_config(cfg: PoolConfig | None, features: int, device) -> PoolConfig:
    cfg = cfg or PoolConfig()
    if interpreting() or device.type != "cuda":
        # The interpreter pays per program and per loop step: one feature block, long atom tiles.
        defaults = dict(block_a=64, block_f=triton.next_power_of_2(features), num_warps=4)
    else:
        defaults = gpu_tiles(features)
    return cfg.with_defaults(defaults)


def _forward(x2, ptr, cfg: PoolConfig) -> Tensor:
    g, f = ptr.shape[0] - 1, x2.shape[1]
    out = alloc((g, f), x2)
    if g and f:
        _lattice_pool_kernel[(g, triton.cdiv(f, cfg.block_f))](
            x2, ptr, out, f, BLOCK_A=cfg.block_a, BLOCK_F=cfg.block_f, num_warps=cfg.num_warps)
    return out


class _LatticePool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, ptr, graph_index, cfg):
        ctx.save_for_backward(ptr, graph_index)
        return _forward(x2, ptr, cfg)

    @staticmethod
    def backward(ctx, grad):
        ptr, graph_index = ctx.saved_tensors
        counts = (ptr[1:] - ptr[:-1]).clamp(min=1).to(grad.dtype)
        return (grad / counts.unsqueeze(-1))[graph_index], None, None, None


def lattice_pool(x: Tensor, ptr: Tensor, graph_index: Tensor, *, config: PoolConfig | None = None) -> Tensor:
    """Fused Triton twin of :func:`e3relax_fast.reference.lattice_pool.segment_mean`.

    Args:
        x: ``(N, ...)`` float32/float64 atom features (e.g. ``(N, 3)`` positions in Å, ``(N, H)``
            scalars, ``(N, 3, H)`` vectors); differentiable.
        ptr: ``(G+1,)`` int64 CSR atom ranges (atoms of crystal g are ``ptr[g]:ptr[g+1]``).
        graph_index: ``(N,)`` int64 crystal of each atom (consistent with ``ptr``; used by the
            backward).
        config: optional :class:`PoolConfig`, for tests and tuning.

    Returns:
        ``(G, ...)`` means in the dtype of ``x``; a crystal without atoms gets 0.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton lattice_pool supports float32 and float64, got {x.dtype}")
    n = x.shape[0]
    if ptr.dim() != 1 or graph_index.shape != (n,):
        raise ValueError(f"shapes: x {tuple(x.shape)}, ptr {tuple(ptr.shape)}, graph_index "
                         f"{tuple(graph_index.shape)}; expected (N, ...), (G+1,), (N,)")
    features = math.prod(x.shape[1:])
    cfg = _resolve_config(config, features, x.device)
    out = _LatticePool.apply(x.reshape(n, features).contiguous(), ptr.to(torch.int64).contiguous(),
                             graph_index.to(torch.int64), cfg)
    return out.reshape(ptr.shape[0] - 1, *x.shape[1:])


def aot_compile(dtype: torch.dtype = torch.float32, features: int = 1536, arch: int = 90,
                config: PoolConfig | None = None) -> dict:
    """Compile the forward kernel (``"fwd"``) for ``sm_{arch}`` without a device, with the GPU
    defaults for ``features`` (1536 = 3H at H=512). Returns ``{"fwd": compiled kernel}``."""
    tiles = (config or PoolConfig()).with_defaults(gpu_tiles(features))
    fp = "*fp32" if dtype == torch.float32 else "*fp64"
    types = {"x_ptr": fp, "ptr_ptr": "*i64", "out_ptr": fp, "F": "i32"}
    consts = {"BLOCK_A": tiles.block_a, "BLOCK_F": tiles.block_f}
    return {"fwd": compile_for_gpu(_lattice_pool_kernel, types, consts, arch, tiles.num_warps)}
