"""One-shot relaxation of many crystal structures: validate, batch, build graphs, predict, convert back."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .batch import Batch
from .pretrained import load_pretrained
from .structures import InvalidStructureError, from_arrays_like, structure_kind, to_arrays, validate

ON_ERROR = ("raise", "skip", "return_input")

#: Atom budget per batch when neither ``batch_size`` nor ``max_atoms`` is given, per device type.
#: The CPU value keeps a batch of the full-size model (H = 512) to a few GB of activations.
DEFAULT_MAX_ATOMS = {"cpu": 4096}
#: Budget on accelerators (device types not in :data:`DEFAULT_MAX_ATOMS`).
DEFAULT_MAX_ATOMS_ACCELERATOR = 16384


class RelaxWarning(UserWarning):
    """Some structures could not be relaxed (``on_error="skip"`` or ``"return_input"``)."""


class RelaxResult(list):
    """The relaxed structures, one per input and in input order (a ``list``).

    Attributes:
        errors: ``{input index: reason}`` for every structure that was not relaxed; its entry in
            the list is ``None`` (``on_error="skip"``) or the unmodified input (``"return_input"``).
    """

    def __init__(self, items: Iterable = (), errors: dict[int, str] | None = None) -> None:
        super().__init__(items)
        self.errors = dict(errors or {})


def plan_batches(
    num_atoms: Sequence[int], batch_size: int | None = None, max_atoms: int | None = None
) -> list[list[int]]:
    """Group consecutive structures into batches.

    A batch is closed before it would exceed ``batch_size`` structures or ``max_atoms`` atoms in
    total (either bound may be ``None``); a structure larger than ``max_atoms`` forms a batch alone.

    Args:
        num_atoms: atom count of each structure, in order.

    Returns:
        Lists of positions into ``num_atoms``; every position appears exactly once, in order.
    """
    for name, value in (("batch_size", batch_size), ("max_atoms", max_atoms)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    batches: list[list[int]] = []
    current: list[int] = []
    atoms = 0
    for k, n in enumerate(num_atoms):
        too_many = batch_size is not None and len(current) >= batch_size
        too_large = max_atoms is not None and atoms + n > max_atoms
        if current and (too_many or too_large):
            batches.append(current)
            current, atoms = [], 0
        current.append(k)
        atoms += n
    if current:
        batches.append(current)
    return batches


PRECISIONS = ("default", "tf32", "bf16")


@contextlib.contextmanager
def inference_precision(precision: str, device: torch.device):
    """Matmul arithmetic for a forward pass (see ``relax_batch(precision=...)``); restores the
    global TF32 switches afterwards."""
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def _prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself if already on ``device`` in ``dtype``, else a moved copy (the caller's
    model is never modified)."""
    param = next(model.parameters())
    dtype = dtype or param.dtype
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if param.device != device or param.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model


