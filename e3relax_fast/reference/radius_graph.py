"""Periodic radius graph with a deterministic per-centre top-K cut (spec §3): the pure-PyTorch oracle.

This module is the exact reference that the C++/CUDA/Triton neighbour-list kernels are tested
against, so every step is written to be mirrored one-for-one by a per-centre kernel:

1. **Candidates** (§3.1). For centre ``i`` of crystal ``g`` every pair ``(j, o)`` with ``j`` in the
   same crystal, ``o`` in Z^3 and ``d = |p_j + o @ C - p_i| <= radius`` (inclusive), except the
   zero-offset self pair ``(i, 0)``. Periodic self-images ``(i, o != 0)`` ARE candidates.
2. **Image enumeration.** ``reach_k = radius * ||inv(C)[:, k]||`` is the largest fractional
   coordinate along axis ``k`` of any vector of length ``<= radius`` (``f_k = r . inv(C)[:, k]``,
   Cauchy-Schwarz), plus a tiny margin. This holds for skewed cells and for cells far smaller
   than the radius. With fractional coordinates ``f = p @ inv(C)``, integer shifts ``s = floor(f)``
   and wrapped coordinates ``w = f - s``, the pair ``(i, j)`` can only have candidates at wrapped
   offsets ``o'_k`` in ``[ceil(-reach_k - df_k), floor(reach_k - df_k)]`` with ``df = w_j - w_i``.
   The offset of the GIVEN (unwrapped) positions is ``o = o' - s_j + s_i`` (exact integers).
   The range only has to be a superset: membership is decided by the distance test alone, so any
   kernel enumerating any superset of images finds exactly the same candidates.
3. **Distance** (the one float operation that decides membership and order), float64, in this
   exact order, elementwise with IEEE round-to-nearest and NO fused multiply-add::

       dp    = p[j] - p[i]                                  # per component
       shift = ((o0 * a + o1 * b) + o2 * c)                 # a, b, c = rows of the cell, o as float64
       r     = dp + shift
       d     = sqrt((r_x * r_x + r_y * r_y) + r_z * r_z)   # correctly rounded sqrt (see sqrt_rn)

   CUDA kernels must use ``__dmul_rn``/``__dadd_rn`` (or ``-fmad=false``) to avoid contraction;
   C++ kernels need ``-ffp-contract=off`` (or must not be built with ``-march`` FMA contraction).
4. **Selection** (§3.3). Per centre, sort candidates lexicographically by
   ``(q(d), j, o0, o1, o2)`` with ``q(d) = round(d / 1e-6)`` as int64 (round half to even),
   keep the first ``cap_i = max_neighbors - reserved_i``, then drop the kept pairs with ``j == i``.
5. **Self-image edges** (§3.4). Append six edges ``j = i`` with offsets (0,0,1), (0,1,0), (1,0,0),
   (0,1,1), (1,0,1), (1,1,0), whatever their length.
6. **Layout.** Edges sorted by receiver ``i`` ascending; within a receiver, its kept non-self
   edges in key order followed by its six self-image edges. ``rowptr`` is the CSR over receivers.

The whole batch is processed with tensor operations; the only Python loop is over chunks of
centres, sized so that the number of (pair, image) tests per chunk stays bounded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..geometry import DISTANCE_QUANTUM, REACH_ABS_MARGIN, REACH_REL_MARGIN, SELF_IMAGE_OFFSETS

# Upper bound on (pair, image) tests per chunk of centres. The working set is a few hundred bytes
# per test, so this keeps the peak near 100 MB whatever the batch size (and small chunks stay in
# cache: on CPU, 2^18 was as fast as or faster than larger chunks).
CHUNK_WORK = 1 << 18


def edge_lengths(pos: Tensor, cells: Tensor, graph_of_atom: Tensor, i: Tensor, j: Tensor, o: Tensor) -> Tensor:
    """Float64 lengths ``|p_j + o @ C_g - p_i|`` in the fixed operation order of the module docstring.

    Args:
        pos: ``(N, 3)`` float64 Cartesian positions, Å.
        cells: ``(G, 3, 3)`` float64 cells, Å, rows = lattice vectors a, b, c.
        graph_of_atom: ``(N,)`` int64 crystal of each atom.
        i: ``(E,)`` int64 centre (target) atoms.
        j: ``(E,)`` int64 neighbour (source) atoms, same crystal as ``i``.
        o: ``(E, 3)`` int64 image offsets of ``j``.

    Returns:
        ``(E,)`` float64 distances in Å.
    """
    cell = cells[graph_of_atom[i]]  # (E, 3, 3)
    of = o.to(torch.float64)
    dp = pos[j] - pos[i]
    # Separate multiply and add ops: eager PyTorch never fuses them, so the rounding sequence is
    # exactly the documented one.
    shift = of[:, 0:1] * cell[:, 0]
    shift = shift + of[:, 1:2] * cell[:, 1]
    shift = shift + of[:, 2:3] * cell[:, 2]
    r = dp + shift
    # Explicit left-to-right sum (a reduction kernel could reorder it).
    return sqrt_rn(r[:, 0] * r[:, 0] + r[:, 1] * r[:, 1] + r[:, 2] * r[:, 2])


def sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded (IEEE round-to-nearest) float64 square root, on any device.

    ``torch.sqrt`` on CPU sends contiguous float64 tensors through MKL's vector math library, which
    is not correctly rounded (about 1% of results are 1 ulp off), so it would disagree with
    ``std::sqrt``, CUDA's ``sqrt`` and NumPy. On CPU the root is therefore taken with NumPy (IEEE
    ``sqrtpd``); on CUDA ``torch.sqrt`` of a double is already IEEE round-to-nearest.
    """
    if x.device.type == "cpu":
        return torch.from_numpy(np.sqrt(x.detach().contiguous().numpy()))
    return torch.sqrt(x)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """``(n,)`` int64 -> ``(n,)`` start offsets ``[0, x0, x0+x1, ...]``."""
    return torch.cumsum(x, 0) - x


