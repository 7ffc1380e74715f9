"""Op ``radius_graph``: the periodic radius graph (spec §3 and §13, required graph tests 1 and 2).

The reference (e3relax_fast/reference/radius_graph.py), three kinds of evidence:

* the golden graphs of the original pipeline (tests/data/graphs.npz, documented in graphs.json);
* an independent brute-force oracle written here in NumPy (fixed generous image box around the
  nearest image, distances in the documented float64 operation order), compared bit for bit;
* structural invariants (receiver order, CSR, degrees, distances, the self-image block).

Every other backend must then reproduce the reference exactly (integers equal, float64 distances
equal to the bit, outputs on the input's device): ``cpu`` (the C++ launcher; its named paths are in
test_radius_graph_cpu_paths.py), ``cuda`` (marker ``gpu``) and ``triton`` (kernels/radius_graph.py;
without a GPU on Triton's CPU interpreter, about a millisecond per program, one per centre, so fewer
golden structures there; its output buffers start poisoned, NaN / -7, so an unwritten entry fails).
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    DATA,
    INTERPRET,
    SMALL,
    backend_device,
    backend_only,
    backend_params,
    graph_case,
    graph_case_params,
    oracle_lengths,
    random_batch,
    triton_module,
)

import e3relax_fast.reference.radius_graph as rg
from e3relax_fast import BackendUnavailableError, build_graph, graph, ops
from e3relax_fast.ops import compiled
from e3relax_fast.reference.radius_graph import radius_graph

OP = "radius_graph"
SELF_OFFSETS = np.array([(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)], dtype=np.int64)
N_GOLDEN = 26


# --------------------------------------------------------------------------------------------------
# golden data
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden(golden_graphs):
    return golden_graphs, json.loads((DATA / "graphs.json").read_text())


def _golden_inputs(arrays, k):
    pos = torch.from_numpy(arrays[f"s{k}_pos"])
    cell = torch.from_numpy(arrays[f"s{k}_cell"])[None]
    ptr = torch.tensor([0, pos.shape[0]])
    return pos, cell, ptr


def _as_numpy(out):
    return [t.cpu().numpy() for t in out]


def _edge_rows(edge_index, offsets, mask=None):
    """(E, 5) int64 rows (j, i, o0, o1, o2), optionally masked."""
    rows = np.concatenate([edge_index.T, offsets], axis=1).astype(np.int64)
    return rows if mask is None else rows[mask]


def _canonical(rows):
    """Rows in a canonical (lexicographic) order, for exact set comparison."""
    return rows[np.lexsort(rows.T[::-1])] if len(rows) else rows.reshape(0, 5)


def _as_set(rows):
    return {tuple(int(v) for v in r) for r in rows}


def _tie_d50(meta, k):
    """{centre: d50} for the centres of structure k that tie at the original's 50-cut."""
    return {g["atom"]: g["d50"] for g in meta["structures"][k]["tie_groups"]}


# --------------------------------------------------------------------------------------------------
# independent brute-force oracle (NumPy)
# --------------------------------------------------------------------------------------------------
def brute_force(pos, cells, ptr, radius=6.0, max_neighbors=50, reserved=None, centres=None):
    """Every image in a generous box around the nearest image, for every centre separately.

    The box half-width along axis k is ceil(radius / h_k) + 1, with h_k the spacing of the lattice
    planes spanned by the two other lattice vectors (h_k = V / |l_m x l_n|), centred on
    rint(f_i - f_j), so it contains every image within the radius whatever the cell shape and
    however far outside the cell the positions lie.

    Returns ``(per_centre, ncand)``: per_centre[i] = dict(j, o, d) of the final edges of centre i
    (receiver i, in output order) and ``sorted`` = all its candidates as (j, o, d) in key order.
    """
    pos = np.asarray(pos, dtype=np.float64)
    cells = np.asarray(cells, dtype=np.float64)
    ptr = np.asarray(ptr, dtype=np.int64)
    n_atoms = pos.shape[0]
    reserved = np.zeros(n_atoms, dtype=np.int64) if reserved is None else np.asarray(reserved, np.int64)
    centres = range(n_atoms) if centres is None else centres
    wanted = set(centres)
    per_centre, ncand = {}, np.zeros(n_atoms, dtype=np.int64)
    for g in range(cells.shape[0]):
        lo, hi = int(ptr[g]), int(ptr[g + 1])
        todo = [i for i in range(lo, hi) if i in wanted]
        if not todo:
            continue
        C = cells[g]
        volume = abs(np.linalg.det(C))
        spacing = [volume / np.linalg.norm(np.cross(C[(k + 1) % 3], C[(k + 2) % 3])) for k in range(3)]
        half = [math.ceil(radius / h) + 1 for h in spacing]
        axes = [np.arange(-w, w + 1) for w in half]
        box = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)  # (B, 3)
        frac = np.linalg.solve(C.T, pos[lo:hi].T).T  # f with f @ C = p
        js = np.arange(lo, hi)
        for i in todo:
            near = np.rint(frac[i - lo] - frac).astype(np.int64)  # (n, 3) nearest-image offset of j
            o = near[None, :, :] + box[:, None, :]  # (B, n, 3)
            d = oracle_lengths(pos[lo:hi] - pos[i], o, C)  # (B, n)
            j = np.broadcast_to(js, d.shape)
            ok = (d <= radius) & ~((j == i) & (o == 0).all(-1))
            cj, co, cd = j[ok], o[ok], d[ok]
            q = np.round(cd / 1e-6).astype(np.int64)
            order = np.lexsort((co[:, 2], co[:, 1], co[:, 0], cj, q))
            cj, co, cd = cj[order], co[order], cd[order]
            ncand[i] = len(cj)
            cap = max(max_neighbors - int(reserved[i]), 0)
            kj, ko, kd = cj[:cap], co[:cap], cd[:cap]
            keep = kj != i
            sd = oracle_lengths(np.zeros(3), SELF_OFFSETS, C)
            per_centre[i] = {
                "j": np.concatenate([kj[keep], np.full(6, i)]),
                "o": np.concatenate([ko[keep], SELF_OFFSETS]),
                "d": np.concatenate([kd[keep], sd]),
                "sorted": (cj, co, cd),
            }
    return per_centre, ncand


