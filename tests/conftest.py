"""Fixtures, the Triton interpreter switch and the marker logic; shared helpers are in helpers.py.

Markers (registered in pyproject.toml, ``--strict-markers``; nothing is deselected by default):

* ``gpu``: needs a CUDA device; skipped here, with that reason, when there is none;
* ``interpret``: runs Triton kernels on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below
  when there is no GPU): slow, so ``-m "not interpret"`` leaves them out;
* ``slow``: takes more than about 10 s on a 2-core CPU machine (``-m "not slow"``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run on the CPU interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any e3relax_fast kernel module (or helpers.py) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ``from helpers import ...`` from every folder of tests/ (pyproject's pythonpath says the same).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import DATA, load_backend, poison_triton_outputs  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu): torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_model():
    """The original implementation's H=32, L=4 golden run (see tests/data/model_h32_l4.json)."""
    with np.load(DATA / "model_h32_l4.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_graphs():
    """The original pipeline's graphs of 26 structures (see tests/data/graphs.json)."""
    with np.load(DATA / "graphs.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def backend(request, monkeypatch):
    """The backend a test is parametrized over (``helpers.backend_params(op, ...)``, ``indirect=True``):
    a :class:`helpers.Backend` holding its device and implementation."""
    op, name = request.param
    return load_backend(op, name, monkeypatch)


@pytest.fixture
def poisoned_triton_outputs(monkeypatch):
    """Every buffer the Triton kernels must fill starts poisoned (``helpers.backend_only(op, "triton")``
    applies it to Triton-only tests; the ``backend`` fixture does it for Triton itself)."""
    poison_triton_outputs(monkeypatch)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For tiny models: intra-op threads only add overhead (a lot on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
