"""The CUDA message kernel's edge tile (csrc/message_passing.h, EdgeTile: 28 edges in float32, 14 in
float64), through its CPU launcher ``_C.message_passing_cuda_emulated`` (the kernel's per-receiver and
per-channel functions: tile geometry, r-major basis rows with zeroed empty slots, gate rows of a
whole tile, messages in edge order).

Receivers get in-degrees on both sides of every tile boundary (1 and 2 tiles of either dtype, a
receiver's usual 56 edges, partial last tiles, one edge, none), and the outputs must equal the
reference (e3relax_fast/reference/message_passing.py) within float64 1e-10 / float32 5e-6, be
written everywhere (NaN-poisoned buffers) and not depend on the thread count.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TOLERANCES, assert_close

from e3relax_fast.ops import compiled
from e3relax_fast.reference.message_passing import message_passing as reference_op
from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient

pytestmark = pytest.mark.skipif(compiled._C is None or not hasattr(compiled._C, "message_passing_cuda_emulated"),
                                reason=f"compiled extension unavailable: {compiled.IMPORT_ERROR}")

# In-degrees around the float64 (14) and float32 (28) tile boundaries, the usual 56, and beyond.
DEGREES = [0, 1, 13, 14, 15, 27, 28, 29, 41, 42, 43, 55, 56, 57, 84, 85]


def make_case(dtype, hidden, num_rbf, seed):
    """A one-crystal batch (~5 Å cell), receiver i with DEGREES[i] receiver-sorted edges, and its rowptr."""
    gen = torch.Generator().manual_seed(seed)
    n = len(DEGREES)
    cells = (5.0 * torch.eye(3, dtype=torch.float64) + 0.5 * torch.randn(3, 3, generator=gen,
                                                                          dtype=torch.float64))[None]
    positions = torch.rand(n, 3, generator=gen, dtype=torch.float64) @ cells[0]
    dst = torch.repeat_interleave(torch.arange(n), torch.tensor(DEGREES))
    src = torch.randint(0, n, (dst.numel(),), generator=gen)
    offsets = torch.randint(-1, 2, (dst.numel(), 3), generator=gen)
    offsets[(src == dst) & (offsets == 0).all(1), 2] = 1  # no zero-offset self pair
    rowptr = torch.searchsorted(dst, torch.arange(n + 1))
    centres = rbf_centres(num_rbf)
    args = dict(
        x_proj=torch.randn(n, 3 * hidden, generator=gen, dtype=torch.float64).to(dtype),
        vec=torch.randn(n, 3, hidden, generator=gen, dtype=torch.float64).to(dtype),
        positions=positions.to(dtype),
        cells=cells.to(dtype),
        edge_index=torch.stack([src, dst]),
        cell_offsets=offsets,
        edge_graph=torch.zeros(dst.numel(), dtype=torch.int64),
        edge_weight=(torch.randn(3 * hidden, num_rbf, generator=gen, dtype=torch.float64)
                     / math.sqrt(num_rbf)).to(dtype),
        edge_bias=(0.1 * torch.randn(3 * hidden, generator=gen, dtype=torch.float64)).to(dtype),
        rbf_centres=centres,
        rbf_coeff=rbf_coefficient(centres),
        cutoff=6.0,
    )
    return args, rowptr


def poisoned(args):
    n, h = args["vec"].shape[0], args["vec"].shape[2]
    like = dict(dtype=args["x_proj"].dtype)
    return torch.full((n, h), math.nan, **like), torch.full((n, 3, h), math.nan, **like)


@pytest.mark.parametrize("dtype,rel", TOLERANCES)
@pytest.mark.parametrize("hidden,num_rbf", [(32, 128), (24, 20), (300, 128)], ids=["H32R128", "H24R20", "H300R128"])
def test_tile_boundaries_against_reference(dtype, rel, hidden, num_rbf):
    args, rowptr = make_case(dtype, hidden, num_rbf, seed=hidden + num_rbf)
    ref_ds, ref_dv = reference_op(**args)
    ds, dv = compiled.message_passing_cpu(**args, rowptr=rowptr, out=poisoned(args), num_threads=1)
    assert_close(ds, ref_ds, rel, "ds", check_dtype=True)
    assert_close(dv, ref_dv, rel, "dv", check_dtype=True)
    assert (ds[0] == 0).all() and (dv[0] == 0).all()  # the receiver without edges
    ds2, dv2 = compiled.message_passing_cpu(**args, rowptr=rowptr, out=poisoned(args), num_threads=2)
    assert torch.equal(ds, ds2) and torch.equal(dv, dv2)


@pytest.mark.parametrize("dtype,rel", TOLERANCES)
def test_receivers_are_independent_of_their_neighbours_tiles(dtype, rel):
    """Each receiver's result is the same alone as in the batch (tiles never span receivers), and the
    sum over one receiver's tiles equals the reference on that receiver's edges only."""
    args, rowptr = make_case(dtype, 32, 128, seed=3)
    ds, dv = compiled.message_passing_cpu(**args, rowptr=rowptr, num_threads=1)
    for i in (7, 12, 15):  # 28, 56 and 85 edges
        a, b = int(rowptr[i]), int(rowptr[i + 1])
        one = dict(args, edge_index=args["edge_index"][:, a:b], cell_offsets=args["cell_offsets"][a:b],
                   edge_graph=args["edge_graph"][a:b])
        rp = torch.full((len(DEGREES) + 1,), 0, dtype=torch.int64)
        rp[i + 1:] = b - a
        ds1, dv1 = compiled.message_passing_cpu(**one, rowptr=rp, num_threads=1)
        assert torch.equal(ds1[i], ds[i]) and torch.equal(dv1[i], dv[i])
        ref_ds, ref_dv = reference_op(**one)
        assert_close(ds1[i], ref_ds[i], rel, f"ds[{i}]")
        assert_close(dv1[i], ref_dv[i], rel, f"dv[{i}]")