def assert_matches_oracle(out, oracle, centres=None):
    """Exact (bitwise) equality with the oracle, edge order included (the order is fully defined)."""
    edge_index, offsets, rowptr, dist, ncand = _as_numpy(out)
    per_centre, oncand = oracle
    centres = range(len(ncand)) if centres is None else centres
    for i in centres:
        a, b = rowptr[i], rowptr[i + 1]
        want = per_centre[i]
        assert np.array_equal(edge_index[1, a:b], np.full(b - a, i)), i
        assert np.array_equal(edge_index[0, a:b], want["j"]), i
        assert np.array_equal(offsets[a:b], want["o"]), i
        assert np.array_equal(dist[a:b], want["d"]), i  # bitwise
        assert ncand[i] == oncand[i], i


def assert_invariants(out, pos, cells, ptr, radius=6.0, max_neighbors=50):
    edge_index, offsets, rowptr, dist, ncand = _as_numpy(out)
    pos = np.asarray(pos, dtype=np.float64)
    cells = np.asarray(cells, dtype=np.float64)
    ptr = np.asarray(ptr)
    n = pos.shape[0]
    e = edge_index.shape[1]
    assert edge_index.dtype == offsets.dtype == rowptr.dtype == ncand.dtype == np.int64
    assert dist.dtype == np.float64
    assert edge_index.shape == (2, e) and offsets.shape == (e, 3) and dist.shape == (e,)
    assert rowptr.shape == (n + 1,) and ncand.shape == (n,)
    src, dst = edge_index
    # receiver-sorted, rowptr is its CSR
    assert np.all(np.diff(dst) >= 0)
    assert rowptr[0] == 0 and rowptr[-1] == e
    assert np.array_equal(rowptr, np.concatenate([[0], np.cumsum(np.bincount(dst, minlength=n))]))
    deg = np.diff(rowptr)
    assert np.all(deg >= 6) and np.all(deg <= max_neighbors + 6)
    # same crystal
    graph = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    assert np.array_equal(graph[src], graph[dst])
    # distances: bitwise equal to the documented recomputation, and close to a plain norm
    cell_e = cells[graph[dst]]
    of = offsets.astype(np.float64)
    shift = of[:, 0:1] * cell_e[:, 0]
    shift = shift + of[:, 1:2] * cell_e[:, 1]
    shift = shift + of[:, 2:3] * cell_e[:, 2]
    r = (pos[src] - pos[dst]) + shift
    assert np.array_equal(dist, np.sqrt(r[:, 0] * r[:, 0] + r[:, 1] * r[:, 1] + r[:, 2] * r[:, 2]))
    plain = np.linalg.norm(pos[src] + np.einsum("ek,ekl->el", of, cell_e) - pos[dst], axis=1)
    np.testing.assert_allclose(dist, plain, rtol=1e-12, atol=1e-12)
    # non-self edges within the radius, distinct, and at most max_neighbors per centre
    nonself = src != dst
    assert np.all(dist[nonself] <= radius)
    assert len(np.unique(_edge_rows(edge_index, offsets, nonself), axis=0)) == int(nonself.sum())
    assert np.all(np.bincount(dst[nonself], minlength=n) <= np.minimum(ncand, max_neighbors))
    # self-image block: the last six edges of every receiver, fixed pattern, nothing else self
    for_each = rowptr[1:, None] - 6 + np.arange(6)[None, :]  # (n, 6)
    assert np.array_equal(src[for_each], np.repeat(np.arange(n)[:, None], 6, 1))
    assert np.array_equal(offsets[for_each], np.broadcast_to(SELF_OFFSETS, (n, 6, 3)))
    assert int((~nonself).sum()) == 6 * n


