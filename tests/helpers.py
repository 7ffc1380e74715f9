"""Helpers shared by the test suite (``from helpers import ...``; tests/ is on ``sys.path``).

* golden data: :data:`DATA`, :func:`golden_batch`, :func:`golden_model_instance`;
* random inputs: :func:`random_cell`, :func:`random_batch`, the radius-graph cases :data:`GRAPH_CASES`
  (:func:`graph_case`, :func:`graph_case_params`), training pairs :func:`denoising_pairs`;
* checks: :data:`TOLERANCES`, :func:`assert_close`, :func:`run_with_grads`;
* backends: :func:`backend_params` (parameters of a test run once per backend of an op, through
  conftest's ``backend`` fixture; a backend that cannot run here is skipped with the reason),
  :func:`backend_only` (a test of one backend alone), :func:`backend_device` (the device a backend's
  tests put their tensors on), :func:`triton_module`, :func:`nvcc_present`;
* radius-graph oracles: :func:`oracle_lengths`, :func:`fcc_supercell`;
* ahead-of-time compiles for sm_90: :func:`compile_in_subprocess`, :data:`H100_MAX_SHARED`,
  :data:`CUBIN_RESOURCES` (a compiled kernel's registers and local memory, for the subprocess scripts).

Fixtures live in conftest.py (which also switches Triton to its CPU interpreter when there is no GPU,
before anything imports this module).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).parent / "data"
# Kernel-vs-reference tolerances, relative to the outputs' scale (see assert_close).
TOLERANCES = [pytest.param(torch.float64, 1e-10, id="float64"), pytest.param(torch.float32, 5e-6, id="float32")]
CUDA = torch.cuda.is_available()
# Triton kernels run on the CPU interpreter (set by conftest.py without a GPU, or by the caller).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------------
# golden data
# --------------------------------------------------------------------------------------------------
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


def golden_model_grown(golden: dict, option: str, prefix: str):
    """``(plain, grown)``: the golden weights in a default-mode E3Relax(H=32), and in one that also has
    the architecture option ``option`` (a part that starts at zero), whose missing weights are exactly
    those under ``prefix``."""
    from e3relax_fast.model import E3Relax

    plain = golden_model_instance(golden, paper_compat=False)
    grown = E3Relax(hidden_channels=32, num_layers=4, **{option: True}).to(torch.float64)
    missing, unexpected = grown.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(prefix) for k in missing)
    return plain, grown


def assert_same_predictions(plain, grown, batch):
    """Every layer's positions and cells of ``grown`` on ``batch`` are ``plain``'s, bit for bit (a
    part grown from zero changes nothing until it is trained); returns ``grown``'s output."""
    out_plain, out = plain(batch), grown(batch)
    for a, b in zip(out_plain.positions + out_plain.cells, out.positions + out.cells, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return out


def assert_rotation_equivariant(model, batch, seed: int) -> None:
    """Every layer's positions and cells of ``model`` on ``batch`` rotate with the input (an
    orthogonal matrix drawn with ``seed``), to 1e-11 Å in float64; ``batch`` is rotated in place."""
    out = model(batch)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    batch.positions, batch.cells = batch.positions @ q.T, batch.cells @ q.T
    rotated = model(batch)
    for a, b in zip(out.positions + out.cells, rotated.positions + rotated.cells, strict=True):
        torch.testing.assert_close(a @ q.T, b, rtol=0, atol=1e-11)


def assert_checkpoint_keeps(tmp_path, **options) -> None:
    """An E3Relax(H=8, L=2) with the architecture ``options``, every weight moved off its start, saved
    with its config and as a bare state dict, loads back with those options and the same weights; a
    model without them loads as without."""
    from e3relax_fast import E3Relax, load_pretrained

    torch.manual_seed(0)
    model = E3Relax(hidden_channels=8, num_layers=2, **options)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.1 * torch.randn_like(weight))
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "with.pt")
    loaded = load_pretrained(tmp_path / "with.pt")
    assert all(loaded.config[k] == v for k, v in options.items())
    for key, weight in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], weight, rtol=0, atol=0)
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict says it by its keys
    assert all(load_pretrained(tmp_path / "bare.pt", paper_compat=False).config[k] == v for k, v in options.items())
    torch.save(E3Relax(hidden_channels=8, num_layers=2).state_dict(), tmp_path / "plain.pt")
    assert not any(load_pretrained(tmp_path / "plain.pt", paper_compat=False).config[k] for k in options)


