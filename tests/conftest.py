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


def random_cell(rng, kind: str, lengths: dict | None = None):
    """A random (3, 3) cell (rows = lattice vectors, Å) of a kind used by the neighbour-list suites:
    "tiny" (much smaller than the 6 Å radius), "vacuum" (20 Å extra along c), "skewed" (angles down
    to 40°) or general. ``lengths`` overrides the (low, high) edge-length range per kind."""
    ranges = {"tiny": (1.5, 3.0), "vacuum": (3.0, 6.0), "general": (2.5, 9.0), **(lengths or {})}
    if kind == "tiny":
        edge = rng.uniform(*ranges["tiny"], 3)
    elif kind == "vacuum":
        edge = rng.uniform(*ranges["vacuum"], 3)
        edge[2] += 20.0
    else:
        edge = rng.uniform(*ranges["general"], 3)
    if kind == "skewed":
        al, be, ga = np.radians(rng.uniform(40.0, 140.0, 3))
    else:
        al, be, ga = np.radians(rng.choice([90.0, rng.uniform(60.0, 120.0)], 3))
    a = np.array([edge[0], 0.0, 0.0])
    b = edge[1] * np.array([np.cos(ga), np.sin(ga), 0.0])
    cx = np.cos(be)
    cy = (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
    cz2 = 1.0 - cx * cx - cy * cy
    if cz2 < 0.05:  # not a valid cell: fall back to a mildly skewed one
        cx, cy, cz2 = 0.3, 0.2, 0.87
    cell = np.stack([a, b, edge[2] * np.array([cx, cy, np.sqrt(cz2)])])
    if rng.random() < 0.3:  # arbitrary orientation
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        cell = cell @ q
    return cell


def random_batch(rng, sizes, kinds, unwrap: int = 0, lengths: dict | None = None):
    """``(positions (N, 3), cells (G, 3, 3), ptr (G+1,))`` float64 tensors of random crystals; with
    ``unwrap`` > 0 positions lie up to that many cells outside their cell (not wrapped)."""
    pos, cells, ptr = [], [], [0]
    for n, kind in zip(sizes, kinds, strict=True):
        cell = random_cell(rng, kind, lengths)
        frac = rng.random((n, 3))
        if unwrap:
            frac = frac + rng.integers(-unwrap, unwrap + 1, (n, 3))
        pos.append(frac @ cell)
        cells.append(cell)
        ptr.append(ptr[-1] + n)
    return torch.tensor(np.concatenate(pos)), torch.tensor(np.stack(cells)), torch.tensor(ptr)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For tiny models: intra-op threads only add overhead (a lot on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_close(got, expected, rel: float, name: str, check_dtype: bool = False) -> None:
    """Kernel-vs-reference check: same shape (and dtype with ``check_dtype``), every value finite (an
    unwritten NaN-poisoned output fails) and max |got - expected| <= rel * max |expected|, in float64."""
    if check_dtype:
        assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    err = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-30), f"{name}: max |err| {err:.3e} > {rel:.0e} * {scale:.3e}"


def run_with_grads(op, args: dict, inputs, requires, seed: int = 1, **kwargs):
    """``op(**args, **kwargs)`` (two outputs) and the gradients, with respect to the ``requires``
    entries of ``args`` that are not None, of a random linear functional of both outputs. Entries
    named in ``inputs`` are detached copies. Returns ``(out1, out2, {name: gradient})``."""
    requires = tuple(name for name in requires if args[name] is not None)
    args = {name: (v.detach().clone().requires_grad_(name in requires) if name in inputs and v is not None else v)
            for name, v in args.items()}
    out1, out2 = op(**args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(out1.shape, generator=gen, dtype=torch.float64).to(out1)
    w2 = torch.randn(out2.shape, generator=gen, dtype=torch.float64).to(out2)
    loss = (out1 * w1).sum() + (out2 * w2).sum()
    grads = dict(zip(requires, torch.autograd.grad(loss, [args[name] for name in requires]), strict=True))
    return out1.detach(), out2.detach(), grads


def require_triton_backend(op: str) -> None:
    """Skip the calling test module unless Triton's ``op`` backend can run here (call it at import)."""
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'e3relax-fast[triton]')")

    def version(text: str) -> tuple[int, int]:
        major, minor = text.split(".")[:2]
        return int(major), int(minor)

    if (os.environ.get("TRITON_INTERPRET") == "1" and version(triton.__version__) < (3, 7)
            and version(np.__version__) >= (2, 4)):
        pytest.skip(f"triton {triton.__version__}'s interpreter fails on loops over runtime bounds with "
                    f"numpy {np.__version__}: use triton >= 3.7 or numpy < 2.4", allow_module_level=True)
    from e3relax_fast import ops

    if "triton" not in ops.available(op):
        pytest.skip("triton backend not registered here (no CUDA device and TRITON_INTERPRET unset)",
                    allow_module_level=True)