# --------------------------------------------------------------------------------------------------
# random structures
# --------------------------------------------------------------------------------------------------
def cell_from_parameters(a, b, c, alpha, beta, gamma):
    """Rows a, b, c from lengths (Å) and angles (degrees)."""
    ca, cb, cg = (math.cos(math.radians(x)) for x in (alpha, beta, gamma))
    sg = math.sin(math.radians(gamma))
    cx = cb
    cy = (ca - cb * cg) / sg
    cz2 = 1.0 - cx * cx - cy * cy
    assert cz2 > 0.05, "invalid angle triple"
    return np.array([[a, 0.0, 0.0], [b * cg, b * sg, 0.0], [c * cx, c * cy, c * math.sqrt(cz2)]])


def random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def random_cell(rng, lengths, angles, rotate=True):
    while True:
        par = [*rng.uniform(*lengths, size=3), *rng.uniform(*angles, size=3)]
        try:
            cell = cell_from_parameters(*par)
        except AssertionError:
            continue
        return cell @ random_rotation(rng).T if rotate else cell


def crystal(rng, kind):
    """(positions (n, 3), cell (3, 3)) of one random crystal of the given kind."""
    if kind == "one_atom":
        cell = random_cell(rng, (2.0, 4.5), (55, 125))
        frac = rng.uniform(0, 1, size=(1, 3))
    elif kind == "tiny_skewed":  # 2-3 Å cells, angles down to 40 degrees
        cell = random_cell(rng, (2.0, 3.0), (40, 140))
        frac = rng.uniform(0, 1, size=(int(rng.integers(1, 4)), 3))
    elif kind == "triclinic":
        cell = random_cell(rng, (3.0, 8.0), (65, 115))
        frac = rng.uniform(0, 1, size=(int(rng.integers(2, 9)), 3))
    elif kind == "slab":  # ~5 Å thick slab, 20 Å of vacuum along c
        cell = cell_from_parameters(4.0 + rng.uniform(), 4.0 + rng.uniform(), 25.0, 90, 90, 60 + 60 * rng.uniform())
        frac = rng.uniform(0, 1, size=(6, 3))
        frac[:, 2] *= 0.2
    elif kind == "unwrapped":  # fractional coordinates like 3.7 or -2.2
        cell = random_cell(rng, (3.0, 6.0), (60, 120))
        frac = rng.uniform(0, 1, size=(5, 3)) + rng.integers(-4, 5, size=(5, 3))
        frac[0] = (3.7, -2.2, 0.4)
    elif kind == "large":  # a few hundred atoms, ~12 Å^3 per atom
        n = 240
        cell = random_cell(rng, (13.0, 15.5), (75, 105))
        cell *= (n * 12.0 / abs(np.linalg.det(cell))) ** (1 / 3)
        frac = rng.uniform(0, 1, size=(n, 3))
    else:
        raise ValueError(kind)
    return frac @ cell, cell


def make_batch(rng, kinds, dtype=torch.float64):
    parts = [crystal(rng, k) for k in kinds]
    pos = torch.from_numpy(np.concatenate([p for p, _ in parts])).to(dtype)
    cells = torch.from_numpy(np.stack([c for _, c in parts])).to(dtype)
    ptr = torch.tensor([0, *np.cumsum([len(p) for p, _ in parts])], dtype=torch.int64)
    return pos, cells, ptr


RANDOM_SUITE = {
    "one_atom": ["one_atom"] * 5,
    "tiny_skewed": ["tiny_skewed"] * 6,
    "slab": ["slab", "slab"],
    "unwrapped": ["unwrapped"] * 3,
    "mixed": ["one_atom", "triclinic", "slab", "tiny_skewed", "unwrapped", "triclinic", "one_atom"],
    "large": ["large"],
}


# --------------------------------------------------------------------------------------------------
# golden tests (spec §13, required test 1: the 49-slot effect emulated with reserved = zero_self)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(N_GOLDEN))
def test_golden_emulating_49_slots(golden, k):
    arrays, meta = golden
    pos, cell, ptr = _golden_inputs(arrays, k)
    zero_self = torch.from_numpy(arrays[f"s{k}_zero_self"])
    out = radius_graph(pos, cell, ptr, 6.0, 50, reserved=zero_self)
    edge_index, offsets, rowptr, dist, ncand = _as_numpy(out)
    g_ei, g_off = arrays[f"s{k}_edge_index"], arrays[f"s{k}_cell_offsets"]
    g_dist = arrays[f"s{k}_edge_dist"]

    assert np.array_equal(ncand, arrays[f"s{k}_ncand"])
    assert_invariants(out, pos, cell, ptr)

    # self-image edges, taken in order, equal the golden self-image block exactly
    mine_self, gold_self = edge_index[0] == edge_index[1], g_ei[0] == g_ei[1]
    assert np.array_equal(_edge_rows(edge_index, offsets, mine_self), _edge_rows(g_ei, g_off, gold_self))

    mine_rows = _edge_rows(edge_index, offsets, ~mine_self)
    gold_rows = _edge_rows(g_ei, g_off, ~gold_self)
    if not arrays[f"s{k}_tie"]:
        assert np.array_equal(_canonical(mine_rows), _canonical(gold_rows))
        return

    # ties at the cut: per tie centre, the edges below d50 - 1e-6 match exactly, and every centre
    # keeps as many edges as the original; non-tie centres match exactly.
    d50 = _tie_d50(meta, k)
    assert set(d50) == set(np.flatnonzero(arrays[f"s{k}_tie_atoms"]).tolist())
    n = pos.shape[0]
    assert np.array_equal(np.bincount(edge_index[1], minlength=n), np.bincount(g_ei[1], minlength=n))
    mine_d, gold_d = dist[~mine_self], g_dist[~gold_self]
    for i in range(n):
        mine_i, gold_i = mine_rows[:, 1] == i, gold_rows[:, 1] == i
        if i in d50:
            mine_i &= mine_d < d50[i] - 1e-6
            gold_i &= gold_d < d50[i] - 1e-6
        assert np.array_equal(_canonical(mine_rows[mine_i]), _canonical(gold_rows[gold_i])), i


