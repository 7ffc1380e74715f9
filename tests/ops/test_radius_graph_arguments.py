"""The reference radius graph refuses the arguments the compiled builders refuse, with their wording.

Before, the reference accepted NaN positions, positions beyond 1e6 Å, a negative radius or
max_neighbors, and failed on a malformed ``ptr`` with einsum or indexing errors. (The CUDA and Triton
builders have checks of their own, worded their own way.)
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_params

from e3relax_fast import ops

OP = ops.RADIUS_GRAPH


def cases(device):
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, 0.2]], dtype=torch.float64, device=device)
    cell = torch.eye(3, dtype=torch.float64, device=device)[None] * 4.0
    ptr = torch.tensor([0, 2], device=device)

    def moved(value):
        p = pos.clone()
        p[1, 1] = value
        return p

    finite = "positions must be finite with |p| <= 1e6 Å"
    return {
        "NaN position": ((moved(float("nan")), cell, ptr, 6.0, 50, None), finite),
        "position beyond 1e6 Å": ((moved(-2e6), cell, ptr, 6.0, 50, None), finite),
        "negative radius": ((pos, cell, ptr, -1.0, 50, None), "radius must be in [0, 1e4)"),
        "NaN radius": ((pos, cell, ptr, float("nan"), 50, None), "radius must be in [0, 1e4)"),
        "radius 1e4": ((pos, cell, ptr, 1e4, 50, None), "radius must be in [0, 1e4)"),
        "negative max_neighbors": ((pos, cell, ptr, 6.0, -1, None), "max_neighbors"),
        "ptr too long": ((pos, cell, torch.tensor([0, 1, 2], device=device), 6.0, 50, None),
                         "ptr must have G + 1 entries"),
        "ptr not from 0": ((pos, cell, torch.tensor([1, 2], device=device), 6.0, 50, None), "ptr must be a CSR"),
        "ptr short of N": ((pos, cell, torch.tensor([0, 1], device=device), 6.0, 50, None), "ptr must be a CSR"),
        "ptr decreasing": ((pos, torch.cat([cell, cell]), torch.tensor([0, 3, 2], device=device), 6.0, 50, None),
                           "ptr must be a CSR"),
        "reserved too short": ((pos, cell, ptr, 6.0, 50, torch.tensor([0], device=device)),
                               "reserved must have one entry per atom"),
        "negative reserved": ((pos, cell, ptr, 6.0, 50, torch.tensor([0, -1], device=device)), "reserved must be >= 0"),
        "positions (N, 2)": ((pos[:, :2], cell, ptr, 6.0, 50, None), "positions must have shape (N, 3)"),
        "cells (G, 3, 2)": ((pos, cell[:, :, :2], ptr, 6.0, 50, None), "cells must have shape (G, 3, 3)"),
    }


@pytest.mark.parametrize("case", list(cases("cpu")))
@pytest.mark.parametrize("backend", backend_params(OP, "reference", "cpu"), indirect=True)
def test_invalid_arguments_raise_a_clear_value_error(backend, case):
    args, fragment = cases(backend.device)[case]
    with pytest.raises(ValueError, match=r"^radius_graph: ") as info:
        backend.fn(*args)
    assert fragment in str(info.value)


@pytest.mark.parametrize("backend", backend_params(OP, "reference", "cpu"), indirect=True)
def test_the_limits_themselves_are_accepted(backend):
    """|p| = 1e6 Å, radius 0 and max_neighbors 0 are valid (the checks are not off by one)."""
    pos = torch.tensor([[1e6, -1e6, 0.0], [1e6 - 1.0, -1e6, 0.5]], dtype=torch.float64, device=backend.device)
    cell = torch.eye(3, dtype=torch.float64, device=backend.device)[None] * 4.0
    ptr = torch.tensor([0, 2], device=backend.device)
    for radius, k in ((6.0, 50), (0.0, 50), (6.0, 0)):
        edge_index, *_ = backend.fn(pos, cell, ptr, radius, k, None)
        assert edge_index.shape[1] >= 12  # at least the six self-image edges of each atom