def assert_strain_is_a_crystal_property(strain, crystal, features) -> None:
    """``strain(arrays, features) -> (G, 3, 3)`` (a bond strain of ``crystal = (z, pos, cell)`` with atom
    scalars ``features``) is non-zero, symmetric, and the same for another basis of the lattice with the
    atoms wrapped by lattice vectors and for a 2 x 1 x 1 supercell (twice the atoms and the bonds)."""
    z, pos, cell = crystal
    eps = strain([(z, pos, cell)], features)[0]
    assert eps.abs().max() > 1e-4
    torch.testing.assert_close(eps, eps.T, rtol=0, atol=1e-15)
    other = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1]]) @ cell  # unimodular: the same lattice
    wrapped = pos + np.array([[1, -2, 0], [0, 1, 1]]) @ cell
    torch.testing.assert_close(strain([(z, wrapped, other)], features)[0], eps, rtol=0, atol=1e-12)
    super_cell = cell * np.array([[2.0], [1.0], [1.0]])
    super_pos = np.concatenate([pos, pos + cell[0]])
    super_eps = strain([(np.tile(z, 2), super_pos, super_cell)], features.repeat(2, 1))[0]
    torch.testing.assert_close(super_eps, eps, rtol=0, atol=1e-12)


def assert_runs_under_bf16(model, structure) -> None:
    """``relax_batch(precision="bf16")`` of ``model`` on ``structure``: finite, in the float32 dtype, and
    within 0.05 Å of the float32 cell without being equal to it (the linear maps run in bf16, the sums
    over the bonds stay in float32: a bf16 source once broke a per-crystal index_add)."""
    from e3relax_fast import relax_batch

    (_, pos32, cell32), = relax_batch([structure], model, dtype=torch.float32)
    (_, pos16, cell16), = relax_batch([structure], model, dtype=torch.float32, precision="bf16")
    assert pos16.dtype == pos32.dtype and np.isfinite(cell16).all()
    assert 0 < np.abs(cell16 - cell32).max() < 0.05