# --------------------------------------------------------------------------------------------------
# golden tests (spec §13, required test 2: the graph as built by default)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", range(N_GOLDEN))
def test_golden_default(golden, k):
    arrays, meta = golden
    pos, cell, ptr = _golden_inputs(arrays, k)
    out = radius_graph(pos, cell, ptr)
    again = radius_graph(pos, cell, ptr)
    for a, b in zip(out, again, strict=True):
        assert torch.equal(a, b)
    edge_index, offsets, _, dist, ncand = _as_numpy(out)
    assert np.array_equal(ncand, arrays[f"s{k}_ncand"])

    # the default graph is the oracle's: first min(50, ncand) key-sorted candidates, minus self-images
    oracle = brute_force(pos.numpy(), cell.numpy(), ptr.numpy())
    assert_matches_oracle(out, oracle)

    g_ei, g_off, g_dist = arrays[f"s{k}_edge_index"], arrays[f"s{k}_cell_offsets"], arrays[f"s{k}_edge_dist"]
    mine = _as_set(_edge_rows(edge_index, offsets, edge_index[0] != edge_index[1]))
    gold_nonself = g_ei[0] != g_ei[1]
    if arrays[f"s{k}_tie"]:
        # only the golden edges below each tie centre's d50 - 1e-6 are implementation-independent
        d50 = _tie_d50(meta, k)
        limit = np.array([d50.get(int(i), np.inf) - 1e-6 for i in g_ei[1]])
        assert _as_set(_edge_rows(g_ei, g_off, gold_nonself & (g_dist < limit))) <= mine
        return
    gold = _as_set(_edge_rows(g_ei, g_off, gold_nonself))
    assert gold <= mine
    # the only extras: the 50th candidate of centres with the spurious self pair, when not a self-image
    expected_extra = set()
    zero_self = arrays[f"s{k}_zero_self"]
    for i in np.flatnonzero(zero_self & (arrays[f"s{k}_ncand"] >= 50)):
        cj, co, _ = oracle[0][i]["sorted"]
        if cj[49] != i:
            expected_extra.add((int(cj[49]), int(i), *(int(v) for v in co[49])))
    assert mine - gold == expected_extra


def test_golden_49_slot_effect_is_visible(golden):
    """The reserved slot matters: MgO 2x2x2 (s12) differs from the default graph."""
    arrays, _ = golden
    pos, cell, ptr = _golden_inputs(arrays, 12)
    default = radius_graph(pos, cell, ptr)
    emulated = radius_graph(pos, cell, ptr, reserved=torch.from_numpy(arrays["s12_zero_self"]))
    assert default[0].shape[1] > emulated[0].shape[1]


def test_golden_all_in_one_batch(golden):
    arrays, _ = golden
    singles = [_golden_inputs(arrays, k) for k in range(N_GOLDEN)]
    reserved = [torch.from_numpy(arrays[f"s{k}_zero_self"]) for k in range(N_GOLDEN)]
    pos = torch.cat([p for p, _, _ in singles])
    cells = torch.cat([c for _, c, _ in singles])
    sizes = torch.tensor([p.shape[0] for p, _, _ in singles])
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    for res in (None, torch.cat(reserved)):
        batched = radius_graph(pos, cells, ptr, reserved=res)
        assert_invariants(batched, pos, cells, ptr)
        ei, off, rowptr, dist, ncand = batched
        for k, (p, c, pr) in enumerate(singles):
            lo, hi = int(ptr[k]), int(ptr[k + 1])
            ei1, off1, rowptr1, dist1, ncand1 = radius_graph(p, c, pr, reserved=None if res is None else reserved[k])
            a, b = int(rowptr[lo]), int(rowptr[hi])
            assert torch.equal(ei[:, a:b] - lo, ei1)
            assert torch.equal(off[a:b], off1)
            assert torch.equal(dist[a:b], dist1)
            assert torch.equal(rowptr[lo : hi + 1] - a, rowptr1)
            assert torch.equal(ncand[lo:hi], ncand1)


# --------------------------------------------------------------------------------------------------
# randomized suite against the brute-force oracle
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("suite", sorted(RANDOM_SUITE))
def test_random_against_brute_force(suite, dtype):
    rng = np.random.default_rng([sum(map(ord, suite)), dtype.itemsize])
    pos, cells, ptr = make_batch(rng, RANDOM_SUITE[suite], dtype)
    out = radius_graph(pos, cells, ptr)
    assert_invariants(out, pos.double(), cells.double(), ptr)
    assert_matches_oracle(out, brute_force(pos.double().numpy(), cells.double().numpy(), ptr.numpy()))


