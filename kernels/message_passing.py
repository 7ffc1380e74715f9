"""Fused atom–atom message passing in Triton (spec §6 Step B), forward and backward.

Twin of :func:`e3relax_fast.reference.message_passing.message_passing`; same arguments plus the
receiver CSR ``rowptr`` (required here). For edge e = (j -> i) of crystal g:

    r_e = p_j + o_e C_g - p_i,  d_e = sqrt(max(|r_e|^2, eps)),  u_e = -r_e / d_e
    f_e = env(d_e / cutoff) * exp(coeff * (d_e / cutoff - mu)^2)                (R,)
    [b1|b2|b3]_e = x_proj[j] * (W f_e + b) / sqrt(3)                            (3H,)
    ds_i = sum_e b3_e,   dv_i = sum_e (b1_e * vec[j] + u_e (x) b2_e) / sqrt(H)

Forward (``_mp_fwd_kernel``): grid ``(receiver blocks, channel blocks)``. A program owns
``nodes_per_program`` consecutive receivers and ``block_h`` channels of each of the three chunks.
It walks each receiver's CSR slice ``rowptr[i]:rowptr[i+1]`` in tiles of ``block_e`` edges and
recomputes the geometry in registers. For each chunk, a K-loop over the R centres (steps of
``block_k``) evaluates the basis tile (block_e x block_k) in registers and accumulates the gate
tile with ``tl.dot`` against W; the gate then multiplies the gathered ``x_proj[j]`` (and
``vec[j]`` / u) and is summed over the tile's edges. One plain store per receiver and channel
block, no atomics: the forward is deterministic, and nothing of size E x 3H or E x R touches
memory. (The basis is recomputed once per chunk and channel block: ~3 R H / block_h exponentials
per edge, against 6 R H FLOP of gate GEMM.)

Backward (``_mp_bwd_kernel``): launched once per chunk c (constexpr), grid ``(source blocks,
channel blocks)``, walking each *source* atom's outgoing edges (a stable source-sorted permutation
built in the backward). Per edge tile it recomputes the geometry, the basis, its d-derivative and
the gate of chunk c (two K-loop GEMMs), reads the upstream gradient of each edge's receiver, and
produces

* d x_proj[j] and (c = 0) d vec[j], summed over j's outgoing edges in registers, one store each;
* d b and d W for its channel block (a third GEMM, ggate^T f), accumulated over all edges of the
  program into a slice of a zeroed per-program partial that only this program touches, summed
  afterwards in fixed order;
* per-edge partials of dL/dd (every chunk) and dL/du (c = 1), one column per program.

A short PyTorch epilogue turns dL/dd and dL/du into dL/dr and scatters it onto positions and cells
with ``index_add_``: that scatter is the only non-deterministic part on CUDA (atomic float adds,
ulp-level run-to-run differences; deterministic under ``torch.use_deterministic_algorithms``). The
backward is first-order only (``once_differentiable``).

Precision: float32 and float64. In float32 the dots use ``input_precision="ieee"`` by default (no
TF32; FMA units), so results match the reference to rounding; ``KernelConfig(input_precision=
"tf32x3" or "tf32")`` uses tensor cores (tf32: ~1e-3 relative error in the gates; neither is
tested here, the CPU interpreter ignores the setting). Float constants (coeff, cutoff,
1/sqrt(3), 1/sqrt(H), eps) reach the kernels through a small tensor in the working dtype, because a
Python float literal would be rounded to float32 inside the kernel.

The radial basis, its envelope and that constants tensor are shared with ``lattice_message``
(``basis.py``); the launch-configuration base and the ahead-of-time compile are in ``utils.py``.
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
def _edge_geometry(pos_ptr, cell_ptr, off_ptr, fx, fy, fz, other, g, e, em, eps,
                   SOURCE_FIXED: tl.constexpr):
    """Edge vectors r = p_j + o C_g - p_i of a tile of edges ``e`` (mask ``em``, crystals ``g``).

    SOURCE_FIXED: the tile shares its source (backward: f* is p_j, ``other`` holds the
    receivers); otherwise it shares its receiver (forward: f* is p_i, ``other`` holds the
    sources). Returns r (three vectors), |r|^2 and the safe norm d.
    """
    o0 = tl.load(off_ptr + e * 3 + 0, mask=em, other=0.0)
    o1 = tl.load(off_ptr + e * 3 + 1, mask=em, other=0.0)
    o2 = tl.load(off_ptr + e * 3 + 2, mask=em, other=0.0)
    cb = cell_ptr + g * 9
    sx = o0 * tl.load(cb + 0, mask=em, other=0.0) + o1 * tl.load(cb + 3, mask=em, other=0.0) \
        + o2 * tl.load(cb + 6, mask=em, other=0.0)
    sy = o0 * tl.load(cb + 1, mask=em, other=0.0) + o1 * tl.load(cb + 4, mask=em, other=0.0) \
        + o2 * tl.load(cb + 7, mask=em, other=0.0)
    sz = o0 * tl.load(cb + 2, mask=em, other=0.0) + o1 * tl.load(cb + 5, mask=em, other=0.0) \
        + o2 * tl.load(cb + 8, mask=em, other=0.0)
    ox = tl.load(pos_ptr + other * 3 + 0, mask=em, other=0.0)
    oy = tl.load(pos_ptr + other * 3 + 1, mask=em, other=0.0)
    oz = tl.load(pos_ptr + other * 3 + 2, mask=em, other=0.0)
    if SOURCE_FIXED:
        rx = (fx + sx) - ox
        ry = (fy + sy) - oy
        rz = (fz + sz) - oz
    else:
        rx = (ox + sx) - fx
        ry = (oy + sy) - fy
        rz = (oz + sz) - fz
    rr = rx * rx + ry * ry + rz * rz
    d = tl.sqrt(tl.maximum(rr, eps))
    return rx, ry, rz, rr, d


@triton.jit
def _gate_tile(x, env, denv, em, w_ptr, mu_ptr, rows, hm, R, coeff, cutoff,
               WITH_DERIVATIVE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """(tile_e, tile_h) gate W[rows] f(d) (no bias) and, optionally, its d-derivative
    W[rows] df/dd, with a K-loop over the R centres in steps of BLOCK_K."""
    dtype = w_ptr.dtype.element_ty
    gate = tl.zeros([BLOCK_E, BLOCK_H], dtype=dtype)
    dgate = tl.zeros([BLOCK_E, BLOCK_H], dtype=dtype)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        f, df = basis_tile(x, env, denv, em, mu_ptr, k, km, coeff, cutoff, WITH_DERIVATIVE)
        w = tl.load(w_ptr + rows[:, None] * R + k[None, :], mask=hm[:, None] & km[None, :], other=0.0)
        gate = tl.dot(f, tl.trans(w), gate, input_precision=PRECISION, out_dtype=dtype)
        if WITH_DERIVATIVE:
            dgate = tl.dot(df, tl.trans(w), dgate, input_precision=PRECISION, out_dtype=dtype)
    return gate, dgate


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mp_fwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, src_ptr, off_ptr, eg_ptr, w_ptr, b_ptr, mu_ptr, scal_ptr,
    rowptr_ptr, ds_ptr, dv_ptr,
    N, H, R, nodes_per_program,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H
    bias1, bias2, bias3 = chunk_biases(b_ptr, h, hm, H)
    zero_h = tl.zeros([BLOCK_H], dtype=xp_ptr.dtype.element_ty)

    for t in range(0, nodes_per_program):
        i = (pid_n * nodes_per_program + t).to(tl.int64)
        node_ok = i < N
        start = tl.load(rowptr_ptr + tl.minimum(i, N))
        end = tl.load(rowptr_ptr + tl.minimum(i + 1, N))
        pix = tl.load(pos_ptr + i * 3 + 0, mask=node_ok, other=0.0)
        piy = tl.load(pos_ptr + i * 3 + 1, mask=node_ok, other=0.0)
        piz = tl.load(pos_ptr + i * 3 + 2, mask=node_ok, other=0.0)
        acc_s = zero_h
        acc_x = zero_h
        acc_y = zero_h
        acc_z = zero_h
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            em = e < end
            j = tl.load(src_ptr + e, mask=em, other=0)
            g = tl.load(eg_ptr + e, mask=em, other=0)
            rx, ry, rz, rr, d = _edge_geometry(pos_ptr, cell_ptr, off_ptr, pix, piy, piz, j, g, e, em,
                                               eps, False)
            x, env, _ = envelope(d, cutoff, False)
            m2 = em[:, None] & hm[None, :]
            xrow = xp_ptr + j[:, None] * H3 + h[None, :]
            vrow = vec_ptr + j[:, None] * H3 + h[None, :]
            # chunk 1 gates vec[j]
            gate, _ = _gate_tile(x, env, env, em, w_ptr, mu_ptr, h, hm, R, coeff, cutoff, False,
                                 BLOCK_E, BLOCK_H, BLOCK_K, PRECISION)
            b1 = tl.load(xrow, mask=m2, other=0.0) * (gate + bias1[None, :]) * inv_sqrt3
            acc_x += tl.sum(b1 * tl.load(vrow, mask=m2, other=0.0), axis=0)
            acc_y += tl.sum(b1 * tl.load(vrow + H, mask=m2, other=0.0), axis=0)
            acc_z += tl.sum(b1 * tl.load(vrow + 2 * H, mask=m2, other=0.0), axis=0)
            # chunk 2 gates the unit vector u = -r / d
            gate, _ = _gate_tile(x, env, env, em, w_ptr, mu_ptr, H + h, hm, R, coeff, cutoff, False,
                                 BLOCK_E, BLOCK_H, BLOCK_K, PRECISION)
            b2 = tl.load(xrow + H, mask=m2, other=0.0) * (gate + bias2[None, :]) * inv_sqrt3
            acc_x += tl.sum((-rx / d)[:, None] * b2, axis=0)
            acc_y += tl.sum((-ry / d)[:, None] * b2, axis=0)
            acc_z += tl.sum((-rz / d)[:, None] * b2, axis=0)
            # chunk 3 is the scalar message
            gate, _ = _gate_tile(x, env, env, em, w_ptr, mu_ptr, 2 * H + h, hm, R, coeff, cutoff, False,
                                 BLOCK_E, BLOCK_H, BLOCK_K, PRECISION)
            b3 = tl.load(xrow + 2 * H, mask=m2, other=0.0) * (gate + bias3[None, :]) * inv_sqrt3
            acc_s += tl.sum(b3, axis=0)
        om = h < tl.where(node_ok, H, 0)  # (a scalar & block mask trips the interpreter)
        tl.store(ds_ptr + i * H + h, acc_s, mask=om)
        tl.store(dv_ptr + i * H3 + h, acc_x * inv_sqrt_h, mask=om)
        tl.store(dv_ptr + i * H3 + H + h, acc_y * inv_sqrt_h, mask=om)
        tl.store(dv_ptr + i * H3 + 2 * H + h, acc_z * inv_sqrt_h, mask=om)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mp_bwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, dst_ptr, off_ptr, eg_ptr, w_ptr, b_ptr, mu_ptr, scal_ptr,
    colptr_ptr, perm_ptr, gds_ptr, gdv_ptr,
    gxp_ptr, gvec_ptr, gw_ptr, gb_ptr, gd_ptr, gu_ptr,
    N, H, R, nodes_per_program, num_hblocks,
    CHUNK: tl.constexpr, NEED_W: tl.constexpr, NEED_GEOM: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H
    hc = CHUNK * H + h  # row of W, column of x_proj
    bias = tl.load(b_ptr + hc, mask=hm, other=0.0)
    zero_h = tl.zeros([BLOCK_H], dtype=xp_ptr.dtype.element_ty)
    acc_gb = zero_h
    gd_col = CHUNK * num_hblocks + pid_h
    gd_stride = 3 * num_hblocks
    gw_rows = gw_ptr + (pid_n.to(tl.int64) * H3 + hc) * R  # this program's slice of the W-gradient partials

    for t in range(0, nodes_per_program):
        n = (pid_n * nodes_per_program + t).to(tl.int64)
        node_ok = n < N
        start = tl.load(colptr_ptr + tl.minimum(n, N))
        end = tl.load(colptr_ptr + tl.minimum(n + 1, N))
        pjx = tl.load(pos_ptr + n * 3 + 0, mask=node_ok, other=0.0)
        pjy = tl.load(pos_ptr + n * 3 + 1, mask=node_ok, other=0.0)
        pjz = tl.load(pos_ptr + n * 3 + 2, mask=node_ok, other=0.0)
        nm = h < tl.where(node_ok, H, 0)
        xn = tl.load(xp_ptr + n * H3 + hc, mask=nm, other=0.0)
        if CHUNK == 0:
            vnx = tl.load(vec_ptr + n * H3 + h, mask=nm, other=0.0)
            vny = tl.load(vec_ptr + n * H3 + H + h, mask=nm, other=0.0)
            vnz = tl.load(vec_ptr + n * H3 + 2 * H + h, mask=nm, other=0.0)
        acc_gx = zero_h
        acc_vx = zero_h
        acc_vy = zero_h
        acc_vz = zero_h
        for p0 in range(start, end, BLOCK_E):
            p = p0 + tl.arange(0, BLOCK_E)
            pm = p < end
            e = tl.load(perm_ptr + p, mask=pm, other=0)
            i = tl.load(dst_ptr + e, mask=pm, other=0)
            g = tl.load(eg_ptr + e, mask=pm, other=0)
            rx, ry, rz, rr, d = _edge_geometry(pos_ptr, cell_ptr, off_ptr, pjx, pjy, pjz, i, g, e, pm,
                                               eps, True)
            x, env, denv = envelope(d, cutoff, NEED_GEOM)
            gate, dgate = _gate_tile(x, env, denv, pm, w_ptr, mu_ptr, hc, hm, R, coeff, cutoff, NEED_GEOM,
                                     BLOCK_E, BLOCK_H, BLOCK_K, PRECISION)
            gate = gate + bias[None, :]
            m2 = pm[:, None] & hm[None, :]
            if CHUNK == 2:
                gbeta = tl.load(gds_ptr + i[:, None] * H + h[None, :], mask=m2, other=0.0)
            else:
                grow = gdv_ptr + i[:, None] * H3 + h[None, :]
                gvx = tl.load(grow, mask=m2, other=0.0)
                gvy = tl.load(grow + H, mask=m2, other=0.0)
                gvz = tl.load(grow + 2 * H, mask=m2, other=0.0)
                if CHUNK == 0:
                    gbeta = (gvx * vnx[None, :] + gvy * vny[None, :] + gvz * vnz[None, :]) * inv_sqrt_h
                    beta = xn[None, :] * gate * inv_sqrt3
                    acc_vx += tl.sum(beta * gvx, axis=0)
                    acc_vy += tl.sum(beta * gvy, axis=0)
                    acc_vz += tl.sum(beta * gvz, axis=0)
                else:
                    ux = -rx / d
                    uy = -ry / d
                    uz = -rz / d
                    gbeta = (gvx * ux[:, None] + gvy * uy[:, None] + gvz * uz[:, None]) * inv_sqrt_h
                    if NEED_GEOM:
                        beta = xn[None, :] * gate * inv_sqrt3
                        gu_row = gu_ptr + (e * num_hblocks + pid_h) * 3
                        tl.store(gu_row + 0, tl.sum(gvx * beta, axis=1) * inv_sqrt_h, mask=pm)
                        tl.store(gu_row + 1, tl.sum(gvy * beta, axis=1) * inv_sqrt_h, mask=pm)
                        tl.store(gu_row + 2, tl.sum(gvz * beta, axis=1) * inv_sqrt_h, mask=pm)
            acc_gx += tl.sum(gbeta * gate * inv_sqrt3, axis=0)
            ggate = tl.where(m2, gbeta * xn[None, :] * inv_sqrt3, 0.0)
            if NEED_GEOM:
                tl.store(gd_ptr + e * gd_stride + gd_col, tl.sum(ggate * dgate, axis=1), mask=pm)
            if NEED_W:
                acc_gb += tl.sum(ggate, axis=0)
                # dW[rows, k] += ggate^T f: read-modify-write of this program's own partial slice.
                for k0 in range(0, R, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    km = k < R
                    f, _ = basis_tile(x, env, env, pm, mu_ptr, k, km, coeff, cutoff, False)
                    wm = hm[:, None] & km[None, :]
                    gw = tl.load(gw_rows[:, None] + k[None, :], mask=wm, other=0.0)
                    gw = tl.dot(tl.trans(ggate), f, gw, input_precision=PRECISION, out_dtype=gw.dtype)
                    tl.store(gw_rows[:, None] + k[None, :], gw, mask=wm)
        tl.store(gxp_ptr + n * H3 + hc, acc_gx, mask=nm)
        if CHUNK == 0:
            tl.store(gvec_ptr + n * H3 + h, acc_vx * inv_sqrt_h, mask=nm)
            tl.store(gvec_ptr + n * H3 + H + h, acc_vy * inv_sqrt_h, mask=nm)
            tl.store(gvec_ptr + n * H3 + 2 * H + h, acc_vz * inv_sqrt_h, mask=nm)
    if NEED_W:
        tl.store(gb_ptr + pid_n * H3 + hc, acc_gb, mask=hm)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KernelConfig(GateConfig):
    """Tile sizes and launch parameters; ``None`` fields are chosen from the problem and device.

    block_e: edges per tile (>= 16). fwd_nodes_per_program / bwd_nodes_per_program: receivers
    (forward) or sources (backward) handled in turn by one program; the backward keeps one
    W-gradient partial per program. block_h, block_k, num_warps, num_stages, input_precision: see
    :class:`~e3relax_fast.kernels.utils.GateConfig`.
    """

    block_e: int | None = None
    fwd_nodes_per_program: int | None = None
    bwd_nodes_per_program: int | None = None


def gpu_tiles(dtype: torch.dtype, hidden: int) -> dict:
    """Default GPU tiles. Chosen from sm_90 ahead-of-time compiles (ptxas: no or few spills at
    H=512, R=128), not from timings: no GPU was available when they were picked."""
    if dtype == torch.float64:
        tiles = dict(block_e=16, block_h=32, block_k=16, num_warps=8, num_stages=1)
    else:
        tiles = dict(block_e=64, block_h=32, block_k=16, num_warps=8, num_stages=1)
    tiles["block_h"] = min(tiles["block_h"], max(16, triton.next_power_of_2(hidden)))
    return tiles


def _resolve_config(cfg: KernelConfig | None, n: int, h: int, r: int, dtype: torch.dtype,
                    device) -> KernelConfig:
    cfg = cfg or KernelConfig()
    if interpreting() or device.type != "cuda":
        # The interpreter pays ~1 ms per program and per interpreted op: few programs, big tiles.
        defaults = dict(block_e=64, block_h=min(128, max(16, triton.next_power_of_2(h))),
                        block_k=max(16, triton.next_power_of_2(r)), fwd_nodes_per_program=max(1, n),
                        bwd_nodes_per_program=max(1, n), num_warps=4, num_stages=1)
    else:
        defaults = gpu_tiles(dtype, h)
        n_hb = triton.cdiv(h, cfg.block_h or defaults["block_h"])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # Backward: about four programs per SM per chunk launch, each over a run of sources, so
        # the W-gradient partials (one (3H, R) slice per source block) stay small.
        blocks = max(1, (4 * sms) // n_hb)
        defaults.update(fwd_nodes_per_program=1, bwd_nodes_per_program=max(1, triton.cdiv(n, blocks)))
    return cfg.with_defaults(defaults)


def _forward(x_proj, vec, positions, cells, src, offsets, edge_graph, edge_weight, edge_bias, centres,
             scal, rowptr, cfg: KernelConfig):
    n, h = vec.shape[0], vec.shape[2]
    r = centres.shape[0]
    ds = alloc((n, h), x_proj)
    dv = alloc((n, 3, h), x_proj)
    if n == 0:
        return ds, dv
    grid = (triton.cdiv(n, cfg.fwd_nodes_per_program), triton.cdiv(h, cfg.block_h))
    _mp_fwd_kernel[grid](
        x_proj, vec, positions, cells, src, offsets, edge_graph, edge_weight, edge_bias, centres, scal,
        rowptr, ds, dv, n, h, r, cfg.fwd_nodes_per_program,
        BLOCK_E=cfg.block_e, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return ds, dv


def _backward(gds, gdv, saved, need, cfg: KernelConfig):
    (x_proj, vec, positions, cells, src, dst, offsets, edge_graph, edge_weight, edge_bias, centres,
     scal) = saved
    need_xp, need_vec, need_pos, need_cell, need_w, need_b = need
    n, h = vec.shape[0], vec.shape[2]
    r = centres.shape[0]
    e_count = src.shape[0]
    need_geom = need_pos or need_cell
    need_wb = need_w or need_b
    gxp = alloc((n, 3 * h), x_proj)
    gvec = alloc((n, 3, h), x_proj)
    if n == 0:
        return (x_proj.new_zeros(x_proj.shape), vec.new_zeros(vec.shape), torch.zeros_like(positions),
                torch.zeros_like(cells), torch.zeros_like(edge_weight), torch.zeros_like(edge_bias))
    # Outgoing edges of every source, in a fixed (stable) order: deterministic per-source sums.
    perm = torch.argsort(src, stable=True)
    colptr = torch.searchsorted(src[perm], torch.arange(n + 1, device=src.device, dtype=src.dtype))
    n_hb = triton.cdiv(h, cfg.block_h)
    npp = cfg.bwd_nodes_per_program
    n_prog = triton.cdiv(n, npp)
    # Accumulated in place by the kernels (each program owns one slice): must start at zero.
    gw_part = x_proj.new_zeros((n_prog, 3 * h, r)) if need_wb else x_proj.new_empty(0)
    gb_part = alloc((n_prog, 3 * h), x_proj) if need_wb else x_proj.new_empty(0)
    gd_part = alloc((e_count, 3 * n_hb), x_proj) if need_geom else x_proj.new_empty(0)
    gu_part = alloc((e_count, n_hb, 3), x_proj) if need_geom else x_proj.new_empty(0)
    for chunk in range(3):
        _mp_bwd_kernel[(n_prog, n_hb)](
            x_proj, vec, positions, cells, dst, offsets, edge_graph, edge_weight, edge_bias, centres,
            scal, colptr, perm, gds, gdv, gxp, gvec, gw_part, gb_part, gd_part, gu_part,
            n, h, r, npp, n_hb,
            CHUNK=chunk, NEED_W=need_wb, NEED_GEOM=need_geom,
            BLOCK_E=cfg.block_e, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
            PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    g_w = gw_part.sum(0) if need_wb else None
    g_b = gb_part.sum(0) if need_wb else None
    g_pos = g_cell = None
    if need_geom:
        # dL/dd and dL/du per edge -> dL/dr (d = sqrt(max(|r|^2, eps)), u = -r/d), then scatter.
        rvec = positions[src] + torch.einsum("ep,epq->eq", offsets, cells[edge_graph]) - positions[dst]
        rr = (rvec * rvec).sum(-1)
        d = torch.sqrt(torch.clamp(rr, min=EPS))
        gu = gu_part.sum(1)
        gd = gd_part.sum(1) + (gu * rvec).sum(-1) / (d * d)
        gr = -gu / d.unsqueeze(-1) + (torch.where(rr >= EPS, gd / d, 0.0)).unsqueeze(-1) * rvec
        if need_pos:
            g_pos = torch.zeros_like(positions).index_add_(0, src, gr).index_add_(0, dst, -gr)
        if need_cell:
            g_cell = torch.zeros_like(cells).index_add_(0, edge_graph, offsets.unsqueeze(-1) * gr.unsqueeze(1))
    return (gxp if need_xp else None), (gvec if need_vec else None), g_pos, g_cell, g_w, g_b


class _FusedMessagePassing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_proj, vec, positions, cells, edge_weight, edge_bias, src, dst, offsets, edge_graph,
                centres, scal, rowptr, cfg):
        ds, dv = _forward(x_proj, vec, positions, cells, src, offsets, edge_graph, edge_weight, edge_bias,
                          centres, scal, rowptr, cfg)
        ctx.save_for_backward(x_proj, vec, positions, cells, src, dst, offsets, edge_graph, edge_weight,
                              edge_bias, centres, scal)
        ctx.cfg = cfg
        return ds, dv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gds, gdv):
        need = ctx.needs_input_grad[:6]
        grads = _backward(gds.contiguous(), gdv.contiguous(), ctx.saved_tensors, need, ctx.cfg)
        return (*grads, None, None, None, None, None, None, None, None)


def message_passing(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    edge_index: Tensor,
    cell_offsets: Tensor,
    edge_graph: Tensor,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
    rowptr: Tensor | None = None,
    *,
    config: KernelConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused Triton twin of :func:`e3relax_fast.reference.message_passing.message_passing`.

    Same arguments and result (``ds (N, H)``, ``dv (N, 3, H)``), differentiable with respect to
    x_proj, vec, positions, cells, edge_weight and edge_bias. Additionally requires:

    Args:
        rowptr: ``(N+1,)`` int64 receiver CSR. The edges must be sorted by receiver
            (``edge_index[1]``) with the edges into atom i at ``rowptr[i]:rowptr[i+1]``; the
            model builds it once per forward (stable argsort + ``torch.searchsorted``).
        config: optional :class:`KernelConfig` (tile sizes, warps, ``input_precision``), for
            benchmarks and tuning; defaults depend on device, dtype and H.

    All floating inputs must share one dtype (float32 or float64) and live on one device (CUDA, or
    CPU under ``TRITON_INTERPRET=1``). Edges, offsets and the graph index are read as given (no
    copy when already contiguous int64 / working-dtype tensors).
    """
    if rowptr is None:
        raise ValueError(
            "the triton message_passing kernel needs rowptr: edges sorted by receiver "
            "(edge_index[1]) and their (N+1,) CSR offsets, e.g. rowptr = torch.searchsorted("
            "edge_index[1], torch.arange(N + 1))"
        )
    dtype = x_proj.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"triton message_passing supports float32 and float64, got {dtype}")
    for name, t in (("vec", vec), ("positions", positions), ("cells", cells), ("edge_weight", edge_weight),
                    ("edge_bias", edge_bias)):
        if t.dtype != dtype:
            raise TypeError(f"triton message_passing: {name} is {t.dtype}, x_proj is {dtype}")
    n, h = vec.shape[0], vec.shape[2]
    if x_proj.shape != (n, 3 * h) or rowptr.shape != (n + 1,):
        raise ValueError(f"shapes: x_proj {tuple(x_proj.shape)}, vec {tuple(vec.shape)}, rowptr "
                         f"{tuple(rowptr.shape)}; expected (N, 3H), (N, 3, H), (N+1,)")
    if edge_weight.shape != (3 * h, rbf_centres.shape[0]):
        raise ValueError(f"edge_weight must be (3H, R) = ({3 * h}, {rbf_centres.shape[0]}), "
                         f"got {tuple(edge_weight.shape)}")
    cfg = _resolve_config(config, n, h, rbf_centres.shape[0], dtype, x_proj.device)
    cfg.check(dtype, "block_e")
    src = edge_index[0].to(torch.int64).contiguous()
    dst = edge_index[1].to(torch.int64).contiguous()
    return _FusedMessagePassing.apply(
        x_proj.contiguous(), vec.contiguous(), positions.contiguous(), cells.contiguous(),
        edge_weight.contiguous(), edge_bias.contiguous(), src, dst,
        cell_offsets.to(dtype).contiguous(), edge_graph.to(torch.int64).contiguous(),
        rbf_centres.to(dtype).contiguous(), scalars(rbf_coeff, cutoff, h, x_proj),
        rowptr.to(torch.int64).contiguous(), cfg,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): catches errors the interpreter hides.
