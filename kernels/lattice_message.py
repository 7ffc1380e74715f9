"""Fused lattice -> atom message of one lattice node in Triton (spec §6 Step 0, Step A.1–3),
forward and backward.

Twin of :func:`e3relax_fast.reference.lattice_message.lattice_message`, same arguments. For atom
i of crystal g and lattice node k:

    q_i = C_g[k] - (p_i - c_g)   (c_g = centres[g]; absent in the paper form)          (3,) Å
    d_i = sqrt(max(|q_i|^2, eps)),  w_i = -q_i / d_i
    f_i = env(d_i / cutoff) * exp(coeff * (d_i / cutoff - mu)^2)                         (R,)
    [a1|a2|a3]_i = x_proj_i * (W f_i + b) / sqrt(3)                                      (3H,)
    ds_i = a3,  v_out_i = (a1 * vec_i + w_i (x) a2) / sqrt(H)

Forward (``_lm_fwd_kernel``): grid ``(atom tiles, channel blocks)``. A program owns ``block_n``
consecutive atoms and ``block_h`` channels of each of the three chunks. It computes the atoms'
geometry in registers, then one K-loop over the R centres (steps of ``block_k``) evaluates the
basis tile (block_n x block_k) once and feeds three ``tl.dot`` with the rows of W of the three
chunks. Gates, ``ds`` and ``v_out`` follow in registers: one plain store per output element, no
atomics, nothing of size N x R in memory.

Backward (``_lm_bwd_kernel``): grid ``(atom-tile runs, channel blocks)``; a program handles
``bwd_tiles_per_program`` consecutive atom tiles in turn. Per tile it recomputes the geometry, the
basis, its d-derivative and the three gates (six K-loop GEMMs), reads the upstream gradients and
produces

* d x_proj and d vec of its atoms and channels (one store each);
* per-(atom, channel block) partials of dL/dd and dL/dw, summed over the channel blocks afterwards
  in fixed order;
* d b and d W for its channel block: a third GEMM per chunk, ggate^T f, accumulated over the
  program's tiles into a slice of a zeroed per-program partial that only this program touches,
  summed afterwards in fixed order.

A short PyTorch epilogue turns dL/dd and dL/dw into dL/dq. Each atom has exactly one q, so
dL/dp = -dL/dq needs no scatter; dL/dC_g[k] and dL/dc_g are ``index_add_`` over the atoms of each
crystal, the only non-deterministic part on CUDA (atomic float adds, ulp-level run-to-run
differences; deterministic under ``torch.use_deterministic_algorithms``). The backward is
first-order only (``once_differentiable``).

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
def _three_gates(x, env, denv, nm, w_ptr, mu_ptr, h, hm, H, R, coeff, cutoff,
                 WITH_DERIVATIVE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(tile_n, tile_h) gates W[c H + h] f(d) (no bias) of the three chunks c and, optionally,
    their d-derivatives. One K-loop: each basis tile is computed once and used by all chunks."""
    dtype = w_ptr.dtype.element_ty
    g1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    g2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    g3 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    dg1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    dg2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    dg3 = tl.zeros([BLOCK_N, BLOCK_H], dtype=dtype)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        f, df = basis_tile(x, env, denv, nm, mu_ptr, k, km, coeff, cutoff, WITH_DERIVATIVE)
        wm = hm[:, None] & km[None, :]
        wrow = w_ptr + h[:, None] * R + k[None, :]
        w1 = tl.trans(tl.load(wrow, mask=wm, other=0.0))
        w2 = tl.trans(tl.load(wrow + H * R, mask=wm, other=0.0))
        w3 = tl.trans(tl.load(wrow + 2 * H * R, mask=wm, other=0.0))
        g1 = tl.dot(f, w1, g1, input_precision=PRECISION, out_dtype=dtype)
        g2 = tl.dot(f, w2, g2, input_precision=PRECISION, out_dtype=dtype)
        g3 = tl.dot(f, w3, g3, input_precision=PRECISION, out_dtype=dtype)
        if WITH_DERIVATIVE:
            dg1 = tl.dot(df, w1, dg1, input_precision=PRECISION, out_dtype=dtype)
            dg2 = tl.dot(df, w2, dg2, input_precision=PRECISION, out_dtype=dtype)
            dg3 = tl.dot(df, w3, dg3, input_precision=PRECISION, out_dtype=dtype)
    return g1, g2, g3, dg1, dg2, dg3


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _lm_fwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, cen_ptr, gi_ptr, w_ptr, b_ptr, mu_ptr, scal_ptr,
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
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H

    qx, qy, qz, _, d = _lattice_geometry(pos_ptr, cell_ptr, cen_ptr, gi_ptr, n, nm, K, eps, CENTRED)
    x, env, _ = envelope(d, cutoff, False)
    g1, g2, g3, _, _, _ = _three_gates(x, env, env, nm, w_ptr, mu_ptr, h, hm, H, R, coeff, cutoff, False,
                                       BLOCK_N, BLOCK_H, BLOCK_K, PRECISION)
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
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _accumulate_weight_grad(gw_rows, gg, x, env, nm, mu_ptr, hm, R, coeff, cutoff,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """dW[rows, :] += gg^T f(d): read-modify-write of the calling program's own partial rows."""
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        f, _ = basis_tile(x, env, env, nm, mu_ptr, k, km, coeff, cutoff, False)
        wm = hm[:, None] & km[None, :]
        gw = tl.load(gw_rows[:, None] + k[None, :], mask=wm, other=0.0)
        gw = tl.dot(tl.trans(gg), f, gw, input_precision=PRECISION, out_dtype=gw.dtype)
        tl.store(gw_rows[:, None] + k[None, :], gw, mask=wm)


@triton.jit
def _lm_bwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, cen_ptr, gi_ptr, w_ptr, b_ptr, mu_ptr, scal_ptr,
    gds_ptr, gvo_ptr,
    gxp_ptr, gvec_ptr, gw_ptr, gb_ptr, gdist_ptr, gdir_ptr,
    N, H, R, K, tiles_per_program, num_hblocks,
    CENTRED: tl.constexpr, NEED_W: tl.constexpr, NEED_GEOM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H
    bias1, bias2, bias3 = chunk_biases(b_ptr, h, hm, H)
    zero_h = tl.zeros([BLOCK_H], dtype=xp_ptr.dtype.element_ty)
    acc_gb1 = zero_h
    acc_gb2 = zero_h
    acc_gb3 = zero_h
    gw_rows = gw_ptr + (pid_n.to(tl.int64) * H3 + h) * R  # this program's W-gradient partial, chunk 1

    for t in range(0, tiles_per_program):
        n = ((pid_n * tiles_per_program + t) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        nm = n < N
        m2 = nm[:, None] & hm[None, :]
        qx, qy, qz, _, d = _lattice_geometry(pos_ptr, cell_ptr, cen_ptr, gi_ptr, n, nm, K, eps, CENTRED)
        x, env, denv = envelope(d, cutoff, NEED_GEOM)
        g1, g2, g3, dg1, dg2, dg3 = _three_gates(x, env, denv, nm, w_ptr, mu_ptr, h, hm, H, R, coeff, cutoff,
                                                 NEED_GEOM, BLOCK_N, BLOCK_H, BLOCK_K, PRECISION)
        g1 = g1 + bias1[None, :]
        g2 = g2 + bias2[None, :]
        g3 = g3 + bias3[None, :]
        row = n[:, None] * H3 + h[None, :]
        x1 = tl.load(xp_ptr + row, mask=m2, other=0.0)
        x2 = tl.load(xp_ptr + row + H, mask=m2, other=0.0)
        x3 = tl.load(xp_ptr + row + 2 * H, mask=m2, other=0.0)
        gvx = tl.load(gvo_ptr + row, mask=m2, other=0.0)
        gvy = tl.load(gvo_ptr + row + H, mask=m2, other=0.0)
        gvz = tl.load(gvo_ptr + row + 2 * H, mask=m2, other=0.0)
        wx = -qx / d
        wy = -qy / d
        wz = -qz / d
        # Upstream gradients of the three gated chunks a1, a2, a3.
        ga1 = (gvx * tl.load(vec_ptr + row, mask=m2, other=0.0) + gvy * tl.load(vec_ptr + row + H, mask=m2, other=0.0)
               + gvz * tl.load(vec_ptr + row + 2 * H, mask=m2, other=0.0)) * inv_sqrt_h
        ga2 = (gvx * wx[:, None] + gvy * wy[:, None] + gvz * wz[:, None]) * inv_sqrt_h
        ga3 = tl.load(gds_ptr + n[:, None] * H + h[None, :], mask=m2, other=0.0)
        tl.store(gxp_ptr + row, ga1 * g1 * inv_sqrt3, mask=m2)
        tl.store(gxp_ptr + row + H, ga2 * g2 * inv_sqrt3, mask=m2)
        tl.store(gxp_ptr + row + 2 * H, ga3 * g3 * inv_sqrt3, mask=m2)
        a1 = x1 * g1 * inv_sqrt3
        tl.store(gvec_ptr + row, a1 * gvx * inv_sqrt_h, mask=m2)
        tl.store(gvec_ptr + row + H, a1 * gvy * inv_sqrt_h, mask=m2)
        tl.store(gvec_ptr + row + 2 * H, a1 * gvz * inv_sqrt_h, mask=m2)
        # Gradients of the gates W f + b (zero outside the tile, so the W/b sums ignore padding).
        gg1 = tl.where(m2, ga1 * x1 * inv_sqrt3, 0.0)
        gg2 = tl.where(m2, ga2 * x2 * inv_sqrt3, 0.0)
        gg3 = tl.where(m2, ga3 * x3 * inv_sqrt3, 0.0)
        if NEED_GEOM:
            tl.store(gdist_ptr + n * num_hblocks + pid_h, tl.sum(gg1 * dg1 + gg2 * dg2 + gg3 * dg3, axis=1),
                     mask=nm)
            a2 = x2 * g2 * inv_sqrt3
            gdir_row = gdir_ptr + (n * num_hblocks + pid_h) * 3
            tl.store(gdir_row + 0, tl.sum(gvx * a2, axis=1) * inv_sqrt_h, mask=nm)
            tl.store(gdir_row + 1, tl.sum(gvy * a2, axis=1) * inv_sqrt_h, mask=nm)
            tl.store(gdir_row + 2, tl.sum(gvz * a2, axis=1) * inv_sqrt_h, mask=nm)
        if NEED_W:
            acc_gb1 += tl.sum(gg1, axis=0)
            acc_gb2 += tl.sum(gg2, axis=0)
            acc_gb3 += tl.sum(gg3, axis=0)
            _accumulate_weight_grad(gw_rows, gg1, x, env, nm, mu_ptr, hm, R, coeff, cutoff, BLOCK_K, PRECISION)
            _accumulate_weight_grad(gw_rows + H * R, gg2, x, env, nm, mu_ptr, hm, R, coeff, cutoff, BLOCK_K,
                                    PRECISION)
            _accumulate_weight_grad(gw_rows + 2 * H * R, gg3, x, env, nm, mu_ptr, hm, R, coeff, cutoff, BLOCK_K,
                                    PRECISION)
    if NEED_W:
        gb_row = gb_ptr + pid_n * H3 + h
        tl.store(gb_row, acc_gb1, mask=hm)
        tl.store(gb_row + H, acc_gb2, mask=hm)
        tl.store(gb_row + 2 * H, acc_gb3, mask=hm)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KernelConfig(GateConfig):
    """Tile sizes and launch parameters; ``None`` fields are chosen from the problem and device.

    block_n: atoms per tile (>= 16, the M side of the gate GEMM). bwd_tiles_per_program: atom
    tiles handled in turn by one backward program (each program keeps one (3H, R) W-gradient
    partial). block_h, block_k, num_warps, num_stages, input_precision: see
    :class:`~e3relax_fast.kernels.utils.GateConfig`.
    """

    block_n: int | None = None
    bwd_tiles_per_program: int | None = None


def gpu_tiles(dtype: torch.dtype, hidden: int) -> dict:
    """Default GPU tiles. Chosen from sm_90 ahead-of-time compiles at H=512, R=128, not from
    timings (no GPU was available when they were picked): with these, ptxas reports no spills
    (float32: 110 registers forward, 239 backward; float64: 128 and 255), while 4 warps or larger
    tiles spilled in the backward."""
    if dtype == torch.float64:
        tiles = dict(block_n=32, block_h=16, block_k=16, num_warps=8, num_stages=1)
    else:
        tiles = dict(block_n=32, block_h=32, block_k=16, num_warps=8, num_stages=1)
    tiles["block_h"] = min(tiles["block_h"], max(16, triton.next_power_of_2(hidden)))
    return tiles


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
        n_hb = triton.cdiv(h, cfg.block_h or defaults["block_h"])
        tiles = triton.cdiv(n, cfg.block_n or defaults["block_n"])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # Backward: about four programs per SM, each over a run of atom tiles, so the W-gradient
        # partials (one (3H, R) slice per program) stay small.
        blocks = max(1, (4 * sms) // n_hb)
        defaults["bwd_tiles_per_program"] = max(1, triton.cdiv(tiles, blocks))
    return cfg.with_defaults(defaults)


def _forward(x_proj, vec, positions, cells, centres, graph_index, k, edge_weight, edge_bias, mu, scal,
             cfg: KernelConfig):
    n, h = vec.shape[0], vec.shape[2]
    ds = alloc((n, h), x_proj)
    v_out = alloc((n, 3, h), x_proj)
    if n == 0:
        return ds, v_out
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(h, cfg.block_h))
    _lm_fwd_kernel[grid](
        x_proj, vec, positions, cells, positions if centres is None else centres, graph_index, edge_weight,
        edge_bias, mu, scal, ds, v_out, n, h, mu.shape[0], k,
        CENTRED=centres is not None, BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return ds, v_out


def _backward(gds, gvo, saved, centred: bool, k: int, need, cfg: KernelConfig):
    x_proj, vec, positions, cells, centres, graph_index, edge_weight, edge_bias, mu, scal = saved
    if not centred:
        centres = None
    need_xp, need_vec, need_pos, need_cell, need_cen, need_w, need_b = need
    n, h = vec.shape[0], vec.shape[2]
    r = mu.shape[0]
    if n == 0:
        return (x_proj.new_zeros(x_proj.shape), vec.new_zeros(vec.shape), torch.zeros_like(positions),
                torch.zeros_like(cells), None if centres is None else torch.zeros_like(centres),
                torch.zeros_like(edge_weight), torch.zeros_like(edge_bias))
    need_geom = need_pos or need_cell or need_cen
    need_wb = need_w or need_b
    n_hb = triton.cdiv(h, cfg.block_h)
    tpp = cfg.bwd_tiles_per_program
    n_prog = triton.cdiv(triton.cdiv(n, cfg.block_n), tpp)
    gxp = alloc((n, 3 * h), x_proj)
    gvec = alloc((n, 3, h), x_proj)
    # Accumulated in place by the kernel (each program owns one slice): must start at zero.
    gw_part = x_proj.new_zeros((n_prog, 3 * h, r)) if need_wb else x_proj.new_empty(0)
    gb_part = alloc((n_prog, 3 * h), x_proj) if need_wb else x_proj.new_empty(0)
    gdist_part = alloc((n, n_hb), x_proj) if need_geom else x_proj.new_empty(0)
    gdir_part = alloc((n, n_hb, 3), x_proj) if need_geom else x_proj.new_empty(0)
    _lm_bwd_kernel[(n_prog, n_hb)](
        x_proj, vec, positions, cells, positions if centres is None else centres, graph_index, edge_weight,
        edge_bias, mu, scal, gds, gvo, gxp, gvec, gw_part, gb_part, gdist_part, gdir_part,
        n, h, r, k, tpp, n_hb,
        CENTRED=centres is not None, NEED_W=need_wb, NEED_GEOM=need_geom,
        BLOCK_N=cfg.block_n, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    g_w = gw_part.sum(0) if need_w else None
    g_b = gb_part.sum(0) if need_b else None
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
        gd = gdist_part.sum(1) + (gdir * q).sum(-1) / (d * d)
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
                kernels: tuple[str, ...] = ("fwd", "bwd")) -> dict:
    """Compile the forward (``"fwd"``) and backward (``"bwd"``, with every gradient term) kernels
    for ``sm_{arch}`` without a device, with the tiles the GPU defaults would use; ``centred``
    selects the default-mode (True) or paper form of the geometry.

    Returns ``{kernel name: compiled kernel}`` (``.asm`` holds ``ttgir``/``ptx``/``cubin``).
    """
    tiles = (config or KernelConfig()).with_defaults(gpu_tiles(dtype, hidden))
    fp = "*fp32" if dtype == torch.float32 else "*fp64"
    consts = {"CENTRED": centred, "BLOCK_N": tiles.block_n, "BLOCK_H": tiles.block_h, "BLOCK_K": tiles.block_k,
              "PRECISION": tiles.input_precision}
    common = {"xp_ptr": fp, "vec_ptr": fp, "pos_ptr": fp, "cell_ptr": fp, "cen_ptr": fp, "gi_ptr": "*i64",
              "w_ptr": fp, "b_ptr": fp, "mu_ptr": fp, "scal_ptr": fp, "N": "i32", "H": "i32", "R": "i32", "K": "i32"}
    out = {}
    if "fwd" in kernels:
        types = {**common, "ds_ptr": fp, "vo_ptr": fp}
        out["fwd"] = compile_for_gpu(_lm_fwd_kernel, types, consts, arch, tiles.num_warps, tiles.num_stages)
    if "bwd" in kernels:
        types = {**common, "gds_ptr": fp, "gvo_ptr": fp, "gxp_ptr": fp, "gvec_ptr": fp, "gw_ptr": fp, "gb_ptr": fp,
                 "gdist_ptr": fp, "gdir_ptr": fp, "tiles_per_program": "i32", "num_hblocks": "i32"}
        out["bwd"] = compile_for_gpu(_lm_bwd_kernel, types, {**consts, "NEED_W": True, "NEED_GEOM": True}, arch,
                                     tiles.num_warps, tiles.num_stages)
    return out