def _ragged_arange(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For counts ``(n,)`` return ``(owner, local)``, both ``(sum(counts),)`` int64: element ``t`` of
    the concatenation of ``arange(counts[k])`` belongs to ``owner[t] = k`` and has value ``local[t]``."""
    n = counts.shape[0]
    owner = torch.repeat_interleave(torch.arange(n, device=counts.device), counts)
    local = torch.arange(owner.shape[0], device=counts.device) - _exclusive_cumsum(counts)[owner]
    return owner, local


def _chunk_bounds(work: Tensor, budget: int) -> list[tuple[int, int]]:
    """Split centres ``0..N-1`` into contiguous ranges whose summed ``work`` is ``<= budget``
    (a single centre heavier than the budget gets a range of its own). One host sync."""
    cum = torch.cumsum(work, 0).cpu()
    n = cum.shape[0]
    bounds, start, done = [], 0, 0
    while start < n:
        # Last centre whose cumulative work still fits; at least one centre per chunk.
        stop = int(torch.searchsorted(cum, done + budget, right=True))
        stop = max(stop, start + 1)
        bounds.append((start, stop))
        done = int(cum[stop - 1])
        start = stop
    return bounds


# The compiled launchers' limits (csrc/radius_graph.h, csrc/module.cpp), checked here with the same
# wording so that every backend refuses the same arguments alike.
MAX_COORD = 1e6
MAX_RADIUS = 1e4
MAX_NEIGHBORS_LIMIT = 1 << 24


def check_arguments(pos: Tensor, cell: Tensor, ptr: Tensor, radius: float, max_neighbors: int,
                    reserved: Tensor | None) -> None:
    """Raise ``ValueError`` for arguments the compiled builders refuse: shapes, ``ptr`` not a CSR over
    the atoms, a radius outside [0, 1e4) Å, a negative ``max_neighbors``, negative ``reserved``
    entries, positions not finite or beyond 1e6 Å (singular cells are caught where the inverse is
    taken). ``pos`` ``(N, 3)`` and ``cell`` ``(G, 3, 3)`` float64, ``ptr`` int64."""
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError("radius_graph: cells must have shape (G, 3, 3)")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError("radius_graph: positions must have shape (N, 3)")
    if ptr.dim() != 1 or ptr.shape[0] != cell.shape[0] + 1:
        raise ValueError("radius_graph: ptr must have G + 1 entries")
    if ptr[0] != 0 or ptr[-1] != pos.shape[0] or bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError("radius_graph: ptr must be a CSR over the atoms (ptr[0] == 0, non-decreasing, ptr[-1] == N)")
    if not 0.0 <= radius < MAX_RADIUS:  # also false for NaN
        raise ValueError("radius_graph: radius must be in [0, 1e4)")
    if not 0 <= max_neighbors <= MAX_NEIGHBORS_LIMIT:
        raise ValueError("radius_graph: max_neighbors must be in [0, 2^24]")
    if reserved is not None:
        if reserved.shape != (pos.shape[0],):
            raise ValueError("radius_graph: reserved must have one entry per atom")
        if bool((reserved.to(torch.int64) < 0).any()):
            raise ValueError("radius_graph: reserved must be >= 0")
    if not bool((pos.abs() <= MAX_COORD).all()):  # NaN fails the comparison too
        raise ValueError("radius_graph: positions must be finite with |p| <= 1e6 Å")


def radius_graph(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    radius: float = 6.0,
    max_neighbors: int = 50,
    reserved: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Periodic radius graph of a ragged batch with the deterministic top-K rule of spec §3.3.

    Args:
        positions: ``(N, 3)`` float32/float64 Cartesian positions in Å, used as given (not wrapped).
        cells: ``(G, 3, 3)`` cells in Å; rows are the lattice vectors a, b, c (non-singular).
        ptr: ``(G+1,)`` int64 CSR; the atoms of crystal g are ``ptr[g]:ptr[g+1]``.
        radius: candidate radius in Å; a pair at exactly ``radius`` is a candidate.
        max_neighbors: K of the per-centre cut, counted over all candidates including periodic
            self-images (which are removed after the cut).
        reserved: optional ``(N,)`` 0/1 (int or bool); centre i keeps at most
            ``max_neighbors - reserved[i]`` candidates (emulates the original's 49-slot effect).

    Returns:
        ``(edge_index, cell_offsets, rowptr, distances, num_candidates)`` on ``positions.device``:

        - edge_index: ``(2, E)`` int64; row 0 = source j, row 1 = target i (global atom indices).
        - cell_offsets: ``(E, 3)`` int64 image of the source; ``r = p[j] + o @ C - p[i]`` (Å).
        - rowptr: ``(N+1,)`` int64 CSR over receivers (edges are sorted by receiver).
        - distances: ``(E,)`` float64 edge lengths in Å (self-image edges included).
        - num_candidates: ``(N,)`` int64 candidates per centre before the cut.
    """
    # Long on purpose: this is the oracle the kernels are checked against, written as the module
    # docstring's steps 1-6 in order, top to bottom, so that each kernel's steps can be read beside it.
    device = positions.device
    i64, f64 = torch.int64, torch.float64
    # All geometry in float64, whatever the input dtype (float32 values upcast exactly).
    pos = positions.detach().to(f64)
    cell = cells.detach().to(device=device, dtype=f64)
    ptr = ptr.to(device=device, dtype=i64)
    check_arguments(pos, cell, ptr, radius, max_neighbors, reserved)
    n_atoms = pos.shape[0]
    n_graphs = cell.shape[0]

    if n_atoms == 0:
        return (
            torch.zeros(2, 0, dtype=i64, device=device),
            torch.zeros(0, 3, dtype=i64, device=device),
            torch.zeros(1, dtype=i64, device=device),
            torch.zeros(0, dtype=f64, device=device),
            torch.zeros(0, dtype=i64, device=device),
        )

    # --- per-crystal and per-atom quantities ---------------------------------------------------
    atoms_per_graph = ptr[1:] - ptr[:-1]  # (G,)
    graph_of_atom = torch.repeat_interleave(torch.arange(n_graphs, device=device), atoms_per_graph)
    inv = torch.linalg.inv(cell)  # (G, 3, 3); f = p @ inv(C) for row-vector lattice rows
    # Fractional extent of the sphere along each axis: max over |r| <= radius of r . inv[:, k].
    reach = radius * torch.linalg.vector_norm(inv, dim=1)  # (G, 3): column norms
    reach = reach * (1.0 + REACH_REL_MARGIN) + REACH_ABS_MARGIN
    if not bool(torch.isfinite(reach).all()):
        raise ValueError("radius_graph: every cell must be finite and non-singular")

    # Fractional coordinates. Their rounding only shifts the enumerated image ranges by ~1e-16,
    # which the reach margin absorbs; they never enter a distance, so kernels need not match them.
    frac = torch.einsum("nk,nkl->nl", pos, inv[graph_of_atom])  # (N, 3)
    shift_int = torch.floor(frac)  # s: integer shift, kept as float64 for the wrap ...
    wrapped = frac - shift_int  # ... w = f - s in [0, 1] (exact subtraction; 1.0 only by rounding)
    shift_int = shift_int.to(i64)

    # Hard upper bound on images per pair: a closed interval of length 2*reach_k holds at most
    # floor(2*reach_k) + 1 integers. Used only to size chunks (never for correctness).
    images_per_pair = (torch.floor(2.0 * reach) + 1.0).prod(dim=1).to(i64)  # (G,)
    work = (atoms_per_graph * images_per_pair)[graph_of_atom]  # (N,) image tests per centre

    cap = torch.full((n_atoms,), max_neighbors, dtype=i64, device=device)
    if reserved is not None:
        cap = cap - reserved.to(device=device, dtype=i64)
    cap = cap.clamp_min(0)

    num_candidates = torch.zeros(n_atoms, dtype=i64, device=device)
    kept_i, kept_j, kept_o, kept_d = [], [], [], []

    for c0, c1 in _chunk_bounds(work, CHUNK_WORK):
        # --- (i, j) pairs of this chunk of centres: j runs over the centre's crystal -----------
        centres = torch.arange(c0, c1, device=device)
        g_c = graph_of_atom[c0:c1]
        owner, local = _ragged_arange(atoms_per_graph[g_c])
        pi = centres[owner]
        pj = ptr[g_c][owner] + local
        pg = g_c[owner]

        # --- ragged per-pair image ranges in the wrapped frame --------------------------------
        df = wrapped[pj] - wrapped[pi]  # (P, 3) in [-1, 1]
        lo = torch.ceil(-reach[pg] - df).to(i64)
        hi = torch.floor(reach[pg] - df).to(i64)
        extent = (hi - lo + 1).clamp_min(0)  # (P, 3) images per axis
        n_img = extent.prod(dim=1)  # (P,)

        # --- enumerate (pair, image) tests: row-major over (o'0, o'1, o'2) ----------------------
        pair, t = _ragged_arange(n_img)
        e = extent[pair]  # every listed pair has all extents >= 1
        o2 = t % e[:, 2]
        o1 = (t // e[:, 2]) % e[:, 1]
        o0 = t // (e[:, 2] * e[:, 1])
        o_wrapped = lo[pair] + torch.stack((o0, o1, o2), dim=1)
        i = pi[pair]
        j = pj[pair]
        # Offset relative to the given positions, exact in integers: with p = (w + s) C,
        # p_j + o C - p_i = (df + o') C exactly when o = o' - s_j + s_i.
        o = o_wrapped - shift_int[j] + shift_int[i]
        del pair, t, e, o0, o1, o2, o_wrapped

        d = edge_lengths(pos, cell, graph_of_atom, i, j, o)
        is_zero_self = (i == j) & (o == 0).all(dim=1)
        keep = (d <= radius) & ~is_zero_self
        i, j, o, d = i[keep], j[keep], o[keep], d[keep]

        # --- selection: lexicographic (i, q(d), j, o0, o1, o2) by stable sorts, least significant
        # key first; a per-centre kernel sorts its own list by (q, j, o0, o1, o2) identically.
        q = torch.round(d / DISTANCE_QUANTUM).to(i64)
        perm = torch.arange(i.shape[0], device=device)
        for key in (o[:, 2], o[:, 1], o[:, 0], j, q, i):
            perm = perm[torch.sort(key[perm], stable=True).indices]
        i, j, o, d = i[perm], j[perm], o[perm], d[perm]

        # Rank of each candidate within its centre, then the cap, then drop periodic self-images.
        counts = torch.bincount(i - c0, minlength=c1 - c0)
        num_candidates[c0:c1] = counts
        rank = torch.arange(i.shape[0], device=device) - _exclusive_cumsum(counts)[i - c0]
        keep = (rank < cap[i]) & (j != i)
        kept_i.append(i[keep])
        kept_j.append(j[keep])
        kept_o.append(o[keep])
        kept_d.append(d[keep])

    # --- the six fixed self-image edges per atom (§3.4) ----------------------------------------
    self_off = torch.tensor(SELF_IMAGE_OFFSETS, dtype=i64, device=device)
    self_i = torch.arange(n_atoms, device=device).repeat_interleave(len(SELF_IMAGE_OFFSETS))
    self_o = self_off.repeat(n_atoms, 1)
    self_d = edge_lengths(pos, cell, graph_of_atom, self_i, self_i, self_o)

    # --- layout: receiver-major; a stable sort on i keeps, within a receiver, the non-self edges
    # (already in key order, and listed first) ahead of its six self-image edges.
    i = torch.cat(kept_i + [self_i])
    j = torch.cat(kept_j + [self_i])
    o = torch.cat(kept_o + [self_o])
    d = torch.cat(kept_d + [self_d])
    perm = torch.sort(i, stable=True).indices
    i, j, o, d = i[perm], j[perm], o[perm], d[perm]

    rowptr = torch.zeros(n_atoms + 1, dtype=i64, device=device)
    rowptr[1:] = torch.cumsum(torch.bincount(i, minlength=n_atoms), 0)
    return torch.stack((j, i)), o, rowptr, d, num_candidates