# --------------------------------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------------------------------
def random_rotation(rng) -> np.ndarray:
    """A random proper rotation matrix (3, 3) drawn with ``rng``."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def random_unimodular(rng) -> np.ndarray:
    """A random integer (3, 3) matrix with determinant +1 and entries in {-1, 0, 1}: another basis
    of the same lattice."""
    while True:
        m = rng.integers(-1, 2, (3, 3))
        if round(np.linalg.det(m)) == 1:
            return m


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


# Random neighbour-list batches shared by the radius-graph suites (tests/ops/): (seed, sizes, kinds,
# unwrap, radius, max_neighbors, reserved, dtype, lengths). Each runs without ``reserved`` and, where
# the flag is set, with random 0/1 reserved slots. SMALL cells keep Triton's interpreter (which pays
# per tested image) quick.
SMALL = {"tiny": (2.0, 3.0), "vacuum": (3.0, 5.0), "general": (2.5, 6.0)}
GRAPH_CASES = [
    (1000, [1], ["tiny"], 0, 6.0, 50, False, torch.float64, None),
    (1001, [1, 1, 2], ["tiny", "gen", "tiny"], 3, 6.0, 50, True, torch.float64, None),
    (1002, [3, 2], ["tiny", "skewed"], 0, 7.5, 80, False, torch.float32, None),
    (1003, [5, 8, 1], ["skewed", "skewed", "gen"], 2, 6.0, 50, True, torch.float64, None),
    (1004, [12, 4], ["vacuum", "vacuum"], 50, 6.0, 50, False, torch.float64, None),
    (1005, [20, 3, 7], ["gen", "skewed", "tiny"], 1, 4.0, 12, True, torch.float32, None),
    (1006, [40], ["skewed"], 0, 6.0, 50, False, torch.float64, None),
    (1007, [9, 9], ["gen", "vacuum"], 0, 6.0, 0, False, torch.float64, None),
    (1008, [6, 2, 6], ["tiny", "tiny", "skewed"], 0, 3.0, 1, True, torch.float64, None),
    (1, [1, 1, 2], ["tiny", "skewed", "tiny"], 0, 6.0, 50, True, torch.float64, SMALL),
    (2, [3, 1, 5], ["skewed", "vacuum", "plain"], 3, 6.0, 50, True, torch.float64, SMALL),
    (3, [2, 4], ["vacuum", "skewed"], 2, 5.0, 24, True, torch.float32, SMALL),
    (4, [1, 3, 2], ["tiny", "plain", "skewed"], 50, 6.0, 50, True, torch.float32, SMALL),
    (5, [6, 1], ["plain", "tiny"], 1, 4.0, 7, True, torch.float64, SMALL),
    (6, [12, 1, 3], ["plain", "skewed", "vacuum"], 1, 6.0, 50, True, torch.float64, SMALL),
]


def graph_case(case):
    """``(positions, cells, ptr, radius, max_neighbors, [None, reserved?])`` of a :data:`GRAPH_CASES` entry."""
    seed, sizes, kinds, unwrap, radius, k, use_reserved, dtype, lengths = case
    rng = np.random.default_rng(seed)
    pos, cells, ptr = random_batch(rng, sizes, kinds, unwrap, lengths=lengths)
    reserved = [None]
    if use_reserved:
        reserved.append(torch.from_numpy(rng.integers(0, 2, pos.shape[0])))
    return pos.to(dtype), cells.to(dtype), ptr, radius, k, reserved


def graph_case_params(slow_seeds=()):
    """:data:`GRAPH_CASES` as parameters named by seed; ``slow_seeds`` get the ``slow`` marker."""
    return [pytest.param(case, id=f"seed{case[0]}", marks=[pytest.mark.slow] if case[0] in slow_seeds else [])
            for case in GRAPH_CASES]


def denoising_pairs(n: int, seed: int) -> list:
    """Rattled + strained rock-salt-like cells (unrelaxed) and the ideal cells (relaxed)."""
    from e3relax_fast.io import Pair

    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        a = rng.uniform(3.8, 4.6)
        frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0.5]])[: rng.integers(1, 5)]
        z = rng.choice([3, 8, 11, 12, 17, 19], size=len(frac))
        cell_r = np.eye(3) * a
        strain = np.eye(3) + rng.uniform(-0.04, 0.04, (3, 3))
        cell_u = cell_r @ (strain + strain.T) / 2
        pos_r = frac @ cell_r
        pos_u = frac @ cell_u + rng.normal(0, 0.08, frac.shape)
        pairs.append(Pair(f"p{k}", z.astype(np.int64), pos_u, cell_u, pos_r, cell_r))
    return pairs


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------
def assert_close(got, expected, rel: float, name: str, check_dtype: bool = False) -> None:
    """Kernel-vs-reference check: same shape (and dtype with ``check_dtype``), every value finite (an
    unwritten NaN-poisoned output fails) and max |got - expected| <= rel * max |expected|, in float64.
    Tensors on different devices are compared on the CPU."""
    if check_dtype:
        assert got.dtype == expected.dtype, f"{name}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten output?)"
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    err = (got - expected).abs().max().item() if got.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
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


def to_device(args: dict, device) -> dict:
    """``args`` with every tensor moved to ``device``."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


# --------------------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------------------
# Not an op-table backend: the C++ CPU launcher of the CUDA message kernel (same header functions in
# the same order), which tests the kernel's logic without a GPU.
CUDA_EMULATED = "cuda_emulated"


