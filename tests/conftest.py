"""Shared fixtures: golden data loaders and small random batches."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run on the CPU interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any e3relax_fast kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def golden_model():
    """The original implementation's H=32, L=4 golden run (see tests/data/model_h32_l4.json)."""
    with np.load(DATA / "model_h32_l4.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_graphs():
    with np.load(DATA / "graphs.npz") as z:
        return {k: z[k] for k in z.files}


def golden_batch(golden: dict, dtype=torch.float64):
    """The golden batch (4 crystals, 13 atoms, 465 edges) with the original's graph."""
    from e3relax_fast import Batch

    ptr = torch.zeros(len(golden["in/natoms"]) + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.from_numpy(golden["in/natoms"]), 0)
    return Batch(
        torch.from_numpy(golden["in/z"]),
        torch.from_numpy(golden["in/pos_u"]).to(dtype),
        torch.from_numpy(golden["in/cell_u"]).to(dtype),
        ptr,
        torch.from_numpy(golden["in/edge_index"]),
        torch.from_numpy(golden["in/cell_offsets"]),
    )


def golden_model_instance(golden: dict, paper_compat: bool = True, dtype=torch.float64):
    """E3Relax(H=32) holding the golden weights, loaded under their original names."""
    from e3relax_fast.model import E3Relax

    model = E3Relax(hidden_channels=32, num_layers=4, paper_compat=paper_compat)
    state = {k.removeprefix("param/"): torch.from_numpy(v) for k, v in golden.items() if k.startswith("param/")}
    model.load_state_dict(state)
    return model.to(dtype)