def _predict(
    model: nn.Module,
    arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    device: torch.device,
    radius: float,
    max_neighbors: int,
    graph_backend: str,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Run one batch; return per-structure ``(n, 3)`` float64 positions (Å), ``(3, 3)`` float64
    cells (Å) and a ``(G,)`` bool array telling whether each structure's output is finite."""
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        # The graph is built from float64 inputs so it is the same whatever the model's dtype.
        batch = Batch.from_arrays(arrays, dtype=torch.float64).to(device)
        batch = batch.with_graph(radius, max_neighbors, backend=graph_backend).to(dtype=dtype)
        out = model(batch)
        positions, cells = out.positions[-1], out.cells[-1]
        bad_atoms = (~torch.isfinite(positions).all(dim=1)).to(torch.int64)
        bad_per_graph = torch.zeros(batch.num_graphs, dtype=torch.int64, device=positions.device)
        bad_per_graph.index_add_(0, batch.graph_index(), bad_atoms)
        finite = torch.isfinite(cells).flatten(1).all(dim=1) & (bad_per_graph == 0)
        positions = positions.to(torch.float64).cpu().numpy()
        cells = cells.to(torch.float64).cpu().numpy()
    splits = batch.ptr[1:-1].cpu().numpy()
    return np.split(positions, splits), list(cells), finite.cpu().numpy()


def relax_batch(
    structures,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    max_atoms: int | None = None,
    on_error: str = "raise",
    dtype: torch.dtype | None = None,
    radius: float = 6.0,
    max_neighbors: int = 50,
    graph_backend: str = "auto",
    refine=None,
    refine_steps: int = 0,
    refine_fmax: float = 0.05,
    precision: str = "default",
) -> RelaxResult:
    """Predict the relaxed structure of every input in one forward pass per batch.

    Args:
        structures: an iterable of pymatgen ``Structure``, ASE ``Atoms`` and/or
            ``(atomic_numbers (n,), positions (n, 3) Å, cell (3, 3) Å)`` triples; a single
            structure is accepted too (the result is still a list).
        model: an :class:`~e3relax_fast.model.E3Relax` (any module with its interface); ``None``
            loads ``load_pretrained("default")``, which raises while no pretrained model ships.
        device: where graphs are built and the model runs.
        batch_size: at most this many structures per batch.
        max_atoms: at most this many atoms per batch (a larger structure runs alone). When both
            bounds are ``None``, the budget is 4096 atoms on CPU and 16384 on accelerators.
        on_error: ``"raise"``: raise :class:`InvalidStructureError` for the first invalid input
            (before any model work) or non-finite prediction; ``"skip"``: put ``None`` there;
            ``"return_input"``: put the unmodified input there. Both non-raising modes emit one
            :class:`RelaxWarning` listing every failure and fill ``RelaxResult.errors``.
        dtype: model precision; ``None`` keeps the model's. A model on another device or dtype is
            copied, never modified.
        radius: graph radius in Å. max_neighbors: per-atom neighbour cap (spec §3).
        graph_backend: backend of :func:`~e3relax_fast.build_graph`.
        refine: optional potential to polish the predictions with: an ASE calculator or a batched
            calculator (see :mod:`e3relax_fast.fire`). When given with ``refine_steps > 0``, every
            prediction is continued with at most ``refine_steps`` batched FIRE + unit-cell-filter
            steps (fewer once forces/stress fall below ``refine_fmax`` eV/Å). Needs ASE. A structure
            the potential fails on keeps its one-shot prediction (reported by a RelaxWarning).
        precision: arithmetic of the model's matrix products, for inference speed:
            ``"default"`` (the model dtype's own arithmetic; torch's global TF32 switches are left as
            they are), ``"tf32"`` (TF32 tensor-core matmuls on CUDA; float32 models, CUDA only) or
            ``"bf16"`` (``torch.autocast`` to bfloat16: linear layers in bf16, everything else in
            float32; float32 models). Graphs and the returned structures stay float64. Accuracy
            against float64 is measured by ``bench/bench_precision.py`` (bench/RESULTS.md).

    Returns:
        :class:`RelaxResult`: one relaxed structure per input, in input order and of the input's
        type (see :func:`~e3relax_fast.structures.from_arrays_like`), positions not wrapped.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    items = [structures] if structure_kind(structures) is not None else list(structures)
    device = torch.device(device)
    if model is None:
        model = load_pretrained("default", map_location=device)
    model = _prepare_model(model, device, dtype)
    if precision != "default" and next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"precision={precision!r} needs a float32 model (pass dtype=torch.float32)")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision='tf32' needs a CUDA device, got device={str(device)!r}")
    num_elements = getattr(model, "num_elements", None)

    errors: dict[int, str] = {}

    def fail(index: int, reason: str) -> None:
        if on_error == "raise":
            raise InvalidStructureError(index, reason)
        errors[index] = reason

    arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for index, structure in enumerate(items):
        try:
            z, positions, cell = to_arrays(structure, index=index)
            validate(z, positions, cell, index=index)
        except InvalidStructureError as err:
            fail(index, err.reason)
            continue
        if num_elements is not None and z.max() >= num_elements:
            fail(
                index, f"element Z={int(z.max())} is outside the model's table (num_elements={num_elements})"
            )
            continue
        arrays[index] = (z, positions, cell)

    if max_atoms is None and batch_size is None:
        max_atoms = DEFAULT_MAX_ATOMS.get(device.type, DEFAULT_MAX_ATOMS_ACCELERATOR)
    valid = list(arrays)
    results: list = [None] * len(items)
    predicted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    was_training = model.training
    model.eval()
    try:
        for group in plan_batches([len(arrays[i][0]) for i in valid], batch_size, max_atoms):
            indices = [valid[k] for k in group]
            with inference_precision(precision, device):
                positions, cells, finite = _predict(
                    model, [arrays[i] for i in indices], device, radius, max_neighbors, graph_backend
                )
            for index, pos, cell, ok in zip(indices, positions, cells, finite, strict=True):
                if ok:
                    results[index] = from_arrays_like(items[index], pos, cell)
                    predicted[index] = (pos, cell)
                else:
                    fail(index, "the model's prediction contains NaN or inf")
    finally:
        model.train(was_training)
    if refine is not None and refine_steps > 0 and predicted:
        _refine(items, arrays, predicted, results, refine, refine_steps, refine_fmax)

    errors = dict(sorted(errors.items()))
    if errors:
        for index in errors:
            results[index] = items[index] if on_error == "return_input" else None
        outcome = "returned unchanged" if on_error == "return_input" else "skipped (None in the result)"
        listing = "; ".join(f"[{index}] {reason}" for index, reason in errors.items())
        warnings.warn(
            f"relax_batch: {len(errors)} of {len(items)} structure(s) could not be relaxed and were "
            f"{outcome}: {listing}",
            RelaxWarning,
            stacklevel=2,
        )
    return RelaxResult(results, errors)


def _refine(items, arrays, predicted, results, calculator, steps: int, fmax: float) -> None:
    """Continue each prediction with a few batched FIRE steps (in place in ``results``)."""
    from ase import Atoms

    from .datagen import BatchedFIRE

    indices = list(predicted)
    start = [Atoms(numbers=arrays[i][0], positions=predicted[i][0], cell=predicted[i][1], pbc=True) for i in indices]
    outcomes = BatchedFIRE(calculator, fmax=fmax, max_steps=steps).relax(start)
    failed = []
    for index, outcome in zip(indices, outcomes, strict=True):
        if outcome.error is not None:
            failed.append(index)
            continue
        results[index] = from_arrays_like(items[index], outcome.atoms.positions, outcome.atoms.cell.array)
    if failed:
        warnings.warn(f"relax_batch: refinement failed for structure(s) {failed}; their one-shot predictions "
                      "are returned", RelaxWarning, stacklevel=3)