# ---------------------------------------------------------------------------------------------
def aot_compile(dtype: torch.dtype = torch.float32, hidden: int = 512, num_rbf: int = 128,
                arch: int = 90, config: KernelConfig | None = None,
                kernels: tuple[str, ...] = ("fwd", "bwd0", "bwd1", "bwd2")) -> dict:
    """Compile the forward (``"fwd"``) and the per-chunk backward kernels (``"bwd0"``..``"bwd2"``)
    for ``sm_{arch}`` without a device, with the tiles the GPU defaults would use.

    Returns ``{kernel name: compiled kernel}`` (``.asm`` holds ``ttgir``/``ptx``/``cubin``).
    """
    tiles = (config or KernelConfig()).with_defaults(gpu_tiles(dtype, hidden))
    fp = "*fp32" if dtype == torch.float32 else "*fp64"
    gate_tiles = {"BLOCK_E": tiles.block_e, "BLOCK_H": tiles.block_h, "BLOCK_K": tiles.block_k,
                  "PRECISION": tiles.input_precision}
    common = {"xp_ptr": fp, "vec_ptr": fp, "pos_ptr": fp, "cell_ptr": fp, "off_ptr": fp, "eg_ptr": "*i64",
              "w_ptr": fp, "b_ptr": fp, "mu_ptr": fp, "scal_ptr": fp, "N": "i32", "H": "i32", "R": "i32",
              "nodes_per_program": "i32"}
    out = {}
    if "fwd" in kernels:
        types = {**common, "src_ptr": "*i64", "rowptr_ptr": "*i64", "ds_ptr": fp, "dv_ptr": fp}
        out["fwd"] = compile_for_gpu(_mp_fwd_kernel, types, gate_tiles, arch, tiles.num_warps, tiles.num_stages)
    types = {**common, "dst_ptr": "*i64", "colptr_ptr": "*i64", "perm_ptr": "*i64", "gds_ptr": fp, "gdv_ptr": fp,
             "gxp_ptr": fp, "gvec_ptr": fp, "gw_ptr": fp, "gb_ptr": fp, "gd_ptr": fp, "gu_ptr": fp,
             "num_hblocks": "i32"}
    for chunk in range(3):
        if f"bwd{chunk}" in kernels:
            consts = {"CHUNK": chunk, "NEED_W": True, "NEED_GEOM": True, **gate_tiles}
            out[f"bwd{chunk}"] = compile_for_gpu(_mp_bwd_kernel, types, consts, arch, tiles.num_warps,
                                                 tiles.num_stages)
    return out