@pytest.mark.parametrize(("radius", "max_neighbors"), [(4.0, 12), (3.0, 1), (7.5, 80), (6.0, 0)])
def test_random_other_radius_and_cap_with_reserved(radius, max_neighbors):
    rng = np.random.default_rng(int(radius * 10) + max_neighbors)
    pos, cells, ptr = make_batch(rng, ["tiny_skewed", "triclinic", "unwrapped", "one_atom", "slab"])
    reserved = torch.from_numpy(rng.integers(0, 2, size=pos.shape[0]))
    out = radius_graph(pos, cells, ptr, radius, max_neighbors, reserved=reserved)
    assert_invariants(out, pos, cells, ptr, radius, max_neighbors)
    want = brute_force(pos.numpy(), cells.numpy(), ptr.numpy(), radius, max_neighbors, reserved.numpy())
    assert_matches_oracle(out, want)
    # bool reserved means the same as 0/1 ints
    as_bool = radius_graph(pos, cells, ptr, radius, max_neighbors, reserved=reserved.bool())
    for a, b in zip(out, as_bool, strict=True):
        assert torch.equal(a, b)


def test_chunking_does_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(7)
    pos, cells, ptr = make_batch(rng, RANDOM_SUITE["mixed"] + ["triclinic"] * 3)
    whole = radius_graph(pos, cells, ptr)
    monkeypatch.setattr(rg, "CHUNK_WORK", 37)  # many chunks, several single-centre ones
    chunked = radius_graph(pos, cells, ptr)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


def test_float32_input_equals_its_float64_upcast():
    rng = np.random.default_rng(11)
    pos, cells, ptr = make_batch(rng, ["triclinic", "tiny_skewed", "unwrapped"], torch.float32)
    a = radius_graph(pos, cells, ptr)
    b = radius_graph(pos.double(), cells.double(), ptr)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a[3].dtype == torch.float64


def test_sqrt_is_correctly_rounded():
    """Distances must be bit-reproducible by C++/CUDA kernels, so the root is IEEE-rounded
    (torch's CPU float64 sqrt goes through MKL VML and is 1 ulp off for ~1% of inputs)."""
    x = np.random.default_rng(5).uniform(0.0, 200.0, 20000)
    want = np.array([math.sqrt(v) for v in x])
    assert np.array_equal(rg.sqrt_rn(torch.from_numpy(x)).numpy(), want)


def test_pair_exactly_at_the_radius_is_included():
    # simple cubic a = 3 Å: the images at distance exactly 6 Å (2a) are candidates; |n|^2 <= 4 has
    # 33 lattice points, minus the origin.
    pos = torch.zeros(1, 3, dtype=torch.float64)
    cell = (3.0 * torch.eye(3, dtype=torch.float64))[None]
    out = radius_graph(pos, cell, torch.tensor([0, 1]), 6.0, 100)
    assert out[4].tolist() == [32]
    # the same lattice with the atom far outside the cell and a 2x2x2 supercell
    pos2 = torch.tensor([[-7.5, 31.5, 4.5]], dtype=torch.float64)
    assert radius_graph(pos2, cell, torch.tensor([0, 1]), 6.0, 100)[4].tolist() == [32]
    pos3 = torch.tensor([[x, y, z] for x in (0, 3) for y in (0, 3) for z in (0, 3)], dtype=torch.float64)
    out3 = radius_graph(pos3, cell * 2, torch.tensor([0, 8]), 6.0, 100)
    assert out3[4].tolist() == [32] * 8
    assert_matches_oracle(out3, brute_force(pos3.numpy(), (cell * 2).numpy(), [0, 8], 6.0, 100))


def test_wrapped_coordinate_rounding_to_one():
    """f = -3e-301 wraps to w = f - floor(f) = 1.0 exactly (not < 1); the image ranges still hold."""
    cell = np.array([[3.0, 0.0, 0.0], [0.5, 2.9, 0.0], [0.3, 0.2, 3.1]])
    pos = np.array([[-1e-17, 1.0, 1.0], [1.5, 1.5, -1e-300], [3.0 - 1e-16, 0.1, 0.1]])
    frac = pos @ np.linalg.inv(cell)
    assert (frac - np.floor(frac) == 1.0).any()
    cells, ptr = torch.from_numpy(cell)[None], torch.tensor([0, 3])
    out = radius_graph(torch.from_numpy(pos), cells, ptr)
    assert_invariants(out, pos, cells, ptr)
    assert_matches_oracle(out, brute_force(pos, cells.numpy(), ptr.numpy()))