def backend_device(name: str) -> torch.device:
    """Where the tests of backend ``name`` put their tensors: Triton on CUDA unless its CPU interpreter
    is on (``TRITON_INTERPRET=1``, then CPU); cuda on CUDA; cueq on CUDA when there is a device (its
    ``uniform_1d`` method), else on CPU (its naive method); the others on CPU."""
    if name == "triton":
        return torch.device("cuda" if CUDA and not INTERPRET else "cpu")
    if name == "cuda" or (name == "cueq" and CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def unavailable(op: str, name: str) -> str | None:
    """Why backend ``name`` of ``op`` cannot run its tests here, or None."""
    device = backend_device(name)
    if device.type == "cuda" and not CUDA:
        return "no CUDA device"
    if name == CUDA_EMULATED:
        from e3relax_fast.ops import compiled

        return None if compiled._C is not None else f"compiled extension unavailable: {compiled.IMPORT_ERROR}"
    if name == "triton":
        try:
            triton = importlib.import_module("triton")
        except ImportError:
            return "triton is not installed (pip install 'e3relax-fast[triton]')"
        if INTERPRET and _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
            return (f"triton {triton.__version__}'s interpreter fails on loops over runtime bounds with "
                    f"numpy {np.__version__}: use triton >= 3.7 or numpy < 2.4")
    if name == "cueq" and importlib.util.find_spec("cuequivariance_torch") is None:
        return "cuequivariance-torch is not installed (pip install 'e3relax-fast[cueq]')"
    from e3relax_fast import ops

    try:
        ops.resolve(op, name, device.type)
    except ops.BackendUnavailableError as exc:
        return str(exc)
    return None


def _marks(op: str, name: str) -> list:
    """``gpu`` for a backend that runs on CUDA here, ``interpret`` for Triton on the CPU interpreter,
    and a skip naming the reason when the backend cannot run here."""
    marks = []
    if backend_device(name).type == "cuda":
        marks.append(pytest.mark.gpu)
    if name == "triton" and INTERPRET:
        marks.append(pytest.mark.interpret)
    reason = unavailable(op, name)
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"{op} backend {name!r} unavailable: {reason}"))
    return marks


@dataclass(frozen=True)
class Backend:
    """A backend under test (the ``backend`` fixture of conftest.py): its name, the device its tests
    use, its implementation of the op and whether that is differentiable."""

    op: str
    name: str
    device: torch.device
    fn: Callable
    differentiable: bool


def backend_params(op: str, *names: str, slow: set[str] | frozenset[str] = frozenset()) -> list:
    """Parameters for the ``backend`` fixture (``indirect=True``): one per backend of ``op``, with the
    marks of :func:`_marks`, and ``slow`` for the backends named in ``slow``."""
    return [pytest.param((op, name), id=name, marks=_marks(op, name) + ([pytest.mark.slow] if name in slow else []))
            for name in names]


def load_backend(op: str, name: str, monkeypatch) -> Backend:
    """The :class:`Backend` for a test; Triton's output buffers start NaN-poisoned."""
    device = backend_device(name)
    if name == CUDA_EMULATED:
        from e3relax_fast.ops import compiled

        return Backend(op, name, device, compiled.message_passing_cpu, differentiable=False)
    from e3relax_fast import ops

    resolved, fn = ops.resolve(op, name, device.type)
    assert resolved == name
    if name == "triton":
        poison_triton_outputs(monkeypatch)
    return Backend(op, name, device, fn, ops.OPS[op].impls[name].differentiable)


def model_trains(backend: str, device_type: str) -> bool:
    """Whether a model with ``backend`` named runs under autograd on ``device_type``: every gated op it
    takes there supports it (backend "cpu": its lattice op is forward only)."""
    from e3relax_fast import ops

    return all(ops.OPS[op].impls[ops.resolve(op, backend, device_type)[0]].differentiable
               for op in (ops.MESSAGE_PASSING, ops.LATTICE_MESSAGE, ops.LATTICE_POOL))


