"""Fused lattice -> atom message of one lattice node in Triton (spec §6 Step 0, Step A.1–3),
forward and backward.

Twin of :func:`e3relax_fast.reference.lattice_message.lattice_message`, same arguments. For atom
i of crystal g and lattice node k:

    q_i = C_g[k] - (p_i - c_g)   (c_g = centres[g]; absent in the paper form)          (3,) Å
    d_i = sqrt(max(|q_i|^2, eps)),  w_i = -q_i / d_i
    f_i = env(d_i / cutoff) * exp(coeff * (d_i / cutoff - mu)^2)                         (R,)
    [a1|a2|a3]_i = x_proj_i * (W f_i + b) / sqrt(3)                                      (3H,)
    ds_i = a3,  v_out_i = (a1 * vec_i + w_i (x) a2) / sqrt(H)

Radial basis (``_lm_basis_kernel``), grid ``(atom tiles of 16,)``: evaluates f (N, R) once per
atom (one exponential per atom and centre) into a scratch buffer in the working dtype, and in the
backward, when the geometry needs a gradient, also its slope cutoff * df/dd (N, R) from the same
exponential. R = 128 values per atom (512 B at float32, a third of a row of x_proj at H = 128):
small next to the 3H-wide rows the other kernels read. The kernels below read tiles of it; none
evaluates an exponential, so the basis costs R exponentials per atom whatever the number of
channel blocks, atom tiles or W blocks (when the gate kernels evaluated it themselves, each
channel block did: 16 times per atom at H = 512, float32). The forward's buffer is not kept for the backward (no
N x R tensor lives until the backward): the backward evaluates it once more.

Forward (``_lm_fwd_kernel``): grid ``(atom tiles, channel blocks)``. A program owns ``block_n``
consecutive atoms and ``block_h`` channels of each of the three chunks. It computes the atoms'
geometry in registers, then one K-loop over the R centres (steps of ``block_k``) reads the basis
tile (block_n x block_k) once and feeds three ``tl.dot`` with the rows of W of the three chunks
(both tiles software-pipelined, ``num_stages``). Gates, ``ds`` and ``v_out`` follow in registers:
one plain store per output element, no atomics.

Backward: the basis kernel, then three kernels, so that none holds more than three
(block_n, block_h) tiles at once (the single backward kernel this replaced held six accumulators
plus the W-gradient operands, and spilled at float64):

* ``_lm_bwd_kernel``, grid ``(atom tiles, channel blocks)``: recomputes geometry and the three
  gates from the stored basis as the forward does, reads the upstream gradients and stores
  d x_proj and d vec (one store each), the gate gradients ``gg`` ((N, 3H), laid out as x_proj;
  only when W, b or the geometry need a gradient) and per-(atom, channel block) partials of dL/dw;
* ``_lm_bwd_dist_kernel``, grid ``(atom tiles,)``: dL/dd = sum_k df/dd[n, k] (gg W)[n, k], the
  GEMM gg W over all 3H rows inside a K-loop over the centres, times the stored slope, so the
  gates' d-derivatives are never formed;
* ``_lm_bwd_weight_kernel``, grid ``(row blocks of W, centre blocks, runs of atom tiles)``:
  dL/dW = gg^T f accumulated in registers over the run's atom tiles (f read from the buffer), one
  store per run into a partial summed afterwards in fixed order; dL/db = column sums of gg (torch).

A short PyTorch epilogue turns dL/dd and dL/dw into dL/dq. Each atom has exactly one q, so
dL/dp = -dL/dq needs no scatter; dL/dC_g[k] and dL/dc_g are ``index_add_`` over the atoms of each
crystal, the only non-deterministic part on CUDA (atomic float adds, ulp-level run-to-run
differences; deterministic under ``torch.use_deterministic_algorithms``). The backward is
first-order only (``once_differentiable``).

Tiles: :func:`gpu_tiles` (one fixed configuration, used by the AOT tests) and
:func:`tuning_configs` (candidates for a hardware sweep) for the gate, dL/dd and dL/dW kernels;
the basis kernel has fixed tiles (``BASIS_BLOCK_N`` x ``BASIS_BLOCK_K``, ``BASIS_NUM_WARPS``).

Precision: float32 and float64, with the conventions of ``kernels/message_passing.py``:
``input_precision="ieee"`` by default (``"tf32"``/``"tf32x3"`` opt in, untested here), and float
constants (coeff, cutoff, 1/sqrt(3), 1/sqrt(H), eps) passed through a small tensor in the working
dtype, because a Python float literal would be rounded to float32 inside the kernel. The radial
basis, its envelope and that constants tensor are shared with ``message_passing`` (``basis.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import EPS
from .basis import basis_tile, chunk_biases, envelope, load_scalars, scalars
from .utils import GateConfig, alloc, compile_for_gpu, interpreting


# ---------------------------------------------------------------------------------------------
# Triton device functions
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lattice_geometry(pos_ptr, cell_ptr, cen_ptr, gi_ptr, n, nm, K, eps, CENTRED: tl.constexpr):
    """q = C_g[K] - (p - c_g) for a tile of atoms ``n`` (mask ``nm``), in the reference's order of
    operations. Returns q (three vectors), |q|^2 and the safe norm d."""
    g = tl.load(gi_ptr + n, mask=nm, other=0)
    px = tl.load(pos_ptr + n * 3 + 0, mask=nm, other=0.0)
    py = tl.load(pos_ptr + n * 3 + 1, mask=nm, other=0.0)
    pz = tl.load(pos_ptr + n * 3 + 2, mask=nm, other=0.0)
    if CENTRED:
        px = px - tl.load(cen_ptr + g * 3 + 0, mask=nm, other=0.0)
        py = py - tl.load(cen_ptr + g * 3 + 1, mask=nm, other=0.0)
        pz = pz - tl.load(cen_ptr + g * 3 + 2, mask=nm, other=0.0)
    lk = cell_ptr + g * 9 + K * 3
    qx = tl.load(lk + 0, mask=nm, other=0.0) - px
    qy = tl.load(lk + 1, mask=nm, other=0.0) - py
    qz = tl.load(lk + 2, mask=nm, other=0.0) - pz
    qq = qx * qx + qy * qy + qz * qz
    d = tl.sqrt(tl.maximum(qq, eps))
    return qx, qy, qz, qq, d


@triton.jit
def _lm_basis_kernel(
    pos_ptr, cell_ptr, cen_ptr, gi_ptr, mu_ptr, scal_ptr, f_ptr, slope_ptr,
    N, R, K,
    CENTRED: tl.constexpr, WITH_SLOPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The radial basis of ``BLOCK_N`` atoms, evaluated once: f[n, :] (N, R) and, with WITH_SLOPE,
    its slope cutoff * df/dd[n, :] (the basis derivative taken with cutoff 1), one exponential per
    (atom, centre). Rows past N are not stored."""
    pid = tl.program_id(0)
    n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    nm = n < N
    coeff, cutoff, _, _, eps = load_scalars(scal_ptr)
    _, _, _, _, d = _lattice_geometry(pos_ptr, cell_ptr, cen_ptr, gi_ptr, n, nm, K, eps, CENTRED)
    x, env, denv = envelope(d, cutoff, WITH_SLOPE)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        f, slope = basis_tile(x, env, denv, nm, mu_ptr, k, km, coeff, 1.0, WITH_SLOPE)
        m2 = nm[:, None] & km[None, :]
        tl.store(f_ptr + n[:, None] * R + k[None, :], f, mask=m2)
        if WITH_SLOPE:
            tl.store(slope_ptr + n[:, None] * R + k[None, :], slope, mask=m2)