@pytest.mark.slow
def test_large_crystal_2000_atoms():
    """A 2,000-atom crystal: invariants everywhere, oracle on a sample of centres, and neighbour
    symmetry (j -> i with o implies i -> j with -o among candidates, so for centres below the cap)."""
    rng = np.random.default_rng(2000)
    n = 2000
    cell = random_cell(rng, (25.0, 32.0), (70, 110))
    cell *= (n * 11.0 / abs(np.linalg.det(cell))) ** (1 / 3)
    pos = torch.from_numpy(rng.uniform(-0.5, 1.5, size=(n, 3)) @ cell)
    cells = torch.from_numpy(cell)[None]
    ptr = torch.tensor([0, n])
    out = radius_graph(pos, cells, ptr, 6.0, 50)
    assert_invariants(out, pos, cells, ptr)
    sample = sorted(rng.choice(n, size=12, replace=False).tolist())
    assert_matches_oracle(out, brute_force(pos.numpy(), cells.numpy(), ptr.numpy(), centres=sample), sample)
    # with no cut binding, the non-self graph is symmetric
    full = radius_graph(pos, cells, ptr, 4.0, 1000)
    ei, off = full[0].numpy(), full[1].numpy()
    ns = ei[0] != ei[1]
    fwd = _canonical(_edge_rows(ei, off, ns))
    rev = _canonical(np.concatenate([ei[::-1].T, -off], 1)[ns])
    assert np.array_equal(fwd, rev)
    assert np.array_equal(np.diff(full[2].numpy()) - 6, full[4].numpy())


# --------------------------------------------------------------------------------------------------
# edge cases and the backend switch
# --------------------------------------------------------------------------------------------------
def test_empty_inputs():
    for g in (0, 2):
        pos = torch.zeros(0, 3, dtype=torch.float32)
        cells = torch.eye(3).repeat(g, 1, 1) * 4.0
        ptr = torch.zeros(g + 1, dtype=torch.int64)
        ei, off, rowptr, dist, ncand = radius_graph(pos, cells, ptr)
        assert ei.shape == (2, 0) and off.shape == (0, 3) and dist.shape == (0,) and ncand.shape == (0,)
        assert rowptr.tolist() == [0]
        assert ei.dtype == off.dtype == rowptr.dtype == ncand.dtype == torch.int64
        assert dist.dtype == torch.float64


def test_empty_crystal_inside_a_batch():
    rng = np.random.default_rng(3)
    (p1, c1), (p2, c2) = crystal(rng, "triclinic"), crystal(rng, "one_atom")
    pos = torch.from_numpy(np.concatenate([p1, p2]))
    cells = torch.from_numpy(np.stack([c1, 5.0 * np.eye(3), c2]))
    ptr = torch.tensor([0, len(p1), len(p1), len(p1) + 1])
    out = radius_graph(pos, cells, ptr)
    assert_invariants(out, pos, cells, ptr)
    assert_matches_oracle(out, brute_force(pos.numpy(), cells.numpy(), ptr.numpy()))