def backend_only(op: str, name: str):
    """Decorator for a test of backend ``name`` alone: its marks (see :func:`_marks`) and, for Triton,
    NaN-poisoned output buffers (conftest's ``poisoned_triton_outputs``)."""
    marks = _marks(op, name)
    if name == "triton":
        marks.append(pytest.mark.usefixtures("poisoned_triton_outputs"))

    def decorate(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return decorate


def triton_module(op: str):
    """The kernels/ module holding Triton's ``op`` (``e3relax_fast.kernels.<op>``)."""
    from e3relax_fast import ops

    return importlib.import_module(ops.OPS[op].load("triton").__module__)


def poison_triton_outputs(monkeypatch) -> None:
    """Every buffer the Triton kernels must fill starts poisoned (NaN / -7), so an unwritten element fails."""
    package = triton_module("lattice_pool").__name__.rpartition(".")[0]
    monkeypatch.setattr(importlib.import_module(f"{package}.utils"), "POISON_OUTPUTS", True)


def nvcc_present() -> bool:
    """nvcc can be found (and E3RELAX_NO_CUDA is not set): the compiled extension has its CUDA part."""
    if os.environ.get("E3RELAX_NO_CUDA", "").strip() not in ("", "0"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool((home and os.path.isfile(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc")
                or os.path.isfile("/usr/local/cuda/bin/nvcc") or glob.glob("/usr/local/cuda-*/bin/nvcc"))


H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def compile_in_subprocess(script: str, *args: str) -> dict:
    """Run ``script`` (which compiles kernels for sm_90 and prints one JSON line) in a subprocess and
    return that line. A subprocess because this session runs Triton's interpreter (conftest.py), under
    which Triton hands out interpreted functions that cannot be compiled."""
    import json

    import e3relax_fast

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, stated so no test depends on the caller's
    package_root = str(Path(e3relax_fast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Resources of a compiled kernel from its cubin (cuobjdump -res-usage, the tool Triton ships):
# registers per thread and local memory per thread (stack frame + local arrays). The CUDA driver
# reports the latter as CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, from which Triton's CompiledKernel.n_spills
# is local bytes / 4 once the kernel is loaded on a device; without a device it is read here.
CUBIN_RESOURCES = r"""
import re, subprocess, tempfile
from triton import knobs

def resources(kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text)}
    local = usage["STACK"] + usage["LOCAL"]
    return {"n_regs": usage["REG"], "local": local, "n_spills": local // 4, "shared": kernel.metadata.shared,
            "cubin": len(kernel.asm["cubin"]), "ptx_head": kernel.asm["ptx"][:4000],
            "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"), "ex2": kernel.asm["ptx"].count("ex2.approx")}
"""


def oracle_lengths(dp: np.ndarray, o: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """|dp + o @ cell| in spec §3's float64 operation order, ((o0 a + o1 b) + o2 c) then
    sqrt((x*x + y*y) + z*z) (the order decides ties bit for bit). dp (..., 3), o (..., 3) int,
    cell (3, 3) rows. The NumPy oracle of the radius-graph tests."""
    of = o.astype(np.float64)
    shift = of[..., 0:1] * cell[0]
    shift = shift + of[..., 1:2] * cell[1]
    shift = shift + of[..., 2:3] * cell[2]
    r = dp + shift
    return np.sqrt(r[..., 0] * r[..., 0] + r[..., 1] * r[..., 1] + r[..., 2] * r[..., 2])


def fcc_supercell(a: float, reps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A perfect fcc crystal of lattice constant ``a`` Å repeated ``reps`` times along each axis, as
    ``(positions (4 reps^3, 3), cells (1, 3, 3), ptr)`` float64 tensors: many exactly tied distances."""
    import itertools

    basis = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    fcc = np.array([(np.array(c) + b) * a for c in itertools.product(range(reps), repeat=3) for b in basis])
    return torch.tensor(fcc), torch.tensor(np.eye(3) * reps * a)[None], torch.tensor([0, len(fcc)])
