"""Batched periodic radius graph with the deterministic per-centre top-K cut (spec §3), in Triton.

Twin of :func:`e3relax_fast.reference.radius_graph.radius_graph`: same arguments, same outputs
(integers equal, distances equal to the bit). Three steps, one host synchronisation:

1. **Host preparation** (torch, float64, as the reference): ``inv(C)``, the fractional reach
   ``reach_k = R ||inv(C)[:, k]||`` (with the reference's margins), fractional coordinates
   ``f = p inv(C)``, integer shifts ``s = floor(f)``, wrapped ``w = f - s``, and for every centre
   ``i`` an *image box* of wrapped-frame offsets ``o'_k in [ceil(w_ik - 1 - reach_k),
   floor(w_ik + reach_k)]``, which contains the reference's per-pair ranges for every ``j`` of the
   crystal (``w_jk`` in [0, 1]); a tiny extra margin absorbs rounding. Any superset of the
   candidate images gives the same candidates: the exact distance test alone decides.

2. **Selection** (``_rg_select_kernel``, one program per centre). The program walks the
   flattened (image, atom) tests of its box in blocks of ``BLOCK`` (atom index fastest, so the
   loads of ``p_j``/``s_j`` are contiguous; on CUDA ``BLOCK = 32 x num_warps``, one test per lane;
   test indices in int64), forms ``o = o' + s_i - s_j`` and the float64 length
   in the documented order with explicitly rounded, never fused operations (PTX ``mul.rn.f64``,
   ``add.rn.f64``, ``sub.rn.f64``, ``div.rn.f64``, ``sqrt.rn.f64`` through
   ``tl.inline_asm_elementwise`` when compiled for CUDA; plain numpy arithmetic, which never fuses,
   under the interpreter), counts the candidates, and keeps the best ``cap_i`` in a sorted top-K
   buffer of ``KB`` slots held in a per-program scratch row (global memory, L1/L2 resident). Key of
   a candidate: two int64 words ``w1 = q << 32 | (j - start)`` and ``w2 = o'`` packed as three
   20-bit biased fields (below the empty-slot sentinel 2**62); their lexicographic order is the
   reference's ``(q, j, o0, o1, o2)`` order, because for one ``j`` the offsets ``o`` and ``o'``
   differ by the constant ``s_i - s_j``. Candidates not below the current ``cap_i``-th key are
   discarded at once; when any survive, the block is merged with the buffer by a sort-free rank
   computation (rank = number of smaller keys, from broadcast comparisons block x block and
   block x buffer), and every entry with rank < ``cap_i`` is stored at its rank (``tl.debug_barrier``
   around the scratch traffic). Keys are unique, so ranks are a permutation and the result does not
   depend on the enumeration order or the block size. The block is staged through the scratch row
   too: reloading it as a column and as a row gives the comparison matrices their own register
   layouts (without it, ptxas spilled heavily: the distance path inherited a replicated layout).
   Finally the kept periodic self-images (``j == i``) are dropped, the others compacted in key
   order (exclusive prefix sum), and ``(j, o)`` stored to a per-centre slice of ``KB`` slots.

3. **Layout** (``_rg_fill_kernel``, one program per centre). ``rowptr`` is the cumulative sum of
   ``kept_i + 6`` (torch); the total edge count is read once (the only host sync) to allocate the
   outputs; each program writes its kept edges then its six self-image edges, recomputing every
   length with the same exact arithmetic.

No global sort, no atomics: the output is deterministic. Limits (reported as ``ValueError`` after
the run, never as a hang): every cell finite and non-singular, at most 2048 images per box axis,
fewer than 2**31 (image, atom) tests per centre (its own message: a cell many times smaller than the
radius), ``radius < 1000`` Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..geometry import DISTANCE_QUANTUM, REACH_ABS_MARGIN, REACH_REL_MARGIN
from .utils import LaunchConfig, compile_for_gpu, empty, interpreting

# Extra fractional margin of the per-centre image box (covers the rounding of w_j - w_i).
BOX_MARGIN = 1e-9
# Largest image box extent per axis (o' is packed into 20-bit fields; this is far below).
MAX_EXTENT = 2048
MAX_RADIUS = 1000.0  # q(d) < 2**30 keeps w1 = q << 32 | j below the sentinel 2**62
# (image, atom) tests per centre must stay below this: the count travels as int32.
MAX_TESTS = 2**31
# Poison of the integer outputs under utils.POISON_OUTPUTS (a value no output takes).
INT_POISON = -7


# ---------------------------------------------------------------------------------------------
# Exact float64 arithmetic: one IEEE round-to-nearest per operation, never contracted to FMA.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mul(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise("mul.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                         is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def _add(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise("add.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                         is_pure=True, pack=1)
    else:
        return a + b


@triton.jit
def _sub(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise("sub.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                         is_pure=True, pack=1)
    else:
        return a - b


@triton.jit
def _div(a, b, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise("div.rn.f64 $0, $1, $2;", "=d,d,d", [a, b], dtype=tl.float64,
                                         is_pure=True, pack=1)
    else:
        return a / b


@triton.jit
def _sqrt(a, EXACT: tl.constexpr):
    if EXACT:
        return tl.inline_asm_elementwise("sqrt.rn.f64 $0, $1;", "=d,d", [a], dtype=tl.float64,
                                         is_pure=True, pack=1)
    else:
        return tl.sqrt(a)


@triton.jit
def _edge_length(dpx, dpy, dpz, o0, o1, o2, cell_base, EXACT: tl.constexpr):
    """|dp + o C| in the reference's order: shift = ((o0 a + o1 b) + o2 c); r = dp + shift;
    d = sqrt((rx rx + ry ry) + rz rz). ``o*`` are float64, ``cell_base`` points at rows a, b, c."""
    ax = tl.load(cell_base + 0)
    ay = tl.load(cell_base + 1)
    az = tl.load(cell_base + 2)
    bx = tl.load(cell_base + 3)
    by = tl.load(cell_base + 4)
    bz = tl.load(cell_base + 5)
    cx = tl.load(cell_base + 6)
    cy = tl.load(cell_base + 7)
    cz = tl.load(cell_base + 8)
    sx = _add(_add(_mul(o0, ax, EXACT), _mul(o1, bx, EXACT), EXACT), _mul(o2, cx, EXACT), EXACT)
    sy = _add(_add(_mul(o0, ay, EXACT), _mul(o1, by, EXACT), EXACT), _mul(o2, cy, EXACT), EXACT)
    sz = _add(_add(_mul(o0, az, EXACT), _mul(o1, bz, EXACT), EXACT), _mul(o2, cz, EXACT), EXACT)
    rx = _add(dpx, sx, EXACT)
    ry = _add(dpy, sy, EXACT)
    rz = _add(dpz, sz, EXACT)
    rr = _add(_add(_mul(rx, rx, EXACT), _mul(ry, ry, EXACT), EXACT), _mul(rz, rz, EXACT), EXACT)
    return _sqrt(rr, EXACT)


@triton.jit
def _key_less(x1, x2, y1, y2):
    """Lexicographic (x1, x2) < (y1, y2) on int64 words (broadcasting)."""
    return (x1 < y1) | ((x1 == y1) & (x2 < y2))


# ---------------------------------------------------------------------------------------------
# Selection: candidates, count, top-K per centre
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rg_select_kernel(
    pos_ptr, cell_ptr, scal_ptr, shift_ptr, meta_ptr,
    kept_ptr, kcount_ptr, ncand_ptr, scratch_ptr,
    BLOCK: tl.constexpr, KB: tl.constexpr, EXACT: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    INF: tl.constexpr = 1 << 62
    BIAS: tl.constexpr = 1 << 19
    # meta row: g, start, n, lo0, lo1, lo2, e0, e1, e2, ntests, cap, pad
    mrow = meta_ptr + i * 12
    g = tl.load(mrow + 0).to(tl.int64)
    start = tl.load(mrow + 1)
    n = tl.load(mrow + 2)
    lo0 = tl.load(mrow + 3)
    lo1 = tl.load(mrow + 4)
    lo2 = tl.load(mrow + 5)
    e1 = tl.load(mrow + 7)
    e2 = tl.load(mrow + 8)
    # Test counters in int64: t0 + lane passes 2**31 - 1 in the last block when ntests is near it.
    ntests = tl.load(mrow + 9).to(tl.int64)
    cap = tl.load(mrow + 10)
    radius = tl.load(scal_ptr + 0)
    quantum = tl.load(scal_ptr + 1)
    il = i.to(tl.int32) - start  # local index of the centre
    pix = tl.load(pos_ptr + i * 3 + 0)
    piy = tl.load(pos_ptr + i * 3 + 1)
    piz = tl.load(pos_ptr + i * 3 + 2)
    si0 = tl.load(shift_ptr + i * 3 + 0)
    si1 = tl.load(shift_ptr + i * 3 + 1)
    si2 = tl.load(shift_ptr + i * 3 + 2)
    cell_base = cell_ptr + g * 9

    kidx = tl.arange(0, KB)
    lane = tl.arange(0, BLOCK).to(tl.int64)
    # The sorted top-K buffer lives in this program's scratch row: keys w1 at [0, KB), w2 at
    # [KB, 2 KB), its first nbuf slots filled; [2 KB, 2 KB + 2 BLOCK) stages a block of candidates.
    # Threshold: the cap-th key (INF while the buffer is not full; below every key when cap == 0).
    t1 = tl.max(tl.where(kidx < cap, INF, -1).to(tl.int64), axis=0)
    t2 = tl.min(tl.full([KB], INF, tl.int64), axis=0)
    ncand = tl.sum(tl.zeros([BLOCK], dtype=tl.int64), axis=0)
    nbuf = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)  # filled slots of the buffer
    scr_ptr = scratch_ptr + i * (2 * KB + 2 * BLOCK)

    for t0 in range(0, ntests, BLOCK):
        t = t0 + lane
        valid = t < ntests
        img = t // n
        jl = t - img * n
        o2p = img % e2
        rest = img // e2
        o1p = rest % e1
        o0p = rest // e1 + lo0
        o1p = o1p + lo1
        o2p = o2p + lo2
        j = (start + jl).to(tl.int64)
        sj0 = tl.load(shift_ptr + j * 3 + 0, mask=valid, other=0)
        sj1 = tl.load(shift_ptr + j * 3 + 1, mask=valid, other=0)
        sj2 = tl.load(shift_ptr + j * 3 + 2, mask=valid, other=0)
        pjx = tl.load(pos_ptr + j * 3 + 0, mask=valid, other=0.0)
        pjy = tl.load(pos_ptr + j * 3 + 1, mask=valid, other=0.0)
        pjz = tl.load(pos_ptr + j * 3 + 2, mask=valid, other=0.0)
        f0 = (o0p + si0 - sj0).to(tl.float64)
        f1 = (o1p + si1 - sj1).to(tl.float64)
        f2 = (o2p + si2 - sj2).to(tl.float64)
        d = _edge_length(_sub(pjx, pix, EXACT), _sub(pjy, piy, EXACT), _sub(pjz, piz, EXACT), f0, f1, f2,
                         cell_base, EXACT)
        zero_self = (jl == il) & (o0p == 0) & (o1p == 0) & (o2p == 0)
        cand = valid & (d <= radius) & (~zero_self)
        ncand += tl.sum(cand.to(tl.int64), axis=0)
        # q = round(d / quantum), half to even: x + 0.5 and r - x are exact for x < 2**52.
        x = _div(tl.where(cand, d, 0.0), quantum, EXACT)
        r = tl.floor(x + 0.5)
        qi = r.to(tl.int64)
        q = qi - ((r - x == 0.5) & ((qi & 1) == 1)).to(tl.int64)
        w1 = (q << 32) | jl.to(tl.int64)
        w2 = (((o0p + BIAS).to(tl.int64) << 40) | ((o1p + BIAS).to(tl.int64) << 20)
              | (o2p + BIAS).to(tl.int64))
        keep = cand & _key_less(w1, w2, t1, t2)
        if tl.sum(keep.to(tl.int32), axis=0) > 0:
            # The block goes through the scratch row, so that the comparison matrices below get
            # their own register layouts (reloaded as a column and as a row) instead of imposing a
            # replicated one on the distance computation above.
            tl.store(scr_ptr + 2 * KB + lane, tl.where(keep, w1, INF))
            tl.store(scr_ptr + 2 * KB + BLOCK + lane, tl.where(keep, w2, INF))
            tl.debug_barrier()  # the block is written
            cx1 = tl.load(scr_ptr + 2 * KB + lane[:, None])  # [BLOCK, 1]: candidate x
            cx2 = tl.load(scr_ptr + 2 * KB + BLOCK + lane[:, None])
            cy1 = tl.load(scr_ptr + 2 * KB + lane[None, :])  # [1, BLOCK]: candidate y
            cy2 = tl.load(scr_ptr + 2 * KB + BLOCK + lane[None, :])
            bm = kidx[None, :] < nbuf
            bk1 = tl.load(scr_ptr + kidx[None, :], mask=bm, other=INF)  # [1, KB]: buffer entry k
            bk2 = tl.load(scr_ptr + KB + kidx[None, :], mask=bm, other=INF)
            # rank of each block candidate: smaller block keys + smaller buffer keys
            lt_cc = _key_less(cy1, cy2, cx1, cx2)  # [x, y]: c_y < c_x
            lt_bc = _key_less(bk1, bk2, cx1, cx2)  # [x, k]: b_k < c_x
            rank_c = tl.sum(lt_cc.to(tl.int32), axis=1) + tl.sum(lt_bc.to(tl.int32), axis=1)
            # rank of each buffer entry: its index + smaller block keys (keys are distinct)
            lt_cb = (lt_bc == 0) & (cx1 < INF)  # [x, k]: c_x < b_k
            rank_b = kidx + tl.sum(lt_cb.to(tl.int32), axis=0)
            vc1 = tl.sum(cx1, axis=1)  # the same values in the layouts of rank_c / rank_b
            vc2 = tl.sum(cx2, axis=1)
            vb1 = tl.sum(bk1, axis=0)
            vb2 = tl.sum(bk2, axis=0)
            # place every entry at its rank (ranks are a permutation); slots >= cap are dropped
            tl.debug_barrier()  # every thread has read the old buffer
            cm = (vc1 < INF) & (rank_c < cap)
            tl.store(scr_ptr + rank_c, vc1, mask=cm)
            tl.store(scr_ptr + KB + rank_c, vc2, mask=cm)
            bmv = (vb1 < INF) & (rank_b < cap)
            tl.store(scr_ptr + rank_b, vb1, mask=bmv)
            tl.store(scr_ptr + KB + rank_b, vb2, mask=bmv)
            nbuf = tl.minimum(nbuf + tl.sum(keep.to(tl.int32), axis=0), cap)
            tl.debug_barrier()  # the new buffer is written
            # threshold: the cap-th key once the buffer is full
            last = tl.maximum(cap - 1, 0)
            t1 = tl.where(nbuf >= cap, tl.load(scr_ptr + last), INF)
            t2 = tl.where(nbuf >= cap, tl.load(scr_ptr + KB + last), INF)

    b1 = tl.load(scr_ptr + kidx, mask=kidx < nbuf, other=INF)  # the final sorted buffer
    b2 = tl.load(scr_ptr + KB + kidx, mask=kidx < nbuf, other=INF)
    tl.store(ncand_ptr + i, ncand)
    # Drop the kept periodic self-images, compact the rest in key order.
    jb = b1 - ((b1 >> 32) << 32)
    real = b1 < INF
    out = real & (jb != il.to(tl.int64))
    slot = tl.cumsum(out.to(tl.int32), axis=0) - out.to(tl.int32)
    jg = start.to(tl.int64) + jb
    sj0 = tl.load(shift_ptr + jg * 3 + 0, mask=out, other=0)
    sj1 = tl.load(shift_ptr + jg * 3 + 1, mask=out, other=0)
    sj2 = tl.load(shift_ptr + jg * 3 + 2, mask=out, other=0)
    o0 = (b2 >> 40) - BIAS + (si0 - sj0)
    o1 = ((b2 >> 20) & 0xFFFFF) - BIAS + (si1 - sj1)
    o2 = (b2 & 0xFFFFF) - BIAS + (si2 - sj2)
    row = kept_ptr + (i * KB + slot) * 4
    tl.store(row + 0, jg, mask=out)
    tl.store(row + 1, o0, mask=out)
    tl.store(row + 2, o1, mask=out)
    tl.store(row + 3, o2, mask=out)
    tl.store(kcount_ptr + i, tl.sum(out.to(tl.int64), axis=0))


# ---------------------------------------------------------------------------------------------
# Layout: receiver-sorted CSR with the six self-image edges
# ---------------------------------------------------------------------------------------------
@triton.jit
def _rg_fill_kernel(
    pos_ptr, cell_ptr, meta_ptr, kept_ptr, kcount_ptr, rowptr_ptr,
    ei_ptr, off_ptr, dist_ptr, E,
    KB: tl.constexpr, BLOCK_F: tl.constexpr, EXACT: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    g = tl.load(meta_ptr + i * 12).to(tl.int64)
    e0 = tl.load(rowptr_ptr + i)
    kc = tl.load(kcount_ptr + i)
    t = tl.arange(0, BLOCK_F).to(tl.int64)
    m = t < kc + 6
    is_k = t < kc
    row = kept_ptr + (i * KB + t) * 4
    # self-image u = t - kc in 0..5 has offset bits (o0 o1 o2) = 001, 010, 100, 011, 101, 110
    u = t - kc
    pat = tl.where(u == 0, 1, tl.where(u == 1, 2, tl.where(u == 2, 4, tl.where(u == 3, 3,
                                                                                tl.where(u == 4, 5, 6)))))
    j = tl.where(is_k, tl.load(row + 0, mask=is_k, other=0), i)
    o0 = tl.where(is_k, tl.load(row + 1, mask=is_k, other=0), (pat >> 2) & 1)
    o1 = tl.where(is_k, tl.load(row + 2, mask=is_k, other=0), (pat >> 1) & 1)
    o2 = tl.where(is_k, tl.load(row + 3, mask=is_k, other=0), pat & 1)
    pix = tl.load(pos_ptr + i * 3 + 0)
    piy = tl.load(pos_ptr + i * 3 + 1)
    piz = tl.load(pos_ptr + i * 3 + 2)
    pjx = tl.load(pos_ptr + j * 3 + 0, mask=m, other=0.0)
    pjy = tl.load(pos_ptr + j * 3 + 1, mask=m, other=0.0)
    pjz = tl.load(pos_ptr + j * 3 + 2, mask=m, other=0.0)
    d = _edge_length(_sub(pjx, pix, EXACT), _sub(pjy, piy, EXACT), _sub(pjz, piz, EXACT),
                     o0.to(tl.float64), o1.to(tl.float64), o2.to(tl.float64), cell_ptr + g * 9, EXACT)
    e = e0 + t
    tl.store(ei_ptr + e, j, mask=m)
    tl.store(ei_ptr + E + e, tl.zeros_like(j) + i, mask=m)
    tl.store(off_ptr + e * 3 + 0, o0.to(tl.int64), mask=m)
    tl.store(off_ptr + e * 3 + 1, o1.to(tl.int64), mask=m)
    tl.store(off_ptr + e * 3 + 2, o2.to(tl.int64), mask=m)
    tl.store(dist_ptr + e, d, mask=m)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RadiusGraphConfig(LaunchConfig):
    """Launch parameters; ``None`` fields are chosen from the device.

    block: (image, atom) tests per step of the selection loop (power of two, >= 16); num_warps:
    warps per program of the selection kernel, on CUDA by default ``block // 32`` (at least 1) so
    that each lane does one distance test per step (more warps would hold each test twice).
    """

    block: int | None = None


# GPU default block of the selection kernel: 32 tests per step on one warp. From sm_90 AOT
# compiles (Triton 3.6 and 3.9), not timings: 64 tests on 2 warps spilled under 3.9 (the block x
# block and block x KB comparison matrices of the merge), 128 on 4 warps spilled heavily.
GPU_BLOCK = 32


def _tiles(device: torch.device, cfg: RadiusGraphConfig | None) -> tuple[int, int]:
    cfg = cfg or RadiusGraphConfig()
    if interpreting() or device.type != "cuda":
        block = cfg.block or 256  # the interpreter pays per op: big blocks
        return block, cfg.num_warps or 4
    block = cfg.block or GPU_BLOCK
    return block, cfg.num_warps or max(1, block // 32)


def _key_slots(max_neighbors: int) -> int:
    return max(16, triton.next_power_of_2(max(1, int(max_neighbors))))


def prepare(positions: Tensor, cells: Tensor, ptr: Tensor, radius: float, max_neighbors: int,
            reserved: Tensor | None):
    """Host preparation (torch, no host sync): float64 positions and cells, per-atom integer
    shifts, the per-centre metadata rows of the selection kernel, and a 0-d error flag."""
    device = positions.device
    i64, f64 = torch.int64, torch.float64
    pos = positions.detach().to(f64).contiguous()
    cell = cells.detach().to(device=device, dtype=f64).contiguous()
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError("radius_graph: positions must have shape (N, 3)")
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError("radius_graph: cells must have shape (G, 3, 3)")
    if not (0.0 <= float(radius) < MAX_RADIUS):
        raise ValueError(f"radius_graph (triton): radius must be in [0, {MAX_RADIUS}) Å")
    ptr = ptr.to(device=device, dtype=i64)
    n_atoms, n_graphs = pos.shape[0], cell.shape[0]

    atoms_per_graph = ptr[1:] - ptr[:-1]
    graph_of_atom = torch.repeat_interleave(torch.arange(n_graphs, device=device), atoms_per_graph,
                                            output_size=n_atoms)
    inv, info = torch.linalg.inv_ex(cell)  # no error check, no sync
    reach = radius * torch.linalg.vector_norm(inv, dim=1)
    reach = reach * (1.0 + REACH_REL_MARGIN) + REACH_ABS_MARGIN  # (G, 3), as the reference
    bad_graph = (info != 0) | ~torch.isfinite(reach).all(dim=1) | ~torch.isfinite(cell).flatten(1).all(dim=1)
    reach = torch.where(bad_graph[:, None], torch.zeros_like(reach), reach)

    frac = torch.einsum("nk,nkl->nl", pos, inv[graph_of_atom])
    shift = torch.floor(frac)
    wrapped = frac - shift
    ok_atom = torch.isfinite(frac).all(dim=1) & (shift.abs() < 2.0**29).all(dim=1) & ~bad_graph[graph_of_atom]
    wrapped = torch.where(ok_atom[:, None], wrapped, torch.zeros_like(wrapped))
    shift = torch.where(ok_atom[:, None], shift, torch.zeros_like(shift)).to(torch.int32)

    # Per-centre image box in the wrapped frame: a superset of every pair's reference range.
    ra = reach[graph_of_atom]
    lo = torch.ceil(wrapped - 1.0 - ra - BOX_MARGIN)
    hi = torch.floor(wrapped + ra + BOX_MARGIN)
    ext = hi - lo + 1.0
    ok_atom &= (ext <= MAX_EXTENT).all(dim=1)
    ext = torch.where(ok_atom[:, None], ext, torch.ones_like(ext)).to(i64)
    lo = torch.where(ok_atom[:, None], lo, torch.zeros_like(lo)).to(i64)
    natoms = atoms_per_graph[graph_of_atom]
    ntests = natoms * ext.prod(dim=1)
    # The count is stored as int32 (the kernel counts in int64, so any count below 2**31 is safe).
    too_many = ok_atom & (ntests >= MAX_TESTS)
    ok_atom &= ~too_many
    ntests = torch.where(ok_atom, ntests, torch.zeros_like(ntests))

    cap = torch.full((n_atoms,), int(max_neighbors), dtype=i64, device=device)
    if reserved is not None:
        res = reserved.to(device=device, dtype=i64)
        cap = cap - res
    cap = cap.clamp(0, int(max_neighbors))

    meta = torch.stack([graph_of_atom, ptr[graph_of_atom], natoms, lo[:, 0], lo[:, 1], lo[:, 2],
                        ext[:, 0], ext[:, 1], ext[:, 2], ntests, cap, torch.zeros_like(cap)], dim=1)
    meta = meta.to(torch.int32).contiguous()
    error = (~ok_atom & ~too_many).any().to(i64) | (too_many.any().to(i64) << 2)
    if reserved is not None:
        error = error | ((res < 0).any().to(i64) << 1)
    scal = torch.tensor([float(radius), DISTANCE_QUANTUM], dtype=f64, device=device)
    return pos, cell.reshape(n_graphs, 9).contiguous(), scal, shift.contiguous(), meta, error


def radius_graph(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    radius: float = 6.0,
    max_neighbors: int = 50,
    reserved: Tensor | None = None,
    *,
    config: RadiusGraphConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reference's :func:`~e3relax_fast.reference.radius_graph.radius_graph` in Triton.

    Returns ``(edge_index (2, E) int64, cell_offsets (E, 3) int64, rowptr (N+1,) int64,
    distances (E,) float64, num_candidates (N,) int64)`` on ``positions.device``, equal to the
    reference's outputs (distances to the bit). One host synchronisation (the edge count).
    """
    device = positions.device
    i64, f64 = torch.int64, torch.float64
    n_atoms = positions.shape[0]
    if n_atoms == 0:
        return (torch.zeros(2, 0, dtype=i64, device=device), torch.zeros(0, 3, dtype=i64, device=device),
                torch.zeros(1, dtype=i64, device=device), torch.zeros(0, dtype=f64, device=device),
                torch.zeros(0, dtype=i64, device=device))
    pos, cell, scal, shift, meta, error = prepare(positions, cells, ptr, radius, max_neighbors, reserved)
    block, warps = _tiles(device, config)
    kb = _key_slots(max_neighbors)
    exact = device.type == "cuda" and not interpreting()

    kept = empty((n_atoms, kb, 4), i64, device, INT_POISON)
    kcount = empty((n_atoms,), i64, device, INT_POISON)
    ncand = empty((n_atoms,), i64, device, INT_POISON)
    scratch = torch.empty((n_atoms, 2 * (kb + block)), dtype=i64, device=device)  # read only where written
    _rg_select_kernel[(n_atoms,)](pos, cell, scal, shift, meta, kept, kcount, ncand, scratch,
                                  BLOCK=block, KB=kb, EXACT=exact, num_warps=warps, num_stages=1)

    rowptr = torch.zeros(n_atoms + 1, dtype=i64, device=device)
    rowptr[1:] = torch.cumsum(kcount + 6, 0)
    n_edges, err = torch.stack([rowptr[-1], error]).tolist()  # the one host synchronisation
    if err:
        parts = []
        if err & 1:
            parts.append("every cell must be finite and non-singular, positions finite, and the radius "
                         f"may span at most {MAX_EXTENT} cells per axis")
        if err & 4:
            parts.append("an atom's image box holds 2**31 or more (image, atom) distance tests (cells many "
                         "times smaller than the radius)")
        if err & 2:
            parts.append("reserved must be >= 0")
        raise ValueError("radius_graph (triton): " + "; ".join(parts))

    edge_index = empty((2, n_edges), i64, device, INT_POISON)
    offsets = empty((n_edges, 3), i64, device, INT_POISON)
    dist = empty((n_edges,), f64, device)
    _rg_fill_kernel[(n_atoms,)](pos, cell, meta, kept, kcount, rowptr, edge_index, offsets, dist, n_edges,
                                KB=kb, BLOCK_F=triton.next_power_of_2(kb + 6), EXACT=exact, num_warps=2,
                                num_stages=1)
    return edge_index, offsets, rowptr, dist, ncand


