"""The Triton radius graph (kernels/radius_graph.py) against the pure-PyTorch oracle.

Outputs must be exactly the reference's: integers equal, float64 distances equal to the bit. Without
a GPU the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by conftest.py before
any kernel module is imported); it costs about a millisecond per program (one per centre), so the
structures are few and small. Every output buffer starts poisoned (NaN / -7), so an entry the
kernels fail to write makes the comparison fail.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_batch, require_triton_backend

require_triton_backend("radius_graph")
from e3relax_fast.kernels import radius_graph as krg  # noqa: E402
from e3relax_fast.kernels import utils as ku  # noqa: E402

from e3relax_fast import build_graph  # noqa: E402
from e3relax_fast.reference.radius_graph import radius_graph as reference  # noqa: E402

DATA = Path(__file__).parent / "data"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# 1-atom cells (0, 1), MoS2 and graphene slabs (10, 11), MgO 2x2x2 (12, 61 of 64 atoms with a
# reserved slot), strongly skewed cells (14: 60/120/65 deg; 15: gamma 27.7 deg), tied shells at the
# cut (19, 24: MgO conventional cell).
GOLDEN_SUBSET = (0, 1, 10, 11, 12, 14, 15, 19, 24)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels must fill starts poisoned, so an unwritten element fails."""
    monkeypatch.setattr(ku, "POISON_OUTPUTS", True)


def assert_same(a, b, what=""):
    """Outputs equal exactly: same dtypes, shapes and devices; integers equal; float64 bit-equal."""
    names = ("edge_index", "cell_offsets", "rowptr", "distances", "num_candidates")
    for name, x, y in zip(names, a, b, strict=True):
        assert x.dtype == y.dtype, f"{what} {name}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{what} {name}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        assert x.device == y.device, f"{what} {name}: device {x.device} != {y.device}"
        if x.dtype == torch.float64:
            assert torch.equal(x.view(torch.int64), y.view(torch.int64)), f"{what} {name}: not bitwise equal"
        else:
            assert torch.equal(x, y), f"{what} {name}: differs"


def check(pos, cells, ptr, radius=6.0, k=50, reserved=None, what="", **kw):
    pos, cells, ptr = pos.to(DEVICE), cells.to(DEVICE), ptr.to(DEVICE)
    if reserved is not None:
        reserved = reserved.to(DEVICE)
    ref = reference(pos, cells, ptr, radius, k, reserved)
    out = krg.radius_graph(pos, cells, ptr, radius, k, reserved, **kw)
    assert_same(ref, out, what)
    return out


# --------------------------------------------------------------------------------------------------
# golden graphs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden():
    with np.load(DATA / "graphs.npz") as z:
        arrays = {k: z[k] for k in z.files}
    n = len([k for k in arrays if k.endswith("_pos")])
    return [(torch.from_numpy(arrays[f"s{k}_pos"]), torch.from_numpy(arrays[f"s{k}_cell"]),
             torch.from_numpy(arrays[f"s{k}_zero_self"])) for k in range(n)]


@pytest.mark.parametrize("use_reserved", [False, True], ids=["plain", "reserved=zero_self"])
def test_golden_structures(golden, use_reserved):
    for k in GOLDEN_SUBSET:
        pos, cell, zero_self = golden[k]
        res = zero_self.to(torch.int64) if use_reserved else None
        check(pos, cell[None], torch.tensor([0, pos.shape[0]]), reserved=res, what=f"s{k}")


def test_golden_batched_through_registry(golden):
    """All 26 golden structures (1 to 90 atoms) in one batch, bool ``reserved``, through
    ``build_graph(backend="triton")``."""
    pos = torch.cat([p for p, _, _ in golden]).to(DEVICE)
    cells = torch.stack([c for _, c, _ in golden]).to(DEVICE)
    ptr = torch.tensor([0] + list(itertools.accumulate(p.shape[0] for p, _, _ in golden)), device=DEVICE)
    res = torch.cat([z for _, _, z in golden]).to(DEVICE)  # bool
    ref = reference(pos, cells, ptr, 6.0, 50, res)
    assert_same(ref, tuple(build_graph(pos, cells, ptr, 6.0, 50, backend="triton", reserved=res)))


# --------------------------------------------------------------------------------------------------
# randomized suite
# --------------------------------------------------------------------------------------------------
def _batch(rng, sizes, kinds, unwrap=0):
    # Smaller cells than the other suites: the interpreter pays per tested image.
    lengths = {"tiny": (2.0, 3.0), "vacuum": (3.0, 5.0), "general": (2.5, 6.0)}
    return random_batch(rng, sizes, kinds, unwrap, lengths=lengths)


CASES = [  # (seed, sizes, kinds, unwrap, dtype, radius, max_neighbors)
    (1, (1, 1, 2), ("tiny", "skewed", "tiny"), 0, torch.float64, 6.0, 50),
    (2, (3, 1, 5), ("skewed", "vacuum", "plain"), 3, torch.float64, 6.0, 50),
    (3, (2, 4), ("vacuum", "skewed"), 2, torch.float32, 5.0, 24),
    (4, (1, 3, 2), ("tiny", "plain", "skewed"), 50, torch.float32, 6.0, 50),
    (5, (6, 1), ("plain", "tiny"), 1, torch.float64, 4.0, 7),
    (6, (12, 1, 3), ("plain", "skewed", "vacuum"), 1, torch.float64, 6.0, 50),
]


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}" for c in CASES])
def test_random_batches(case):
    seed, sizes, kinds, unwrap, dtype, radius, k = case
    rng = np.random.default_rng(seed)
    pos, cells, ptr = _batch(rng, sizes, kinds, unwrap)
    reserved = torch.from_numpy(rng.integers(0, 2, pos.shape[0]))
    check(pos.to(dtype), cells.to(dtype), ptr, radius, k, what=f"seed{seed}")
    check(pos.to(dtype), cells.to(dtype), ptr, radius, k, reserved, what=f"seed{seed} reserved")


def test_block_size_and_tiny_caps():
    """Small blocks (many merges of the top-K buffer), a cap of 0 and 1, a radius with no
    neighbours, ``max_neighbors`` above the number of candidates."""
    rng = np.random.default_rng(11)
    pos, cells, ptr = _batch(rng, (3, 1), ("skewed", "tiny"))
    for block in (16, 64):
        check(pos, cells, ptr, 6.0, 50, what=f"block={block}", config=krg.RadiusGraphConfig(block=block))
    reserved = torch.tensor([1, 0, 1, 1])
    check(pos, cells, ptr, 6.0, 1, reserved, what="caps 0/1", config=krg.RadiusGraphConfig(block=16))
    check(pos, cells, ptr, 0.5, 50, what="empty")
    check(pos, cells, ptr, 6.0, 300, what="K > candidates")


def test_exact_tie_shell():
    """A simple-cubic crystal: shells of exactly equal distances straddle the cut, so the order is
    decided by (j, o0, o1, o2) alone."""
    cell = torch.eye(3, dtype=torch.float64)[None] * 2.0
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    check(pos, cell, torch.tensor([0, 2]), 4.1, 40, what="cubic ties", config=krg.RadiusGraphConfig(block=32))


def test_empty_and_errors():
    empty = krg.radius_graph(torch.zeros(0, 3), torch.zeros(0, 3, 3), torch.zeros(1, dtype=torch.int64))
    assert [tuple(t.shape) for t in empty] == [(2, 0), (0, 3), (1,), (0,), (0,)]
    singular = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="non-singular"):
        krg.radius_graph(torch.zeros(1, 3, dtype=torch.float64), singular, torch.tensor([0, 1]))