def test_singular_cell_is_rejected():
    pos = torch.zeros(1, 3, dtype=torch.float64)
    cell = torch.tensor([[[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]], dtype=torch.float64)
    with pytest.raises((ValueError, RuntimeError)):
        radius_graph(pos, cell, torch.tensor([0, 1]))


def test_build_graph_backends(golden):
    arrays, _ = golden
    pos, cell, ptr = _golden_inputs(arrays, 9)
    ref = build_graph(pos, cell, ptr, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = build_graph(pos, cell, ptr, backend="auto")
    assert len([w for w in caught if "radius_graph" in str(w.message)]) <= 1
    for a, b in zip(ref, auto, strict=True):
        assert torch.equal(a, b)
    direct = radius_graph(pos, cell, ptr)
    for a, b in zip(ref, direct, strict=True):
        assert torch.equal(a, b)
    assert ref.edge_index.shape[0] == 2 and ref.rowptr.shape == (pos.shape[0] + 1,)
    with pytest.raises(BackendUnavailableError):
        build_graph(pos, cell, ptr, backend="cuda")


# --------------------------------------------------------------------------------------------------
# every backend against the reference
# --------------------------------------------------------------------------------------------------
BACKENDS = backend_params(OP, "cpu", "cuda", "triton")
# Golden structures Triton runs on its interpreter: 1-atom cells (0, 1), MoS2 and graphene slabs
# (10, 11), MgO 2x2x2 (12, 61 of 64 atoms with a reserved slot), strongly skewed cells (14:
# 60/120/65 deg; 15: gamma 27.7 deg), tied shells at the cut (19, 24: MgO conventional cell).
INTERPRETED_SUBSET = (0, 1, 10, 11, 12, 14, 15, 19, 24)
NAMES = ("edge_index", "cell_offsets", "rowptr", "distances", "num_candidates")


def assert_same(a, b, what=""):
    """Outputs equal exactly: same dtypes and shapes, integers equal, float64 equal to the bit."""
    for name, x, y in zip(NAMES, a, b, strict=True):
        assert x.dtype == y.dtype, f"{what} {name}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{what} {name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        if x.dtype == torch.float64:
            assert torch.equal(x.view(torch.int64), y.view(torch.int64)), f"{what} {name}: not bitwise equal"
        else:
            assert torch.equal(x, y), f"{what} {name}: differs"


def on_cpu(out, device, what=""):
    """The outputs, checked to lie on ``device``, moved to the CPU."""
    for name, t in zip(NAMES, out, strict=True):
        assert t.device.type == device.type, f"{what} {name}: device {t.device} != {device}"
    return tuple(t.cpu() for t in out)


def check(fn, device, pos, cells, ptr, radius=6.0, k=50, reserved=None, what="", **kw):
    """``fn``'s graph of the inputs moved to ``device`` equals the reference's (on the CPU) exactly."""
    ref = radius_graph(pos, cells, ptr, radius, k, reserved)
    out = fn(pos.to(device), cells.to(device), ptr.to(device), radius, k,
             None if reserved is None else reserved.to(device), **kw)
    assert_same(ref, on_cpu(out, device, what), what)


def golden_structures(golden_graphs):
    n = len([k for k in golden_graphs if k.endswith("_pos")])
    return [(torch.from_numpy(golden_graphs[f"s{k}_pos"]), torch.from_numpy(golden_graphs[f"s{k}_cell"]),
             torch.from_numpy(golden_graphs[f"s{k}_zero_self"])) for k in range(n)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_registered(backend):
    expected = {"cpu": lambda: compiled.radius_graph_cpu, "cuda": lambda: compiled.radius_graph_cuda,
                "triton": lambda: triton_module(OP).radius_graph}[backend.name]()
    name, fn = ops.resolve(OP, backend.name, backend.device.type)
    assert name == backend.name and fn is expected


@pytest.mark.parametrize("use_reserved", [False, True], ids=["plain", "reserved=zero_self"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_golden_structures(golden_graphs, backend, use_reserved):
    structures = golden_structures(golden_graphs)
    subset = INTERPRETED_SUBSET if backend.name == "triton" and INTERPRET else range(len(structures))
    for k in subset:
        pos, cell, zero_self = structures[k]
        res = zero_self.to(torch.int64) if use_reserved else None
        check(backend.fn, backend.device, pos, cell[None], torch.tensor([0, pos.shape[0]]), reserved=res,
              what=f"s{k}")


@pytest.mark.parametrize("reserved", ["bool", "none"])
@pytest.mark.parametrize("backend", backend_params(OP, "cpu", "cuda", "triton", slow={"triton"}), indirect=True)
def test_golden_batched_through_build_graph(golden_graphs, backend, reserved):
    """All 26 golden structures (1 to 90 atoms) in one batch, ``reserved`` as bools or none, through
    ``build_graph(backend=...)``."""
    if backend.name == "triton" and INTERPRET and reserved == "none":
        pytest.skip("25-45 s on Triton's CPU interpreter (it runs on a GPU); there the bool form covers the "
                    "batch and test_golden_structures[triton-plain] reserved=None")
    structures = golden_structures(golden_graphs)
    pos = torch.cat([p for p, _, _ in structures])
    cells = torch.stack([c for _, c, _ in structures])
    ptr = torch.tensor([0] + list(itertools.accumulate(p.shape[0] for p, _, _ in structures)))
    res = torch.cat([z for _, _, z in structures]) if reserved == "bool" else None
    ref = radius_graph(pos, cells, ptr, 6.0, 50, res)
    dev = backend.device
    g = build_graph(pos.to(dev), cells.to(dev), ptr.to(dev), 6.0, 50, backend=backend.name,
                    reserved=None if res is None else res.to(dev))
    assert_same(ref, on_cpu(tuple(g), dev))


@pytest.mark.parametrize("case", graph_case_params(slow_seeds={1006}))
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_random_batches(backend, case):
    pos, cells, ptr, radius, k, reserved = graph_case(case)
    for res in reserved:
        what = f"seed{case[0]} reserved={res is not None}"
        check(backend.fn, backend.device, pos, cells, ptr, radius, k, res, what=what)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_empty_inputs_as_the_reference(backend):
    for g in (0, 1, 2):
        for dtype in (torch.float32, torch.float64):
            cells = torch.eye(3, dtype=dtype).repeat(g, 1, 1) * 4.0
            empty = torch.zeros(0, 3, dtype=dtype)
            check(backend.fn, backend.device, empty, cells, torch.zeros(g + 1, dtype=torch.int64),
                  what=f"{g} empty crystals, {dtype}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_invalid_inputs_raise(backend):
    dev = backend.device
    pos = torch.rand(4, 3, dtype=torch.float64, device=dev)
    singular = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]], dtype=torch.float64, device=dev)
    with pytest.raises(ValueError, match="non-singular"):
        backend.fn(pos[:1], singular, torch.tensor([0, 1], device=dev))
    with pytest.raises(ValueError, match="non-singular"):
        backend.fn(pos, torch.zeros(1, 3, 3, dtype=torch.float64, device=dev), torch.tensor([0, 4], device=dev))
    with pytest.raises(ValueError, match="reserved"):
        backend.fn(pos, torch.eye(3, dtype=torch.float64, device=dev)[None] * 5, torch.tensor([0, 4], device=dev),
                   6.0, 50, torch.tensor([0, -1, 0, 0], device=dev))


@pytest.mark.parametrize("backend", backend_params(OP, "cpu", "cuda"), indirect=True)
def test_fixed_capacity(golden_graphs, backend):
    """``graph.build_graph_fixed`` on the backend's device: the graph in the first ``num_edges`` slots,
    padding after; a capacity one short raises (or, unchecked, sets the overflow bit)."""
    rng = np.random.default_rng(3)
    structures = golden_structures(golden_graphs)
    inputs = [(*random_batch(rng, [4, 6], ["gen", "skewed"]), None),
              (torch.cat([p for p, _, _ in structures]), torch.stack([c for _, c, _ in structures]),
               torch.tensor([0] + list(itertools.accumulate(p.shape[0] for p, _, _ in structures))),
               torch.cat([z for _, _, z in structures]).to(torch.int64))]
    dev = backend.device
    for pos, cells, ptr, zero_self in inputs:
        for res in (None,) if zero_self is None else (None, zero_self):
            ref = radius_graph(pos, cells, ptr, 6.0, 50, res)
            e = ref[3].shape[0]
            args = (pos.to(dev), cells.to(dev), ptr.to(dev))
            kw = dict(radius=6.0, max_neighbors=50, reserved=None if res is None else res.to(dev))
            g = graph.build_graph_fixed(*args, capacity=e + 10, **kw)
            assert int(g.num_edges) == e and int(g.status) == 0
            assert torch.equal(g.edge_index[:, :e].cpu(), ref[0]) and torch.equal(g.rowptr.cpu(), ref[2])
            assert torch.equal(g.distances[:e].cpu(), ref[3]) and bool((g.edge_index[:, e:] == -1).all())
            with pytest.raises(graph.GraphCapacityError) as info:
                graph.build_graph_fixed(*args, capacity=e - 1, **kw)
            assert info.value.required == e
            g = graph.build_graph_fixed(*args, capacity=e - 1, check=False, **kw)
            assert int(g.status) & compiled.ERR_OVERFLOW and int(g.num_edges) == e
            with pytest.raises(graph.GraphCapacityError):
                graph.check_fixed(g)


# --------------------------------------------------------------------------------------------------
# triton
# --------------------------------------------------------------------------------------------------
@backend_only(OP, "triton")
def test_triton_block_size_and_tiny_caps():
    """Small blocks (many merges of the top-K buffer), a cap of 0 and 1, a radius with no
    neighbours, ``max_neighbors`` above the number of candidates."""
    krg, dev = triton_module(OP), backend_device("triton")
    rng = np.random.default_rng(11)
    pos, cells, ptr = random_batch(rng, (3, 1), ("skewed", "tiny"), lengths=SMALL)
    for block in (16, 64):
        check(krg.radius_graph, dev, pos, cells, ptr, 6.0, 50, what=f"block={block}",
              config=krg.RadiusGraphConfig(block=block))
    reserved = torch.tensor([1, 0, 1, 1])
    check(krg.radius_graph, dev, pos, cells, ptr, 6.0, 1, reserved, what="caps 0/1",
          config=krg.RadiusGraphConfig(block=16))
    check(krg.radius_graph, dev, pos, cells, ptr, 0.5, 50, what="empty")
    check(krg.radius_graph, dev, pos, cells, ptr, 6.0, 300, what="K > candidates")


@backend_only(OP, "triton")
def test_triton_exact_tie_shell():
    """A simple-cubic crystal: shells of exactly equal distances straddle the cut, so the order is
    decided by (j, o0, o1, o2) alone."""
    krg = triton_module(OP)
    cell = torch.eye(3, dtype=torch.float64)[None] * 2.0
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    check(krg.radius_graph, backend_device("triton"), pos, cell, torch.tensor([0, 2]), 4.1, 40, what="cubic ties",
          config=krg.RadiusGraphConfig(block=32))


@backend_only(OP, "triton")
def test_triton_test_count_guard():
    """The selection kernel's per-centre count of (image, atom) tests travels as int32: a box of
    1290^3 images of one atom (2,146,689,000 tests) is accepted by the host preparation with its
    exact count, 1292^3 (2,156,689,088 >= 2**31) is rejected with its own message (the rejected
    centre gets no tests, so the kernel does not run them)."""
    krg, dev = triton_module(OP), backend_device("triton")
    pos = torch.zeros(1, 3, dtype=torch.float64, device=dev)  # wrapped coordinate 0: box [-1 - r, r]
    cell = torch.eye(3, dtype=torch.float64, device=dev)[None]
    ptr = torch.tensor([0, 1], device=dev)
    for radius, extent in ((644.5, 1290), (645.5, 1292)):
        *_, meta, error = krg.prepare(pos, cell, ptr, radius, 50, None)
        fits = extent**3 < krg.MAX_TESTS
        assert int(error) == (0 if fits else 4), radius
        assert meta[0, 6:9].tolist() == [extent] * 3, radius
        assert int(meta[0, 9]) == (extent**3 if fits else 0), radius
    with pytest.raises(ValueError, match=r"2\*\*31 or more \(image, atom\) distance tests"):
        krg.radius_graph(pos, cell, ptr, 645.5, 50)
