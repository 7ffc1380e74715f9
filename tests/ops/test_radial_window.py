"""The radial projection on a window of the basis (e3relax_fast/reference/radial_window.py, and its C++
twin csrc/radial_window.h in backend ``cpu`` of the gated message ops): the measured error bound
against the exact projection in float64, the ends of the range, the bases without a window, and the
compiled ops choosing exactly the twin's window."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, backend_only

from e3relax_fast import load_pretrained
from e3relax_fast.geometry import edge_vectors, lattice_vectors, safe_norm
from e3relax_fast.ops import compiled
from e3relax_fast.reference.radial_window import TAIL_TARGET, radial_window, tail_bound, windowed_projection
from e3relax_fast.reference.rbf import envelope, radial_basis, rbf_centres, rbf_coefficient

CUTOFF = 30.0


def basis(num_rbf: int = 128):
    centres = rbf_centres(num_rbf)
    return centres.double(), rbf_coefficient(centres)


def exact_projection(d, weight, bias, centres, coeff, cutoff=CUTOFF):
    return torch.nn.functional.linear(radial_basis(d, centres, coeff, cutoff), weight, bias)


def distances(centres, cutoff=CUTOFF):
    """Every scale of d: a fine grid over [0, 1.05 cutoff], the centres themselves and the points
    half-way between them (where the window is furthest from symmetric), and both ends of the range."""
    mu = centres * cutoff
    ends = torch.tensor([1e-4, 1e-3, 0.05, cutoff - 1e-9, cutoff, cutoff + 1e-9, 3 * cutoff], dtype=torch.float64)
    return torch.cat([torch.linspace(0.0, 1.05 * cutoff, 20001, dtype=torch.float64), mu, (mu[1:] + mu[:-1]) / 2,
                      ends])


# --------------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------------
def test_window_of_the_model_basis():
    """128 Gaussians as wide as their spacing: 15 centres, the 113 others at most 6.1e-13 of a peak
    (the nearest dropped centre is 7.5 spacings away: exp(-7.5²/2))."""
    centres, coeff = basis()
    w = radial_window(centres, coeff)
    assert (w.halfwidth, w.size) == (7, 15)
    assert w.tail <= TAIL_TARGET and w.tail == pytest.approx(math.exp(-7.5**2 / 2), rel=1e-3)
    assert w.spacing == pytest.approx(1 / 127) and w.deviation < 1e-7  # the float32 centres' ulps
    assert tail_bound(6, w.spacing, w.deviation, coeff) > TAIL_TARGET  # K = 6 would not do


def test_bases_without_a_narrow_window():
    centres, coeff = basis()
    assert radial_window(centres, coeff / 4).size == 31  # Gaussians twice as wide: twice the window
    spacing = float(centres[1] - centres[0])
    uneven = centres.clone()
    uneven[40:60] += 0.2 * spacing  # off the grid by a fifth of a spacing: the bound pays for it
    assert radial_window(uneven, coeff).size == 17
    uneven[40:60] += 0.3 * spacing
    assert radial_window(uneven, coeff) is None
    few, few_coeff = basis(12)
    assert radial_window(few, few_coeff) is None  # 15 centres would be all of them
    assert radial_window(centres, -coeff) is None


@pytest.mark.skipif(compiled._C is None, reason=f"compiled extension unavailable: {compiled.IMPORT_ERROR}")
def test_compiled_rule_is_the_twins():
    centres, coeff = basis()
    near, off = centres.clone(), centres.clone()
    near[40:60] += 0.2 * (centres[1] - centres[0])
    off[40:60] += 0.5 * (centres[1] - centres[0])
    for c, k in ((centres, coeff), (centres, coeff / 4), (*basis(20),), (*basis(16),), (*basis(12),), (near, coeff),
                 (off, coeff)):
        w = radial_window(c, k)
        got = compiled.radial_window(c, k)
        if w is None:
            assert got[:2] == (-1, c.shape[0])
        else:
            assert got[:2] == (w.halfwidth, w.size)
            assert got[2:] == pytest.approx((w.first, w.spacing, w.tail), rel=1e-12)
    assert compiled.radial_window(centres, coeff, radial="exact")[:2] == (-1, 128)


# --------------------------------------------------------------------------------------------------
# the measured error bound
# --------------------------------------------------------------------------------------------------
def check_bound(weight, bias, centres, coeff):
    """Windowed vs exact projection over every distance of :func:`distances`, in float64: each channel
    within u(x) · tail · max_k |W[c, k]| (plus rounding). Returns the largest error relative to the
    largest exact value."""
    w = radial_window(centres, coeff)
    d = distances(centres)
    exact = exact_projection(d, weight, bias, centres, coeff)
    windowed = windowed_projection(d, weight, bias, centres, coeff, CUTOFF, w)
    err = (windowed - exact).abs()
    row_max = weight.abs().max(dim=1).values
    rounding = 1e-15 * (radial_basis(d, centres, coeff, CUTOFF) @ weight.abs().t() + bias.abs())
    bound = envelope(d / CUTOFF).unsqueeze(-1) * w.tail * row_max + rounding
    assert (err <= bound).all(), f"{(err / bound).max():.3f} x the bound"
    return float(err.max() / exact.abs().max())


def test_measured_error_bound_random_weights():
    centres, coeff = basis()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=gen, dtype=torch.float64) / math.sqrt(128)
    bias = 0.1 * torch.randn(96, generator=gen, dtype=torch.float64)
    assert check_bound(weight, bias, centres, coeff) <= 1e-9  # measured 3.4e-13


@pytest.mark.slow
def test_measured_error_bound_shipped_model():
    """Every edge_proj and edge_local_proj of the shipped model (16 projections of 192 channels)."""
    model = load_pretrained("default").double()
    params = dict(model.named_parameters())
    centres, coeff = model.radial_basis.rbf.offset, model.radial_basis.rbf.coeff
    worst = 0.0
    for name, weight in params.items():
        if name.endswith(("edge_proj.weight", "edge_local_proj.weight")):
            worst = max(worst, check_bound(weight.detach(), params[name[:-len("weight")] + "bias"].detach(),
                                           centres, coeff))
    assert worst <= 1e-9  # measured 3.7e-13


def test_ends_of_the_range_are_exact():
    """Near d = 0 and at the cutoff the window is shifted inside the basis (it still holds the 8
    centres on the side of the range), and from the cutoff on the projection is exactly the bias."""
    centres, coeff = basis()
    w = radial_window(centres, coeff)
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(8, 128, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen,
                                                                                          dtype=torch.float64)
    near = torch.tensor([0.0, 1e-6, 0.5 * CUTOFF / 127, CUTOFF * (1 - 1e-12)], dtype=torch.float64)
    exact = exact_projection(near, weight, bias, centres, coeff)
    windowed = windowed_projection(near, weight, bias, centres, coeff, CUTOFF, w)
    assert_close(windowed, exact, 1e-12, "ends")
    beyond = torch.tensor([CUTOFF, CUTOFF + 1e-9, 45.0], dtype=torch.float64)
    assert torch.equal(windowed_projection(beyond, weight, bias, centres, coeff, CUTOFF, w), bias.expand(3, 8))
    assert torch.equal(exact_projection(beyond, weight, bias, centres, coeff), bias.expand(3, 8))


# --------------------------------------------------------------------------------------------------
# the compiled ops use the twin's window
# --------------------------------------------------------------------------------------------------
def windowed_message_passing(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph, edge_weight,
                             edge_bias, rbf_centres, rbf_coeff, cutoff):
    """reference/message_passing.py with the gate from the windowed projection."""
    h = vec.shape[2]
    j, i = edge_index
    r = edge_vectors(positions, cells, edge_index, cell_offsets, edge_graph)
    d = safe_norm(r)
    gate = windowed_projection(d, edge_weight, edge_bias, rbf_centres, rbf_coeff, cutoff,
                               radial_window(rbf_centres, rbf_coeff))
    b1, b2, b3 = (x_proj[j] * gate / math.sqrt(3)).split(h, dim=-1)
    msg_v = (b1.unsqueeze(1) * vec[j] - (r / d.unsqueeze(-1)).unsqueeze(-1) * b2.unsqueeze(1)) / math.sqrt(h)
    return (x_proj.new_zeros(len(vec), h).index_add_(0, i, b3),
            vec.new_zeros(vec.shape).index_add_(0, i, msg_v))


@backend_only("message_passing", "cpu")
@pytest.mark.parametrize("path", ["auto", "portable"])
def test_compiled_message_window_is_the_twins(path):
    """The C++ op and the windowed twin agree to rounding (measured 6e-16), while the exact op is
    3e-14 to 2e-13 from both: the C++ op keeps exactly the twin's centres."""
    from ops.test_message_passing import make_case

    args, rowptr = make_case(torch.float64, "cpu", hidden=24, cutoff=CUTOFF, seed=12)
    ds0, dv0 = windowed_message_passing(**args)
    ds, dv = compiled.message_passing_fused_cpu(**args, rowptr=rowptr, path=path)
    assert_close(ds, ds0, 2e-15, "ds")
    assert_close(dv, dv0, 2e-15, "dv")


@backend_only("lattice_message", "cpu")
@pytest.mark.parametrize("path", ["auto", "portable"])
def test_compiled_lattice_window_is_the_twins(path):
    from ops.test_lattice_message import random_case

    args = random_case(torch.float64, True, "cpu", hidden=24, cutoff=CUTOFF, seed=13, on_lattice_point=False)
    q = lattice_vectors(args["positions"], args["cells"], args["graph_index"], args["centres"])[:, 2]
    d = safe_norm(q)
    gate = args["x_proj"] * windowed_projection(d, args["edge_weight"], args["edge_bias"], args["rbf_centres"],
                                                args["rbf_coeff"], CUTOFF,
                                                radial_window(args["rbf_centres"], args["rbf_coeff"])) / math.sqrt(3)
    a1, a2, a3 = gate.split(24, dim=-1)
    v0 = (a1.unsqueeze(1) * args["vec"] - (q / d.unsqueeze(-1)).unsqueeze(-1) * a2.unsqueeze(1)) / math.sqrt(24)
    ds, v = compiled.lattice_message_fused_cpu(**args, k=2, path=path)
    assert_close(ds, a3, 2e-15, "ds")
    assert_close(v, v0, 2e-15, "v_out")
