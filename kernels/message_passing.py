"""Fused atom–atom message passing in Triton (spec §6 Step B), forward and backward.

Twin of :func:`e3relax_fast.reference.message_passing.message_passing`; same arguments plus the
receiver CSR ``rowptr`` (required here). For edge e = (j -> i) of crystal g:

    r_e = p_j + o_e C_g - p_i,  d_e = sqrt(max(|r_e|^2, eps)),  u_e = -r_e / d_e
    f_e = env(d_e / cutoff) * exp(coeff * (d_e / cutoff - mu)^2)                (R,)
    [b1|b2|b3]_e = x_proj[j] * (W f_e + b) / sqrt(3)                            (3H,)
    ds_i = sum_e b3_e,   dv_i = sum_e (b1_e * vec[j] + u_e (x) b2_e) / sqrt(H)

Forward (``_mp_fwd_kernel``): grid ``(receiver blocks,)``; a program owns ``nodes_per_program``
consecutive receivers (one on a GPU) and all 3H channels. It walks each receiver's CSR slice
``rowptr[i]:rowptr[i+1]`` in tiles of ``block_e`` edges and per tile:

* recomputes the geometry in registers and evaluates the radial basis **once**: R exponentials per
  edge slot, held as ceil(R / block_k) register blocks of (block_e, block_k) (``basis.basis_blocks``,
  exact: every centre, no window);
* loops over the channel blocks (``block_h``); per block, one sweep over the basis blocks feeds
  three ``tl.dot`` against (block_h, block_k) tiles of W, one per chunk (``_gates``), and the gates
  multiply the gathered ``x_proj[j]`` (and ``vec[j]`` / u) and are summed over the tile's edges.
  The W tiles are software-pipelined (``num_stages``). The basis blocks are passed through the
  channel loop as loop values (``_in_loop``) so that the compiler converts one block at a time to
  the dot-operand layout inside the loop instead of hoisting all of them (4x the registers);
* stores the receiver's sums for the block: a plain store from the first tile, a read-add-store of
  the program's own rows from later tiles (receivers with more than ``block_e`` edges).

No atomics: the forward is deterministic, and nothing of size E x 3H or E x R touches memory.

Backward (training only): two launches.

1. ``_mp_basis_kernel``, grid ``(edge blocks of basis_block_e,)`` over the edges in *source* order
   (``source_csr``: a stable argsort of the sources and its CSR, computed once per graph and kept on
   ``edge_index``): per edge the geometry and the basis **once** (R exponentials), written to
   scratch buffers in the working dtype, rows in source order: f (E x R), df/dd (E x R, only when
   positions or cells need a gradient) and u = -r/d (3 x E). At float32, R = 128 and a training
   batch of 13k edges that is ~6.7 MB per E x R buffer (13 MB for both), read back (from L2) by
   every channel block and chunk.
2. ``_mp_bwd_kernel``, grid ``(source runs, channel blocks, 3 chunks)``: a program owns one chunk c
   of one channel block and walks its run of source atoms' outgoing edges in tiles of
   ``bwd_block_e``. No geometry and no exponential: per tile it reads the receivers' upstream
   gradients and f tiles (``bwd_block_k`` centres at a time) for its gate, W[cH + h] f + b, and
   produces

   * d x_proj[j] (chunk c) and, in chunk 0's programs, d vec[j], summed over j's outgoing edges in
     registers, one store each;
   * d b and d W of its rows cH + h: dW += gg^T f accumulated in registers over all the program's
     edges (ceil(R / bwd_block_k) (block_h, bwd_block_k) accumulators) and stored once per program
     into its own slice of a partial, summed afterwards in fixed order;
   * dL/dd per edge as sum_k (gg W_c)[e, k] df/dd[e, k] (no d-derivative of the gates), a partial
     per channel block and chunk, and in chunk 1's programs dL/du, partials per channel block; both
     stored contiguous in the source order (coalesced), summed and put back in edge order afterwards.

   One chunk per program (rather than all three) keeps one gate, one gate gradient and a third of
   the dW accumulators live: with all three, the gate gradients' dot-operand copies (replicated
   over the threads sharing a row) spilled (~1 KB at float64, ~50-100 B at float32). The chunks'
   programs share nothing but the reads of f and of the upstream gradients.

A short PyTorch epilogue turns dL/dd and dL/du into dL/dr and scatters it onto positions and cells
with ``index_add_``: that scatter is the only non-deterministic part on CUDA (atomic float adds,
ulp-level run-to-run differences; deterministic under ``torch.use_deterministic_algorithms``). The
backward is first-order only (``once_differentiable``).

Launch configuration: :func:`gpu_tiles` (the defaults, from sm_90 AOT compiles under Triton 3.6 and
3.9: no spills in any kernel at float32 or float64, the float32 forward at <= 128 registers with
``maxnreg``) and :func:`tuning_configs` (the table to sweep on hardware); the interpreter and the AOT
tests use one fixed configuration.

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
from .basis import basis_blocks, basis_tile, chunk_biases, envelope, load_scalars, scalars
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
    sources). Returns r (three vectors) and the safe norm d.
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
    d = tl.sqrt(tl.maximum(rx * rx + ry * ry + rz * rz, eps))
    return rx, ry, rz, d


@triton.jit
def _gates(blocks, w_ptr, h, hm, H, R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
           BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The three chunks' (BLOCK_E, BLOCK_H) gates W[cH + h] f (no bias), in one sweep over the basis
    blocks f (:func:`basis_blocks`): per block of BLOCK_K centres, three ``tl.dot`` against
    (BLOCK_H, BLOCK_K) tiles of W."""
    dtype = w_ptr.dtype.element_ty
    gate0 = tl.zeros([BLOCK_E, BLOCK_H], dtype=dtype)
    gate1 = tl.zeros([BLOCK_E, BLOCK_H], dtype=dtype)
    gate2 = tl.zeros([BLOCK_E, BLOCK_H], dtype=dtype)
    for q in tl.static_range(len(blocks)):
        k = q * BLOCK_K + tl.arange(0, BLOCK_K)
        wm = hm[:, None] & (k < R)[None, :]
        w_rows = w_ptr + h[:, None] * R + k[None, :]
        f = blocks[q]
        gate0 = tl.dot(f, tl.trans(tl.load(w_rows, mask=wm, other=0.0)), gate0, input_precision=PRECISION,
                       out_dtype=dtype)
        gate1 = tl.dot(f, tl.trans(tl.load(w_rows + H * R, mask=wm, other=0.0)), gate1,
                       input_precision=PRECISION, out_dtype=dtype)
        gate2 = tl.dot(f, tl.trans(tl.load(w_rows + 2 * H * R, mask=wm, other=0.0)), gate2,
                       input_precision=PRECISION, out_dtype=dtype)
    return gate0, gate1, gate2