def aot_compile(arch: int = 90, max_neighbors: int = 50, config: RadiusGraphConfig | None = None) -> dict:
    """Compile the selection (``"select"``) and layout (``"fill"``) kernels for ``sm_{arch}``
    without a device, with the GPU defaults. Returns ``{name: compiled kernel}``."""
    block, warps = _tiles(torch.device("cuda"), config)
    kb = _key_slots(max_neighbors)
    sel_types = {"pos_ptr": "*fp64", "cell_ptr": "*fp64", "scal_ptr": "*fp64", "shift_ptr": "*i32", "meta_ptr": "*i32",
                 "kept_ptr": "*i64", "kcount_ptr": "*i64", "ncand_ptr": "*i64", "scratch_ptr": "*i64"}
    fill_types = {"pos_ptr": "*fp64", "cell_ptr": "*fp64", "meta_ptr": "*i32", "kept_ptr": "*i64",
                  "kcount_ptr": "*i64", "rowptr_ptr": "*i64", "ei_ptr": "*i64", "off_ptr": "*i64",
                  "dist_ptr": "*fp64", "E": "i64"}
    return {
        "select": compile_for_gpu(_rg_select_kernel, sel_types, {"BLOCK": block, "KB": kb, "EXACT": True}, arch,
                                  warps),
        "fill": compile_for_gpu(_rg_fill_kernel, fill_types,
                                {"KB": kb, "BLOCK_F": triton.next_power_of_2(kb + 6), "EXACT": True}, arch, 2),
    }