@triton.jit
def _basis_block(f_ptr, n, nm, k, km, R):
    """The (tile_n, tile_k) block of the stored basis (zero outside ``nm`` x ``km``)."""
    return tl.load(f_ptr + n[:, None] * R + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)


@triton.jit
def _three_gates(f_ptr, n, nm, w_ptr, h, hm, H, R,
                 BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(tile_n, tile_h) gates W[c H + h] f(d) (no bias) of the three chunks c. One K-loop: each
    block of the stored basis is read once and used by all chunks."""
    dtype = w_ptr.dtype.element_ty
    g1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    g2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    g3 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        f = _basis_block(f_ptr, n, nm, k, km, R)
        wm = hm[:, None] & km[None, :]
        wrow = w_ptr + h[:, None] * R + k[None, :]
        g1 = tl.dot(f, tl.trans(tl.load(wrow, mask=wm, other=0.0)), g1, input_precision=PRECISION, out_dtype=dtype)
        g2 = tl.dot(f, tl.trans(tl.load(wrow + H * R, mask=wm, other=0.0)), g2, input_precision=PRECISION,
                    out_dtype=dtype)
        g3 = tl.dot(f, tl.trans(tl.load(wrow + 2 * H * R, mask=wm, other=0.0)), g3, input_precision=PRECISION,
                    out_dtype=dtype)
    return g1, g2, g3


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lm_fwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, cen_ptr, gi_ptr, w_ptr, b_ptr, f_ptr, scal_ptr,
    ds_ptr, vo_ptr,
    N, H, R, K,
    CENTRED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    nm = n < N
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    _, _, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H

    qx, qy, qz, _, d = _lattice_geometry(pos_ptr, cell_ptr, cen_ptr, gi_ptr, n, nm, K, eps, CENTRED)
    g1, g2, g3 = _three_gates(f_ptr, n, nm, w_ptr, h, hm, H, R, BLOCK_N, BLOCK_H, BLOCK_K, PRECISION)
    m2 = nm[:, None] & hm[None, :]
    xrow = xp_ptr + n[:, None] * H3 + h[None, :]
    a1 = tl.load(xrow, mask=m2, other=0.0) * (g1 + tl.load(b_ptr + h, mask=hm, other=0.0)[None, :]) * inv_sqrt3
    a2 = tl.load(xrow + H, mask=m2, other=0.0) * (g2 + tl.load(b_ptr + H + h, mask=hm, other=0.0)[None, :]) \
        * inv_sqrt3
    a3 = tl.load(xrow + 2 * H, mask=m2, other=0.0) \
        * (g3 + tl.load(b_ptr + 2 * H + h, mask=hm, other=0.0)[None, :]) * inv_sqrt3
    tl.store(ds_ptr + n[:, None] * H + h[None, :], a3, mask=m2)
    vrow = vec_ptr + n[:, None] * H3 + h[None, :]
    orow = vo_ptr + n[:, None] * H3 + h[None, :]
    tl.store(orow, (a1 * tl.load(vrow, mask=m2, other=0.0) + (-qx / d)[:, None] * a2) * inv_sqrt_h, mask=m2)
    tl.store(orow + H, (a1 * tl.load(vrow + H, mask=m2, other=0.0) + (-qy / d)[:, None] * a2) * inv_sqrt_h,
             mask=m2)
    tl.store(orow + 2 * H, (a1 * tl.load(vrow + 2 * H, mask=m2, other=0.0) + (-qz / d)[:, None] * a2)
             * inv_sqrt_h, mask=m2)


# ---------------------------------------------------------------------------------------------
# Backward: three kernels (gates and per-atom terms; dL/dd; dL/dW)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lm_bwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, cen_ptr, gi_ptr, w_ptr, b_ptr, f_ptr, scal_ptr,
    gds_ptr, gvo_ptr,
    gxp_ptr, gvec_ptr, gg_ptr, gdir_ptr,
    N, H, R, K, num_hblocks,
    CENTRED: tl.constexpr, NEED_GG: tl.constexpr, NEED_GEOM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gates again (as the forward), then per (atom, channel): d x_proj, d vec, the gate gradients
    gg (stored when NEED_GG) and this channel block's part of dL/dw (when NEED_GEOM)."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    nm = n < N
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    m2 = nm[:, None] & hm[None, :]
    _, _, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H
    qx, qy, qz, _, d = _lattice_geometry(pos_ptr, cell_ptr, cen_ptr, gi_ptr, n, nm, K, eps, CENTRED)
    g1, g2, g3 = _three_gates(f_ptr, n, nm, w_ptr, h, hm, H, R, BLOCK_N, BLOCK_H, BLOCK_K, PRECISION)
    bias1, bias2, bias3 = chunk_biases(b_ptr, h, hm, H)
    g1 = g1 + bias1[None, :]
    g2 = g2 + bias2[None, :]
    g3 = g3 + bias3[None, :]
    row = n[:, None] * H3 + h[None, :]
    gvx = tl.load(gvo_ptr + row, mask=m2, other=0.0)
    gvy = tl.load(gvo_ptr + row + H, mask=m2, other=0.0)
    gvz = tl.load(gvo_ptr + row + 2 * H, mask=m2, other=0.0)
    # Upstream gradients of the three gated chunks a1, a2, a3.
    ga1 = (gvx * tl.load(vec_ptr + row, mask=m2, other=0.0) + gvy * tl.load(vec_ptr + row + H, mask=m2, other=0.0)
           + gvz * tl.load(vec_ptr + row + 2 * H, mask=m2, other=0.0)) * inv_sqrt_h
    ga2 = (gvx * (-qx / d)[:, None] + gvy * (-qy / d)[:, None] + gvz * (-qz / d)[:, None]) * inv_sqrt_h
    ga3 = tl.load(gds_ptr + n[:, None] * H + h[None, :], mask=m2, other=0.0)
    tl.store(gxp_ptr + row, ga1 * g1 * inv_sqrt3, mask=m2)
    tl.store(gxp_ptr + row + H, ga2 * g2 * inv_sqrt3, mask=m2)
    tl.store(gxp_ptr + row + 2 * H, ga3 * g3 * inv_sqrt3, mask=m2)
    x1 = tl.load(xp_ptr + row, mask=m2, other=0.0)
    a1 = x1 * g1 * inv_sqrt3
    tl.store(gvec_ptr + row, a1 * gvx * inv_sqrt_h, mask=m2)
    tl.store(gvec_ptr + row + H, a1 * gvy * inv_sqrt_h, mask=m2)
    tl.store(gvec_ptr + row + 2 * H, a1 * gvz * inv_sqrt_h, mask=m2)
    x2 = tl.load(xp_ptr + row + H, mask=m2, other=0.0)
    if NEED_GG:
        # Gradients of the gates W f + b, laid out as x_proj: row c H + h of chunk c.
        tl.store(gg_ptr + row, ga1 * x1 * inv_sqrt3, mask=m2)
        tl.store(gg_ptr + row + H, ga2 * x2 * inv_sqrt3, mask=m2)
        tl.store(gg_ptr + row + 2 * H, ga3 * tl.load(xp_ptr + row + 2 * H, mask=m2, other=0.0) * inv_sqrt3,
                 mask=m2)
    if NEED_GEOM:
        a2 = x2 * g2 * inv_sqrt3
        gdir_row = gdir_ptr + (n * num_hblocks + pid_h) * 3
        tl.store(gdir_row + 0, tl.sum(gvx * a2, axis=1) * inv_sqrt_h, mask=nm)
        tl.store(gdir_row + 1, tl.sum(gvy * a2, axis=1) * inv_sqrt_h, mask=nm)
        tl.store(gdir_row + 2, tl.sum(gvz * a2, axis=1) * inv_sqrt_h, mask=nm)


@triton.jit
def _lm_bwd_dist_kernel(
    w_ptr, slope_ptr, scal_ptr, gg_ptr, gdist_ptr,
    N, H3, R,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dL/dd of a tile of atoms: sum_k df/dd[n, k] G[n, k] with G = gg W (a GEMM over all 3H rows of
    W, in blocks of BLOCK_H), one K-loop over the centres; the gates' d-derivatives are never formed.
    The basis slope (cutoff * df/dd, stored by ``_lm_basis_kernel``) is divided by the cutoff once
    per atom."""
    pid_n = tl.program_id(0)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    nm = n < N
    cutoff = tl.load(scal_ptr + 1)
    dtype = w_ptr.dtype.element_ty
    gdist = tl.zeros([BLOCK_N], dtype=dtype)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        big_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=dtype)
        for r0 in range(0, H3, BLOCK_H):
            r = r0 + tl.arange(0, BLOCK_H)
            rm = r < H3
            gg = tl.load(gg_ptr + n[:, None] * H3 + r[None, :], mask=nm[:, None] & rm[None, :], other=0.0)
            wt = tl.load(w_ptr + r[:, None] * R + k[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            big_g = tl.dot(gg, wt, big_g, input_precision=PRECISION, out_dtype=dtype)
        gdist += tl.sum(_basis_block(slope_ptr, n, nm, k, km, R) * big_g, axis=1)
    tl.store(gdist_ptr + n, gdist / cutoff, mask=nm)


@triton.jit
def _lm_bwd_weight_kernel(
    f_ptr, gg_ptr, gw_ptr,
    N, H3, R, tiles_per_program,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """dL/dW partial: rows ``BLOCK_H`` of W (over all three chunks), centres ``BLOCK_K``, summed
    over a run of ``tiles_per_program`` atom tiles as gg^T f in a register accumulator; one store
    into this run's slice of the partial."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    r = pid_r * BLOCK_H + tl.arange(0, BLOCK_H)
    rm = r < H3
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < R
    acc = tl.zeros([BLOCK_H, BLOCK_K], dtype=gg_ptr.dtype.element_ty)
    for t in range(0, tiles_per_program):
        n = ((pid_s * tiles_per_program + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        nm = n < N
        f = _basis_block(f_ptr, n, nm, k, km, R)
        gg = tl.load(gg_ptr + n[:, None] * H3 + r[None, :], mask=nm[:, None] & rm[None, :], other=0.0)
        acc = tl.dot(tl.trans(gg), f, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    tl.store(gw_ptr + (pid_s.to(tl.int64) * H3 + r)[:, None] * R + k[None, :], acc, mask=rm[:, None] & km[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KernelConfig(GateConfig):
    """Tile sizes and launch parameters; ``None`` fields are chosen from the problem and device.

    block_n: atoms per tile (>= 16; the M side of the gate GEMMs, >= 64 lets tf32/tf32x3 use
    wgmma on sm_90). bwd_tiles_per_program: atom tiles summed in turn by one program of the
    W-gradient kernel (each run of tiles writes one (3H, R) partial). block_h (channels per
    program; rows of W per program of the W-gradient kernel), block_k, num_warps, num_stages,
    input_precision: see :class:`~e3relax_fast.kernels.utils.GateConfig`. One configuration serves
    the forward and the three backward kernels (the basis kernel has tiles of its own).
    """

    block_n: int | None = None
    bwd_tiles_per_program: int | None = None


def gpu_tiles(dtype: torch.dtype, hidden: int) -> dict:
    """Default GPU tiles. Chosen from sm_90 ahead-of-time compiles at H=512, R=128 under Triton
    3.6 and 3.9 (ptxas), not from timings (no GPU was available when they were picked): with
    these, no kernel spills at float32 (ieee, tf32 and tf32x3) or float64, and with tf32/tf32x3
    the forward, backward and dL/dd kernels use wgmma. Larger tiles (block_h 64 at float32, 32 at
    float64) or 4 warps spilled, and at float64 2 stages left 8 bytes of local memory in the
    paper-form W-gradient kernel under 3.6 (measured while the kernels still evaluated the basis
    themselves; reading it from the basis buffer, none spills with these tiles at 2 or 3 stages).
    :func:`tuning_configs` lists the candidates to sweep on hardware."""
    if dtype == torch.float64:
        tiles = dict(block_n=64, block_h=16, block_k=16, num_warps=8, num_stages=3)
    else:
        tiles = dict(block_n=64, block_h=32, block_k=32, num_warps=8, num_stages=3)
    tiles["block_h"] = min(tiles["block_h"], max(16, triton.next_power_of_2(hidden)))
    return tiles


def tuning_configs(dtype: torch.dtype = torch.float32) -> list[KernelConfig]:
    """Candidate configurations to sweep on hardware (``lattice_message(..., config=c)`` for each;
    the defaults of :func:`gpu_tiles` come first, ``bwd_tiles_per_program`` is left to the
    device). The interpreter and the AOT tests use one fixed configuration; no entry here has been
    timed yet, and some spill (check with :func:`aot_compile` before timing)."""
    fp32 = dtype == torch.float32
    out = [KernelConfig(**gpu_tiles(dtype, 512))]
    for block_n in (64, 128) if fp32 else (32, 64):
        for block_h in (32, 64) if fp32 else (16, 32):
            for block_k in (16, 32):
                for num_warps in (4, 8):
                    for num_stages in (2, 3):
                        cfg = KernelConfig(block_n=block_n, block_h=block_h, block_k=block_k, num_warps=num_warps,
                                           num_stages=num_stages)
                        if cfg not in out:
                            out.append(cfg)
    if fp32:
        out += [KernelConfig(**{**gpu_tiles(dtype, 512), "input_precision": p}) for p in ("tf32x3", "tf32")]
    return out


def _resolve_config(cfg: KernelConfig | None, n: int, h: int, r: int, dtype: torch.dtype,
                    device) -> KernelConfig:
    cfg = cfg or KernelConfig()
    if interpreting() or device.type != "cuda":
        # The interpreter pays ~1 ms per program and per interpreted op: few programs, big tiles.
        block_n = cfg.block_n or min(64, max(16, triton.next_power_of_2(n)))
        defaults = dict(block_n=block_n, block_h=min(128, max(16, triton.next_power_of_2(h))),
                        block_k=max(16, triton.next_power_of_2(r)),
                        bwd_tiles_per_program=max(1, triton.cdiv(n, block_n)), num_warps=4, num_stages=1)
    else:
        defaults = gpu_tiles(dtype, h)
        tiles = triton.cdiv(n, cfg.block_n or defaults["block_n"])
        blocks = triton.cdiv(3 * h, cfg.block_h or defaults["block_h"]) * triton.cdiv(r, cfg.block_k or
                                                                                    defaults["block_k"])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # W-gradient kernel: about four programs per SM, each over a run of atom tiles, so the
        # partials (one (3H, R) slice per run) stay few.
        runs = max(1, (4 * sms) // blocks)
        defaults["bwd_tiles_per_program"] = max(1, triton.cdiv(tiles, runs))
    return cfg.with_defaults(defaults)


# Tiles of the basis kernel (rows of atoms, centres per step): small row tiles, so that a part-filled
# last tile evaluates few masked exponentials.
BASIS_BLOCK_N = 16
BASIS_BLOCK_K = 64
BASIS_NUM_WARPS = 4


def _basis(positions, cells, centres, graph_index, k: int, mu, scal, with_slope: bool):
    """The basis f (N, R) of every atom for lattice node ``k`` and, ``with_slope``, its slope
    cutoff * df/dd (N, R), else None: one launch of ``_lm_basis_kernel``."""
    n, r = positions.shape[0], mu.shape[0]
    f = alloc((n, r), positions)
    slope = alloc((n, r), positions) if with_slope else None
    _lm_basis_kernel[(triton.cdiv(n, BASIS_BLOCK_N),)](
        positions, cells, positions if centres is None else centres, graph_index, mu, scal, f,
        f if slope is None else slope, n, r, k, CENTRED=centres is not None, WITH_SLOPE=with_slope,
        BLOCK_N=BASIS_BLOCK_N, BLOCK_K=min(BASIS_BLOCK_K, max(16, triton.next_power_of_2(r))),
        num_warps=BASIS_NUM_WARPS, num_stages=1)
    return f, slope


def _forward(x_proj, vec, positions, cells, centres, graph_index, k, edge_weight, edge_bias, mu, scal,
             cfg: KernelConfig):
    n, h = vec.shape[0], vec.shape[2]
    ds = alloc((n, h), x_proj)
    v_out = alloc((n, 3, h), x_proj)
    if n == 0:
        return ds, v_out
    f, _ = _basis(positions, cells, centres, graph_index, k, mu, scal, False)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(h, cfg.block_h))
    _lm_fwd_kernel[grid](
        x_proj, vec, positions, cells, positions if centres is None else centres, graph_index, edge_weight,
        edge_bias, f, scal, ds, v_out, n, h, mu.shape[0], k,
        CENTRED=centres is not None, BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return ds, v_out


def _backward_kernels(gds, gvo, saved, centres, k: int, need_gg: bool, need_w: bool, need_geom: bool,
                      cfg: KernelConfig):
    """Launch the backward kernels. Returns d x_proj, d vec, the gate gradients gg ((N, 3H) or
    None), the dL/dW partials ((runs, 3H, R) or None), dL/dd ((N,) or None) and the dL/dw partials
    ((N, channel blocks, 3) or None)."""
    x_proj, vec, positions, cells, _, graph_index, edge_weight, edge_bias, mu, scal = saved
    n, h = vec.shape[0], vec.shape[2]
    r = mu.shape[0]
    n_hb = triton.cdiv(h, cfg.block_h)
    tiles = triton.cdiv(n, cfg.block_n)
    cen = positions if centres is None else centres
    f, slope = _basis(positions, cells, centres, graph_index, k, mu, scal, need_geom)
    tiling = dict(BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, PRECISION=cfg.input_precision,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    gxp = alloc((n, 3 * h), x_proj)
    gvec = alloc((n, 3, h), x_proj)
    gg = alloc((n, 3 * h), x_proj) if need_gg else x_proj.new_empty(0)
    gdir = alloc((n, n_hb, 3), x_proj) if need_geom else x_proj.new_empty(0)
    _lm_bwd_kernel[(tiles, n_hb)](
        x_proj, vec, positions, cells, cen, graph_index, edge_weight, edge_bias, f, scal, gds, gvo,
        gxp, gvec, gg, gdir, n, h, r, k, n_hb, CENTRED=centres is not None, NEED_GG=need_gg, NEED_GEOM=need_geom,
        **tiling)
    gdist = gw = None
    if need_geom:
        gdist = alloc((n,), x_proj)
        _lm_bwd_dist_kernel[(tiles,)](edge_weight, slope, scal, gg, gdist, n, 3 * h, r, **tiling)
    if need_w:
        tpp = cfg.bwd_tiles_per_program
        runs = triton.cdiv(tiles, tpp)
        gw = alloc((runs, 3 * h, r), x_proj)
        grid = (triton.cdiv(3 * h, cfg.block_h), triton.cdiv(r, cfg.block_k), runs)
        _lm_bwd_weight_kernel[grid](f, gg, gw, n, 3 * h, r, tpp, **tiling)
    return gxp, gvec, (gg if need_gg else None), gw, gdist, (gdir if need_geom else None)


def _backward(gds, gvo, saved, centred: bool, k: int, need, cfg: KernelConfig):
    x_proj, vec, positions, cells, centres, graph_index, edge_weight, edge_bias, _, _ = saved
    if not centred:
        centres = None
    need_xp, need_vec, need_pos, need_cell, need_cen, need_w, need_b = need
    if vec.shape[0] == 0:
        return (x_proj.new_zeros(x_proj.shape), vec.new_zeros(vec.shape), torch.zeros_like(positions),
                torch.zeros_like(cells), None if centres is None else torch.zeros_like(centres),
                torch.zeros_like(edge_weight), torch.zeros_like(edge_bias))
    need_geom = need_pos or need_cell or need_cen
    gxp, gvec, gg, gw_part, gdist, gdir_part = _backward_kernels(
        gds, gvo, saved, centres, k, need_geom or need_w or need_b, need_w, need_geom, cfg)
    g_w = gw_part.sum(0) if need_w else None
    g_b = gg.sum(0) if need_b else None
    g_pos = g_cell = g_cen = None
    if need_geom:
        # dL/dd and dL/dw -> dL/dq (d = sqrt(max(|q|^2, eps)), w = -q/d), from the same q as the kernel.
        # q = C_g[k] - (p - c_g) is written out here rather than taken from the shared geometry
        # (geometry.lattice_vectors, which the reference uses), so that the gradient check against
        # the reference compares two independent implementations of it.
        p = positions if centres is None else positions - centres[graph_index]
        q = cells[graph_index, k] - p
        qq = (q * q).sum(-1)
        d = torch.sqrt(torch.clamp(qq, min=EPS))
        gdir = gdir_part.sum(1)
        gd = gdist + (gdir * q).sum(-1) / (d * d)
        gq = -gdir / d.unsqueeze(-1) + torch.where(qq >= EPS, gd / d, 0.0).unsqueeze(-1) * q
        if need_pos:
            g_pos = -gq  # q = C_g[k] - (p - c_g): one q per atom, no scatter
        if need_cell:
            g_cell = torch.zeros_like(cells)
            g_cell[:, k].index_add_(0, graph_index, gq)
        if need_cen:
            g_cen = torch.zeros_like(centres).index_add_(0, graph_index, gq)
    return (gxp if need_xp else None), (gvec if need_vec else None), g_pos, g_cell, g_cen, g_w, g_b


class _FusedLatticeMessage(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_proj, vec, positions, cells, centres, edge_weight, edge_bias, graph_index, k, mu, scal,
                cfg):
        ds, v_out = _forward(x_proj, vec, positions, cells, centres, graph_index, k, edge_weight, edge_bias, mu,
                             scal, cfg)
        ctx.save_for_backward(x_proj, vec, positions, cells, centres, graph_index, edge_weight, edge_bias, mu,
                              scal)
        ctx.centred, ctx.k, ctx.cfg = centres is not None, k, cfg
        return ds, v_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gds, gvo):
        need = ctx.needs_input_grad[:7]
        grads = _backward(gds.contiguous(), gvo.contiguous(), ctx.saved_tensors, ctx.centred, ctx.k, need,
                          ctx.cfg)
        return (*grads, None, None, None, None, None)


def lattice_message(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    graph_index: Tensor,
    centres: Tensor | None,
    k: int,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
    *,
    config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused Triton twin of :func:`e3relax_fast.reference.lattice_message.lattice_message`.

    Same arguments and result (``ds (N, H)``, ``v_out (N, 3, H)``), differentiable with respect to
    x_proj, vec, positions, cells, centres (when given), edge_weight and edge_bias.

    Args:
        config: optional :class:`KernelConfig` (tile sizes, warps, ``input_precision``), for
            benchmarks and tuning; defaults depend on device, dtype and H.

    All floating inputs must share one dtype (float32 or float64) and live on one device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``); ``graph_index`` is read as int64, ``rbf_centres`` in the
    working dtype. No host synchronisation.
    """
    dtype = x_proj.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton lattice_message supports float32 and float64, got {dtype}")
    named = [("vec", vec), ("positions", positions), ("cells", cells), ("edge_weight", edge_weight),
             ("edge_bias", edge_bias)]
    if centres is not None:
        named.append(("centres", centres))
    for name, t in named:
        if t.dtype != dtype:
            raise TypeError(f"triton lattice_message: {name} is {t.dtype}, x_proj is {dtype}")
    n, h = vec.shape[0], vec.shape[2]
    g = cells.shape[0]
    if x_proj.shape != (n, 3 * h) or positions.shape != (n, 3) or graph_index.shape != (n,) \
            or cells.shape != (g, 3, 3) or (centres is not None and centres.shape != (g, 3)):
        raise ValueError(f"shapes: x_proj {tuple(x_proj.shape)}, vec {tuple(vec.shape)}, positions "
                         f"{tuple(positions.shape)}, graph_index {tuple(graph_index.shape)}, cells "
                         f"{tuple(cells.shape)}, centres {None if centres is None else tuple(centres.shape)}; "
                         "expected (N, 3H), (N, 3, H), (N, 3), (N,), (G, 3, 3), (G, 3) or None")
    if edge_weight.shape != (3 * h, rbf_centres.shape[0]) or edge_bias.shape != (3 * h,):
        raise ValueError(f"edge_weight must be (3H, R) = ({3 * h}, {rbf_centres.shape[0]}) and edge_bias (3H,), "
                         f"got {tuple(edge_weight.shape)} and {tuple(edge_bias.shape)}")
    if k not in (0, 1, 2):
        raise ValueError(f"lattice node k must be 0, 1 or 2, got {k!r}")
    cfg = _resolve_config(config, n, h, rbf_centres.shape[0], dtype, x_proj.device)
    cfg.check(dtype, "block_n")
    return _FusedLatticeMessage.apply(
        x_proj.contiguous(), vec.contiguous(), positions.contiguous(), cells.contiguous(),
        None if centres is None else centres.contiguous(), edge_weight.contiguous(), edge_bias.contiguous(),
        graph_index.to(torch.int64).contiguous(), int(k), rbf_centres.to(dtype).contiguous(),
        scalars(rbf_coeff, cutoff, h, x_proj), cfg,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): catches errors the interpreter hides.
# ---------------------------------------------------------------------------------------------
def aot_compile(dtype: torch.dtype = torch.float32, hidden: int = 512, num_rbf: int = 128,
                arch: int = 90, config: KernelConfig | None = None, centred: bool = True,
                kernels: tuple[str, ...] = ("basis", "basis_slope", "fwd", "bwd", "bwd_dist", "bwd_weight")) -> dict:
    """Compile the basis kernel (``"basis"``: f only, as the forward launches it; ``"basis_slope"``:
    f and its slope, as the backward does), the forward (``"fwd"``) and backward kernels (``"bwd"``
    with every gradient term, ``"bwd_dist"``, ``"bwd_weight"``) for ``sm_{arch}`` without a device,
    with the tiles the GPU defaults would use (or ``config``'s); ``centred`` selects the
    default-mode (True) or paper form of the geometry.

    Returns ``{kernel name: compiled kernel}`` (``.asm`` holds ``ttgir``/``ptx``/``cubin``).
    """
    tiles = (config or KernelConfig()).with_defaults(gpu_tiles(dtype, hidden))
    fp = "*fp32" if dtype == torch.float32 else "*fp64"
    tiling = {"BLOCK_N": tiles.block_n, "BLOCK_H": tiles.block_h, "BLOCK_K": tiles.block_k,
              "PRECISION": tiles.input_precision}
    geom = {"pos_ptr": fp, "cell_ptr": fp, "cen_ptr": fp, "gi_ptr": "*i64", "scal_ptr": fp, "N": "i32", "R": "i32",
            "K": "i32"}
    common = {**geom, "xp_ptr": fp, "vec_ptr": fp, "w_ptr": fp, "b_ptr": fp, "f_ptr": fp, "H": "i32"}
    reduce = {"scal_ptr": fp, "gg_ptr": fp, "N": "i32", "H3": "i32", "R": "i32"}
    basis = {**geom, "mu_ptr": fp, "f_ptr": fp, "slope_ptr": fp}
    basis_tiles = {"CENTRED": centred, "BLOCK_N": BASIS_BLOCK_N, "BLOCK_K": min(BASIS_BLOCK_K, max(16, num_rbf))}
    # (kernel, runtime types, constexprs, warps, stages)
    signatures = {
        "basis": (_lm_basis_kernel, basis, {**basis_tiles, "WITH_SLOPE": False}, BASIS_NUM_WARPS, 1),
        "basis_slope": (_lm_basis_kernel, basis, {**basis_tiles, "WITH_SLOPE": True}, BASIS_NUM_WARPS, 1),
        "fwd": (_lm_fwd_kernel, {**common, "ds_ptr": fp, "vo_ptr": fp}, {**tiling, "CENTRED": centred},
                tiles.num_warps, tiles.num_stages),
        "bwd": (_lm_bwd_kernel, {**common, "gds_ptr": fp, "gvo_ptr": fp, "gxp_ptr": fp, "gvec_ptr": fp, "gg_ptr": fp,
                                 "gdir_ptr": fp, "num_hblocks": "i32"},
                {**tiling, "CENTRED": centred, "NEED_GG": True, "NEED_GEOM": True}, tiles.num_warps, tiles.num_stages),
        "bwd_dist": (_lm_bwd_dist_kernel, {**reduce, "w_ptr": fp, "slope_ptr": fp, "gdist_ptr": fp}, tiling,
                     tiles.num_warps, tiles.num_stages),
        "bwd_weight": (_lm_bwd_weight_kernel, {**reduce, "f_ptr": fp, "gw_ptr": fp, "tiles_per_program": "i32"},
                       tiling, tiles.num_warps, tiles.num_stages),
    }
    return {name: compile_for_gpu(fn, types, consts, arch, warps, stages)
            for name, (fn, types, consts, warps, stages) in signatures.items() if name in kernels}