@triton.jit
def _in_loop(blocks, h0):
    """``blocks`` unchanged, as a value of each iteration of the channel loop (``h0`` >= 0 is its
    induction variable): the compiler then keeps the basis in its compact register layout and
    converts one block at a time to the dot-operand layout inside the loop, instead of hoisting
    every block's conversion out of it (that layout is replicated across the threads sharing a
    row: ~4x the registers, which spill)."""
    one = tl.where(h0 >= 0, 1.0, 0.0).to(blocks[0].dtype)
    out = ()
    for q in tl.static_range(len(blocks)):
        out = out + (blocks[q] * one,)
    return out


@triton.jit
def _add_store(ptr, value, written, added):
    """Store ``value`` where ``written``, plus what is there already where ``added`` (a receiver's
    later edge tiles add to the partial sums its first tile stored: this program's own rows)."""
    tl.store(ptr, value + tl.load(ptr, mask=added, other=0.0), mask=written)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fwd_channel_block(xp_ptr, vec_ptr, w_ptr, b_ptr, fs, j, em, ux, uy, uz, h0, H, inv_sqrt3,
                       R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One receiver's edge tile, channels h0 + [0, BLOCK_H): the sums over the tile's edges of the
    scalar message and of the three vector-message components (before the 1/sqrt(H))."""
    h = h0 + tl.arange(0, BLOCK_H)
    hm = h < H
    m2 = em[:, None] & hm[None, :]
    xrow = xp_ptr + j[:, None] * (3 * H) + h[None, :]
    vrow = vec_ptr + j[:, None] * (3 * H) + h[None, :]
    bias1, bias2, bias3 = chunk_biases(b_ptr, h, hm, H)
    gate1, gate2, gate3 = _gates(fs, w_ptr, h, hm, H, R, BLOCK_E, BLOCK_H, BLOCK_K, PRECISION)
    # chunk 1 gates vec[j]
    b1 = tl.load(xrow, mask=m2, other=0.0) * (gate1 + bias1[None, :]) * inv_sqrt3
    acc_x = tl.sum(b1 * tl.load(vrow, mask=m2, other=0.0), axis=0)
    acc_y = tl.sum(b1 * tl.load(vrow + H, mask=m2, other=0.0), axis=0)
    acc_z = tl.sum(b1 * tl.load(vrow + 2 * H, mask=m2, other=0.0), axis=0)
    # chunk 2 gates the unit vector u = -r / d
    b2 = tl.load(xrow + H, mask=m2, other=0.0) * (gate2 + bias2[None, :]) * inv_sqrt3
    acc_x += tl.sum(ux[:, None] * b2, axis=0)
    acc_y += tl.sum(uy[:, None] * b2, axis=0)
    acc_z += tl.sum(uz[:, None] * b2, axis=0)
    # chunk 3 is the scalar message
    b3 = tl.load(xrow + 2 * H, mask=m2, other=0.0) * (gate3 + bias3[None, :]) * inv_sqrt3
    acc_s = tl.sum(b3, axis=0)
    return h, acc_s, acc_x, acc_y, acc_z


@triton.jit
def _mp_fwd_kernel(
    xp_ptr, vec_ptr, pos_ptr, cell_ptr, src_ptr, off_ptr, eg_ptr, w_ptr, b_ptr, mu_ptr, scal_ptr,
    rowptr_ptr, ds_ptr, dv_ptr,
    N, H,
    NODES: tl.constexpr, R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    for t in range(0, NODES):
        i = (pid * NODES + t).to(tl.int64)
        node_ok = i < N
        start = tl.load(rowptr_ptr + tl.minimum(i, N))
        end = tl.load(rowptr_ptr + tl.minimum(i + 1, N))
        pix = tl.load(pos_ptr + i * 3 + 0, mask=node_ok, other=0.0)
        piy = tl.load(pos_ptr + i * 3 + 1, mask=node_ok, other=0.0)
        piz = tl.load(pos_ptr + i * 3 + 2, mask=node_ok, other=0.0)
        written = tl.where(node_ok, H, 0)  # (a scalar & block mask trips the interpreter)
        # At least one tile, so that a receiver without edges gets its zeros.
        for tile in range(0, tl.maximum((end - start + BLOCK_E - 1) // BLOCK_E, 1)):
            e = start + tile * BLOCK_E + tl.arange(0, BLOCK_E)
            em = e < end
            j = tl.load(src_ptr + e, mask=em, other=0)
            g = tl.load(eg_ptr + e, mask=em, other=0)
            rx, ry, rz, d = _edge_geometry(pos_ptr, cell_ptr, off_ptr, pix, piy, piz, j, g, e, em, eps, False)
            x, env, _ = envelope(d, cutoff, False)
            fs = basis_blocks(x, env, em, mu_ptr, coeff, R, BLOCK_K)  # once per edge
            ux = -rx / d
            uy = -ry / d
            uz = -rz / d
            added = tl.where(node_ok & (tile > 0), H, 0)
            for h0 in range(0, H, BLOCK_H):
                h, acc_s, acc_x, acc_y, acc_z = _fwd_channel_block(
                    xp_ptr, vec_ptr, w_ptr, b_ptr, _in_loop(fs, h0), j, em, ux, uy, uz, h0, H, inv_sqrt3,
                    R, BLOCK_E, BLOCK_H, BLOCK_K, PRECISION)
                out_v = dv_ptr + i * (3 * H) + h
                _add_store(ds_ptr + i * H + h, acc_s, h < written, h < added)
                _add_store(out_v, acc_x * inv_sqrt_h, h < written, h < added)
                _add_store(out_v + H, acc_y * inv_sqrt_h, h < written, h < added)
                _add_store(out_v + 2 * H, acc_z * inv_sqrt_h, h < written, h < added)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------
@triton.jit
def _edge_tile(ptr, p, pm, k, km, R: tl.constexpr):
    """(BLOCK_E, BLOCK_K) tile of an (E, R) per-edge buffer of the basis kernel (rows in source
    order ``p``, mask ``pm``; centres ``k``, mask ``km``); zero outside the masks."""
    return tl.load(ptr + p[:, None] * R + k[None, :], mask=pm[:, None] & km[None, :], other=0.0)


@triton.jit
def _bwd_gate(f_ptr, p, pm, w_rows, hm, R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
              BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One chunk's gates of a source's edge tile, (BLOCK_E, BLOCK_H): ``w_rows`` (the chunk's rows
    of W, one per channel) times the basis f, read tile by tile from the basis kernel's buffer."""
    dtype = w_rows.dtype.element_ty
    gate = tl.zeros([BLOCK_E, BLOCK_H], dtype=dtype)
    for k0 in tl.static_range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        w = tl.load(w_rows[:, None] + k[None, :], mask=hm[:, None] & km[None, :], other=0.0)
        gate = tl.dot(_edge_tile(f_ptr, p, pm, k, km, R), tl.trans(w), gate, input_precision=PRECISION,
                      out_dtype=dtype)
    return gate


@triton.jit
def _bwd_centre_terms(f_ptr, df_ptr, p, pm, gg, dws, dd, w_rows, hm, R: tl.constexpr, NEED_W: tl.constexpr,
                      NEED_GEOM: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The terms of a source's edge tile (one chunk, rows ``w_rows`` of W) that contract over the
    centres, per block of BLOCK_K centres (f and df/dd tiles read from the basis kernel's buffers),
    from the chunk's gate gradient ``gg``:

    * dW[rows, k] += gg^T f: ``dws``, the tuple of (BLOCK_H, BLOCK_K) accumulators;
    * dL/dd[e] += sum_k (gg W)[e, k] df/dd[e, k]: ``dd`` (no d-derivative of the gates needed).

    Returns both, updated."""
    dtype = w_rows.dtype.element_ty
    new = ()
    for q in tl.static_range((R + BLOCK_K - 1) // BLOCK_K):
        k = q * BLOCK_K + tl.arange(0, BLOCK_K)
        km = k < R
        if NEED_GEOM:
            w = tl.load(w_rows[:, None] + k[None, :], mask=hm[:, None] & km[None, :], other=0.0)
            t = tl.dot(gg, w, input_precision=PRECISION, out_dtype=dtype)
            dd += tl.sum(t * _edge_tile(df_ptr, p, pm, k, km, R), axis=1)
        if NEED_W:
            new = new + (tl.dot(tl.trans(gg), _edge_tile(f_ptr, p, pm, k, km, R), dws[q],
                                input_precision=PRECISION, out_dtype=dtype),)
    if NEED_W:
        dws = new
    return dws, dd


@triton.jit
def _mp_basis_kernel(pos_ptr, cell_ptr, src_ptr, dst_ptr, off_ptr, eg_ptr, perm_ptr, mu_ptr, scal_ptr,
                     f_ptr, df_ptr, u_ptr, E,
                     R: tl.constexpr, NEED_GEOM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per edge, in source order (row p is edge perm[p]): the basis f (E, R), the unit vector
    u = -r/d (3, E) and, with NEED_GEOM, df/dd (E, R). R exponentials per edge, once: the backward
    reads these instead of recomputing geometry and basis in every channel block."""
    pid = tl.program_id(0)
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    p = pid.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    pm = p < E
    e = tl.load(perm_ptr + p, mask=pm, other=0)
    j = tl.load(src_ptr + e, mask=pm, other=0)
    i = tl.load(dst_ptr + e, mask=pm, other=0)
    g = tl.load(eg_ptr + e, mask=pm, other=0)
    pjx = tl.load(pos_ptr + j * 3 + 0, mask=pm, other=0.0)
    pjy = tl.load(pos_ptr + j * 3 + 1, mask=pm, other=0.0)
    pjz = tl.load(pos_ptr + j * 3 + 2, mask=pm, other=0.0)
    rx, ry, rz, d = _edge_geometry(pos_ptr, cell_ptr, off_ptr, pjx, pjy, pjz, i, g, e, pm, eps, True)
    x, env, denv = envelope(d, cutoff, NEED_GEOM)
    for k0 in tl.static_range(0, R, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < R
        f, df = basis_tile(x, env, denv, pm, mu_ptr, k, km, coeff, cutoff, NEED_GEOM)
        rows = p[:, None] * R + k[None, :]
        m2 = pm[:, None] & km[None, :]
        tl.store(f_ptr + rows, f, mask=m2)
        if NEED_GEOM:
            tl.store(df_ptr + rows, df, mask=m2)
    tl.store(u_ptr + p, -rx / d, mask=pm)
    tl.store(u_ptr + E + p, -ry / d, mask=pm)
    tl.store(u_ptr + 2 * E + p, -rz / d, mask=pm)


@triton.jit
def _mp_bwd_kernel(  # Long on purpose: one source's edge tiles, one chunk, in one pass
    xp_ptr, vec_ptr, dst_ptr, w_ptr, b_ptr, scal_ptr, colptr_ptr, perm_ptr, f_ptr, df_ptr, u_ptr,
    gds_ptr, gdv_ptr, gxp_ptr, gvec_ptr, gw_ptr, gb_ptr, gd_ptr, gu_ptr,
    N, H, E, nodes_per_program,
    R: tl.constexpr, NEED_W: tl.constexpr, NEED_GEOM: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    c = tl.program_id(2)  # the chunk: 0 gated vec[j], 1 gated u = -r/d, 2 was the scalar message
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < H
    coeff, cutoff, inv_sqrt3, inv_sqrt_h, eps = load_scalars(scal_ptr)
    H3 = 3 * H
    ch = c * H + h  # this program's rows of W and b, and columns of x_proj
    dtype = xp_ptr.dtype.element_ty
    w_rows = w_ptr + ch * R
    bias = tl.load(b_ptr + ch, mask=hm, other=0.0)
    zero_h = tl.zeros([BLOCK_H], dtype=dtype)
    db = zero_h
    dws = ()
    if NEED_W:
        for _ in tl.static_range((R + BLOCK_K - 1) // BLOCK_K):
            dws = dws + (tl.zeros([BLOCK_H, BLOCK_K], dtype=dtype),)
    vec_out = h < tl.where(c == 0, H, 0)  # d vec comes from chunk 0's programs
    u_out = tl.where(c == 1, E, 0)  # dL/du from chunk 1's
    for t in range(0, nodes_per_program):
        n = (pid_n * nodes_per_program + t).to(tl.int64)
        node_ok = n < N
        start = tl.load(colptr_ptr + tl.minimum(n, N))
        end = tl.load(colptr_ptr + tl.minimum(n + 1, N))
        nm = h < tl.where(node_ok, H, 0)  # (a scalar & block mask trips the interpreter)
        xn = tl.load(xp_ptr + n * H3 + ch, mask=nm, other=0.0)
        vnx = tl.load(vec_ptr + n * H3 + h, mask=nm, other=0.0)
        vny = tl.load(vec_ptr + n * H3 + H + h, mask=nm, other=0.0)
        vnz = tl.load(vec_ptr + n * H3 + 2 * H + h, mask=nm, other=0.0)
        acc_g = zero_h
        acc_vx = zero_h
        acc_vy = zero_h
        acc_vz = zero_h
        for p0 in range(start, end, BLOCK_E):
            p = p0 + tl.arange(0, BLOCK_E)  # position in the source-sorted order
            pm = p < end
            i = tl.load(dst_ptr + tl.load(perm_ptr + p, mask=pm, other=0), mask=pm, other=0)
            m2 = pm[:, None] & hm[None, :]
            gate = _bwd_gate(f_ptr, p, pm, w_rows, hm, R, BLOCK_E, BLOCK_H, BLOCK_K, PRECISION) + bias[None, :]
            if c == 2:
                gbeta = tl.load(gds_ptr + i[:, None] * H + h[None, :], mask=m2, other=0.0)
            else:
                grow = gdv_ptr + i[:, None] * H3 + h[None, :]
                gvx = tl.load(grow, mask=m2, other=0.0)
                gvy = tl.load(grow + H, mask=m2, other=0.0)
                gvz = tl.load(grow + 2 * H, mask=m2, other=0.0)
                if c == 0:
                    beta = xn[None, :] * gate * inv_sqrt3
                    acc_vx += tl.sum(beta * gvx, axis=0)
                    acc_vy += tl.sum(beta * gvy, axis=0)
                    acc_vz += tl.sum(beta * gvz, axis=0)
                    gbeta = (gvx * vnx[None, :] + gvy * vny[None, :] + gvz * vnz[None, :]) * inv_sqrt_h
                else:
                    ux = tl.load(u_ptr + p, mask=pm, other=0.0)
                    uy = tl.load(u_ptr + E + p, mask=pm, other=0.0)
                    uz = tl.load(u_ptr + 2 * E + p, mask=pm, other=0.0)
                    gbeta = (gvx * ux[:, None] + gvy * uy[:, None] + gvz * uz[:, None]) * inv_sqrt_h
                    if NEED_GEOM:
                        # dL/du partials of this channel block: rows (block, component), contiguous in p.
                        beta = xn[None, :] * gate * (inv_sqrt3 * inv_sqrt_h)
                        gu_row = gu_ptr + (pid_h * 3).to(tl.int64) * E + p
                        tl.store(gu_row, tl.sum(gvx * beta, axis=1), mask=p < u_out)
                        tl.store(gu_row + E, tl.sum(gvy * beta, axis=1), mask=p < u_out)
                        tl.store(gu_row + 2 * E, tl.sum(gvz * beta, axis=1), mask=p < u_out)
            acc_g += tl.sum(gbeta * gate * inv_sqrt3, axis=0)
            gg = tl.where(m2, gbeta * xn[None, :] * inv_sqrt3, 0.0)
            if NEED_W:
                db += tl.sum(gg, axis=0)
            dd = tl.zeros([BLOCK_E], dtype=dtype)
            dws, dd = _bwd_centre_terms(f_ptr, df_ptr, p, pm, gg, dws, dd, w_rows, hm, R, NEED_W, NEED_GEOM,
                                        BLOCK_K, PRECISION)
            if NEED_GEOM:
                tl.store(gd_ptr + (pid_h * 3 + c).to(tl.int64) * E + p, dd, mask=pm)
        tl.store(gxp_ptr + n * H3 + ch, acc_g, mask=nm)
        gv_row = gvec_ptr + n * H3 + h
        tl.store(gv_row, acc_vx * inv_sqrt_h, mask=nm & vec_out)
        tl.store(gv_row + H, acc_vy * inv_sqrt_h, mask=nm & vec_out)
        tl.store(gv_row + 2 * H, acc_vz * inv_sqrt_h, mask=nm & vec_out)
    if NEED_W:
        # This program's dW and db partial: rows cH + h of slice pid_n, one store each.
        base = gw_ptr + pid_n.to(tl.int64) * (3 * H * R) + ch[:, None] * R
        for q in tl.static_range(len(dws)):
            k = q * BLOCK_K + tl.arange(0, BLOCK_K)
            tl.store(base + k[None, :], dws[q], mask=hm[:, None] & (k < R)[None, :])
        tl.store(gb_ptr + pid_n.to(tl.int64) * (3 * H) + ch, db, mask=hm)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class KernelConfig(GateConfig):
    """Tile sizes and launch parameters; ``None`` fields are chosen from the problem and device.

    block_e: edges per forward tile, a receiver's edges (>= 16). bwd_block_e: edges per backward
    tile, a source's edges (>= 16). bwd_block_k: centres per step of the backward's K-loops (>= 16;
    also the number of dW accumulators: ceil(R / bwd_block_k)). bwd_num_stages: pipelining stages
    of the backward (``num_stages`` is the forward's). basis_block_e / basis_num_warps: edges and
    warps per program of the backward's basis kernel (its K step is ``block_k``).
    fwd_nodes_per_program / bwd_nodes_per_program: receivers (forward) or sources (backward)
    handled in turn by one program; the backward keeps one W-gradient partial per program row.
    block_h, block_k, num_warps, num_stages, input_precision: see
    :class:`~e3relax_fast.kernels.utils.GateConfig`; the forward holds the basis of a tile as
    ceil(R / block_k) register blocks.
    """

    block_e: int | None = None
    bwd_block_e: int | None = None
    bwd_block_k: int | None = None
    bwd_num_stages: int | None = None
    basis_block_e: int | None = None
    basis_num_warps: int | None = None
    fwd_maxnreg: int | None = None
    fwd_nodes_per_program: int | None = None
    bwd_nodes_per_program: int | None = None


def gpu_tiles(dtype: torch.dtype, hidden: int) -> dict:
    """Default GPU tiles. Chosen from sm_90 ahead-of-time compiles under Triton 3.6 and 3.9 (ptxas at
    H=512, R=128: no spills in any kernel, the float32 forward within 128 registers so two CTAs fit
    per SM), not from timings: no GPU was available when they were picked. Margins are thin: the
    float64 forward (block_e 32 spilled under 3.6), the float32 forward (2 stages spilled 4 B under
    3.6) and both backwards (the other bwd_block_k / bwd_num_stages tried spilled) sit at 238-255
    registers or the 128 cap.
    :func:`tuning_configs` lists the ones to sweep."""
    if dtype == torch.float64:
        tiles = dict(block_e=16, bwd_block_e=16, block_h=16, block_k=32, num_warps=8, num_stages=2,
                     fwd_maxnreg=None, bwd_block_k=64, bwd_num_stages=2, basis_block_e=32, basis_num_warps=4)
    else:
        tiles = dict(block_e=32, bwd_block_e=16, block_h=16, block_k=32, num_warps=8, num_stages=3,
                     fwd_maxnreg=128, bwd_block_k=128, bwd_num_stages=1, basis_block_e=64, basis_num_warps=4)
    tiles["block_h"] = min(tiles["block_h"], max(16, triton.next_power_of_2(hidden)))
    return tiles


def tuning_configs(dtype: torch.dtype = torch.float32) -> list[KernelConfig]:
    """Candidate configurations to sweep on hardware (``message_passing(..., config=c)`` for each;
    the defaults of :func:`gpu_tiles` are the first). The interpreter and the AOT tests use one
    fixed configuration; no entry here has been timed yet."""
    fp32 = dtype == torch.float32
    edges = (64, 32) if fp32 else (32, 16)
    out = [KernelConfig(**gpu_tiles(dtype, 512))]
    for block_e in edges:
        for block_h in (32, 64):
            for num_stages in (2, 3):
                for num_warps in (4, 8):
                    cfg = KernelConfig(block_e=block_e, bwd_block_e=32 if fp32 else 16, block_h=block_h, block_k=32,
                                       num_warps=num_warps, num_stages=num_stages)
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
        defaults = dict(block_e=64, bwd_block_e=64, basis_block_e=256, basis_num_warps=4,
                        block_h=min(128, max(16, triton.next_power_of_2(h))),
                        block_k=max(16, triton.next_power_of_2(r)), bwd_block_k=max(16, triton.next_power_of_2(r)),
                        bwd_num_stages=1, fwd_nodes_per_program=max(1, n),
                        bwd_nodes_per_program=max(1, n), num_warps=4, num_stages=1)
    else:
        defaults = gpu_tiles(dtype, h)
        n_hb = triton.cdiv(h, cfg.block_h or defaults["block_h"])
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # Backward: about four programs per SM and chunk (twelve in all), each over a run of
        # sources, so the W-gradient partials (one (3H, R) slice per run) stay few.
        runs = max(1, (4 * sms) // n_hb)
        defaults.update(fwd_nodes_per_program=1, bwd_nodes_per_program=max(1, triton.cdiv(n, runs)))
    return cfg.with_defaults(defaults)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
_CSR_ATTRIBUTE = "_e3relax_source_csr"


def source_csr(edge_index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(perm, colptr)``: the edges in source order (stable argsort of ``edge_index[0]``) and the
    ``(n+1,)`` source CSR over that order, which the backward walks.

    Computed once per graph: kept on ``edge_index`` itself (the model passes the same tensor to every
    layer) and reused while that tensor is unchanged (same version counter and atom count).
    """
    key = (edge_index._version, int(n), edge_index.data_ptr(), tuple(edge_index.shape))
    cached = getattr(edge_index, _CSR_ATTRIBUTE, None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    src = edge_index[0].to(torch.int64)
    perm = torch.argsort(src, stable=True)
    colptr = torch.searchsorted(src[perm], torch.arange(n + 1, device=src.device, dtype=torch.int64))
    try:
        setattr(edge_index, _CSR_ATTRIBUTE, (key, perm, colptr))
    except (AttributeError, RuntimeError):  # a tensor that takes no attributes: recomputed per call
        pass
    return perm, colptr


def _forward(x_proj, vec, positions, cells, src, offsets, edge_graph, edge_weight, edge_bias, centres,
             scal, rowptr, cfg: KernelConfig):
    n, h = vec.shape[0], vec.shape[2]
    r = centres.shape[0]
    ds = alloc((n, h), x_proj)
    dv = alloc((n, 3, h), x_proj)
    if n == 0:
        return ds, dv
    _mp_fwd_kernel[(triton.cdiv(n, cfg.fwd_nodes_per_program),)](
        x_proj, vec, positions, cells, src, offsets, edge_graph, edge_weight, edge_bias, centres, scal,
        rowptr, ds, dv, n, h,
        NODES=cfg.fwd_nodes_per_program, R=r, BLOCK_E=cfg.block_e, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
        PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({} if cfg.fwd_maxnreg is None else {"maxnreg": cfg.fwd_maxnreg}),
    )
    return ds, dv


def _geometry_gradient(gd_part, gu_part, perm, positions, cells, src, dst, offsets, edge_graph, need_pos,
                       need_cell):
    """dL/dd and dL/du (per-channel-block partials in source order) -> dL/dr -> positions, cells."""
    gd = torch.empty_like(gd_part[0])
    gd[perm] = gd_part.sum(0)
    gu = torch.empty_like(gu_part[0].t())
    gu[perm] = gu_part.sum(0).t()
    # d = sqrt(max(|r|^2, eps)), u = -r/d
    rvec = positions[src] + torch.einsum("ep,epq->eq", offsets, cells[edge_graph]) - positions[dst]
    rr = (rvec * rvec).sum(-1)
    d = torch.sqrt(torch.clamp(rr, min=EPS))
    gd = gd + (gu * rvec).sum(-1) / (d * d)
    gr = -gu / d.unsqueeze(-1) + (torch.where(rr >= EPS, gd / d, 0.0)).unsqueeze(-1) * rvec
    g_pos = torch.zeros_like(positions).index_add_(0, src, gr).index_add_(0, dst, -gr) if need_pos else None
    g_cell = (torch.zeros_like(cells).index_add_(0, edge_graph, offsets.unsqueeze(-1) * gr.unsqueeze(1))
              if need_cell else None)
    return g_pos, g_cell


def _backward(gds, gdv, saved, need, cfg: KernelConfig):
    (x_proj, vec, positions, cells, src, dst, offsets, edge_graph, edge_weight, edge_bias, centres,
     scal, perm, colptr) = saved
    need_xp, need_vec, need_pos, need_cell, need_w, need_b = need
    n, h = vec.shape[0], vec.shape[2]
    r = centres.shape[0]
    e_count = src.shape[0]
    need_geom = need_pos or need_cell
    need_wb = need_w or need_b
    if n == 0:
        return (x_proj.new_zeros(x_proj.shape), vec.new_zeros(vec.shape), torch.zeros_like(positions),
                torch.zeros_like(cells), torch.zeros_like(edge_weight), torch.zeros_like(edge_bias))
    gxp = alloc((n, 3 * h), x_proj)
    gvec = alloc((n, 3, h), x_proj)
    n_hb = triton.cdiv(h, cfg.block_h)
    npp = cfg.bwd_nodes_per_program
    n_prog = triton.cdiv(n, npp)
    # One slice per program row, each written once (no zeroing needed); summed in fixed order.
    gw_part = alloc((n_prog, 3 * h, r), x_proj) if need_wb else x_proj.new_empty(0)
    gb_part = alloc((n_prog, 3 * h), x_proj) if need_wb else x_proj.new_empty(0)
    gd_part = alloc((3 * n_hb, e_count), x_proj) if need_geom else x_proj.new_empty(0)
    gu_part = alloc((n_hb, 3, e_count), x_proj) if need_geom else x_proj.new_empty(0)
    # Basis, its d-derivative and u of every edge, in source order: evaluated once here, read by
    # every channel block of the backward.
    f_buf = alloc((e_count, r), x_proj)
    df_buf = alloc((e_count, r), x_proj) if need_geom else x_proj.new_empty(0)
    u_buf = alloc((3, e_count), x_proj)
    if e_count:
        _mp_basis_kernel[(triton.cdiv(e_count, cfg.basis_block_e),)](
            positions, cells, src, dst, offsets, edge_graph, perm, centres, scal, f_buf, df_buf, u_buf, e_count,
            R=r, NEED_GEOM=need_geom, BLOCK_E=cfg.basis_block_e, BLOCK_K=cfg.block_k,
            num_warps=cfg.basis_num_warps,
        )
    _mp_bwd_kernel[(n_prog, n_hb, 3)](
        x_proj, vec, dst, edge_weight, edge_bias, scal, colptr, perm, f_buf, df_buf, u_buf,
        gds, gdv, gxp, gvec, gw_part, gb_part, gd_part, gu_part,
        n, h, e_count, npp,
        R=r, NEED_W=need_wb, NEED_GEOM=need_geom,
        BLOCK_E=cfg.bwd_block_e, BLOCK_H=cfg.block_h, BLOCK_K=cfg.bwd_block_k,
        PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.bwd_num_stages,
    )
    g_w = gw_part.sum(0) if need_wb else None
    g_b = gb_part.sum(0) if need_wb else None
    g_pos = g_cell = None
    if need_geom:
        g_pos, g_cell = _geometry_gradient(gd_part, gu_part, perm, positions, cells, src, dst, offsets,
                                           edge_graph, need_pos, need_cell)
    return (gxp if need_xp else None), (gvec if need_vec else None), g_pos, g_cell, g_w, g_b


class _FusedMessagePassing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_proj, vec, positions, cells, edge_weight, edge_bias, src, dst, offsets, edge_graph,
                centres, scal, rowptr, perm, colptr, cfg):
        ds, dv = _forward(x_proj, vec, positions, cells, src, offsets, edge_graph, edge_weight, edge_bias,
                          centres, scal, rowptr, cfg)
        ctx.save_for_backward(x_proj, vec, positions, cells, src, dst, offsets, edge_graph, edge_weight,
                              edge_bias, centres, scal, perm, colptr)
        ctx.cfg = cfg
        return ds, dv

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gds, gdv):
        need = ctx.needs_input_grad[:6]
        grads = _backward(gds.contiguous(), gdv.contiguous(), ctx.saved_tensors, need, ctx.cfg)
        return (*grads, *([None] * 10))


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
    cfg.check(dtype, "bwd_block_e")
    if cfg.bwd_block_k < 16:
        raise ValueError("bwd_block_k must be >= 16 (tl.dot tile minimum)")
    src = edge_index[0].to(torch.int64).contiguous()
    dst = edge_index[1].to(torch.int64).contiguous()
    inputs = (x_proj, vec, positions, cells, edge_weight, edge_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        perm, colptr = source_csr(edge_index, n)
    else:
        perm = colptr = src.new_empty(0)
    return _FusedMessagePassing.apply(
        x_proj.contiguous(), vec.contiguous(), positions.contiguous(), cells.contiguous(),
        edge_weight.contiguous(), edge_bias.contiguous(), src, dst,
        cell_offsets.to(dtype).contiguous(), edge_graph.to(torch.int64).contiguous(),
        rbf_centres.to(dtype).contiguous(), scalars(rbf_coeff, cutoff, h, x_proj),
        rowptr.to(torch.int64).contiguous(), perm, colptr, cfg,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU needed): catches errors the interpreter hides.
# ---------------------------------------------------------------------------------------------
def _aligned(types: dict) -> tuple[str, ...]:
    """The parameters Triton's launcher would see as multiples of 16 at H = 512: every pointer
    (fresh tensors are 16-byte aligned) and H."""
    return tuple(name for name, t in types.items() if t.startswith("*") or name == "H")


def aot_compile(dtype: torch.dtype = torch.float32, hidden: int = 512, num_rbf: int = 128,
                arch: int = 90, config: KernelConfig | None = None,
                kernels: tuple[str, ...] = ("fwd", "bwd", "bwd_basis")) -> dict:
    """Compile the forward (``"fwd"``) and the backward (``"bwd"``, every gradient term: all three
    chunks in one kernel) for ``sm_{arch}`` without a device, with the tiles the GPU defaults would
    use (or ``config``'s).

    Returns ``{kernel name: compiled kernel}`` (``.asm`` holds ``ttgir``/``ptx``/``cubin``).
    """
    tiles = (config or KernelConfig()).with_defaults(gpu_tiles(dtype, hidden))
    fp = "*fp32" if dtype == torch.float32 else "*fp64"
    gate_tiles = {"R": num_rbf, "BLOCK_H": tiles.block_h, "BLOCK_K": tiles.block_k,
                  "PRECISION": tiles.input_precision}
    common = {"xp_ptr": fp, "vec_ptr": fp, "pos_ptr": fp, "cell_ptr": fp, "off_ptr": fp, "eg_ptr": "*i64",
              "w_ptr": fp, "b_ptr": fp, "mu_ptr": fp, "scal_ptr": fp, "N": "i32", "H": "i32"}
    out = {}
    if "fwd" in kernels:
        types = {**common, "src_ptr": "*i64", "rowptr_ptr": "*i64", "ds_ptr": fp, "dv_ptr": fp}
        consts = {**gate_tiles, "BLOCK_E": tiles.block_e, "NODES": tiles.fwd_nodes_per_program or 1}
        out["fwd"] = compile_for_gpu(_mp_fwd_kernel, types, consts, arch, tiles.num_warps, tiles.num_stages,
                                     tiles.fwd_maxnreg, _aligned(types))
    if "bwd" in kernels:
        types = {"xp_ptr": fp, "vec_ptr": fp, "dst_ptr": "*i64", "w_ptr": fp, "b_ptr": fp, "scal_ptr": fp,
                 "colptr_ptr": "*i64", "perm_ptr": "*i64", "f_ptr": fp, "df_ptr": fp, "u_ptr": fp, "gds_ptr": fp,
                 "gdv_ptr": fp, "gxp_ptr": fp, "gvec_ptr": fp, "gw_ptr": fp, "gb_ptr": fp, "gd_ptr": fp,
                 "gu_ptr": fp, "N": "i32", "H": "i32", "E": "i32", "nodes_per_program": "i32"}
        consts = {**gate_tiles, "BLOCK_K": tiles.bwd_block_k, "BLOCK_E": tiles.bwd_block_e, "NEED_W": True,
                  "NEED_GEOM": True}
        out["bwd"] = compile_for_gpu(_mp_bwd_kernel, types, consts, arch, tiles.num_warps, tiles.bwd_num_stages,
                                     None, _aligned(types))
    if "bwd_basis" in kernels:
        types = {"pos_ptr": fp, "cell_ptr": fp, "src_ptr": "*i64", "dst_ptr": "*i64", "off_ptr": fp,
                 "eg_ptr": "*i64", "perm_ptr": "*i64", "mu_ptr": fp, "scal_ptr": fp, "f_ptr": fp, "df_ptr": fp,
                 "u_ptr": fp, "E": "i32"}
        consts = {"R": num_rbf, "NEED_GEOM": True, "BLOCK_E": tiles.basis_block_e, "BLOCK_K": tiles.block_k}
        out["bwd_basis"] = compile_for_gpu(_mp_basis_kernel, types, consts, arch, tiles.basis_num_warps, 1, None,
                                           _aligned(types))
    return out
