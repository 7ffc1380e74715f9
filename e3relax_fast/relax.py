"""One-shot relaxation of many crystal structures: validate, batch, build graphs, predict, convert back."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import ops
from .batch import Batch, plan_batches
from .frame import SYMPREC, CanonicalFrame, FrameError, SlabFrame, slab_frame
from .frame_workers import canonical_frames
from .geometry import MAX_NEIGHBORS, RADIUS
from .graph import build_graph, drop_images
from .io import (
    Constraints,
    InvalidStructureError,
    constraints,
    from_arrays_like,
    original_reserved_slots,
    periodicity,
    structure_kind,
    to_arrays,
    to_atoms,
    validate,
)
from .model import load_pretrained, predict_batches
from .model.bond_radii import NUM_RELATIVE_BASIS, OWN_IMAGES
from .model.predict import PRECISIONS, check_device
from .model.virial import BOND_WIDTH
from .uncertainty import frame_spread

ON_ERROR = ("raise", "skip", "return_input")

#: Atom budget per batch when neither ``batch_size`` nor ``max_atoms`` is given, per device type.
#: CPU, with the fused ``cpu`` message ops (the default where the extension is built): a batch keeps
#: only node-sized tensors, and one crystal at a time re-reads every weight matrix per crystal, so
#: batching pays at every size; about a thousand atoms was the fastest at H = 64 and H = 512
#: (320 MP-like crystals, 1 thread: 6.6x and 3.6x one at a time; 1.9-6.7x from 64 to 8192 atoms).
DEFAULT_MAX_ATOMS = {"cpu": 1024}
#: CPU budget when the model's message ops are the pure-PyTorch reference (no compiled extension, or
#: ``backend="reference"``): their (edges x 3H) tensors leave the caches as a batch grows, and
#: batches over ~100 atoms were measured slower than one crystal at a time at H = 512 (64 atoms:
#: 1.1x at H = 512, 1.3x at H = 64; 2048 atoms: 0.7x, 0.9x).
DEFAULT_MAX_ATOMS_REFERENCE_OPS = 64
#: Budget on accelerators (device types not in :data:`DEFAULT_MAX_ATOMS`).
DEFAULT_MAX_ATOMS_ACCELERATOR = 16384
#: Share of the free CUDA memory a batch may plan to use (the rest: allocator fragmentation, the
#: graph builder's buffers, other processes); a batch that still runs out is split and retried.
MEMORY_FRACTION = 0.5


class RelaxWarning(UserWarning):
    """Some structures could not be relaxed (``on_error="skip"`` or ``"return_input"``)."""


class CloseAtomsWarning(UserWarning):
    """Some structures have atoms closer than 0.5 Å (accepted, but implausible; 0.1 Å is refused).

    Attributes:
        structures: ``{input index: "atoms i and j are d Å apart"}``.
    """

    def __init__(self, message: str, structures: dict[int, str]) -> None:
        super().__init__(message)
        self.structures = structures


class RelaxResult(list):
    """The relaxed structures, one per input and in input order (a ``list``).

    Attributes:
        errors: ``{input index: reason}`` for every structure that was not relaxed; its entry in
            the list is ``None`` (``on_error="skip"``) or the unmodified input (``"return_input"``).
        uncertainty: with ``return_uncertainty=True``, one value per input in Å
            (:func:`~e3relax_fast.uncertainty.frame_spread`: the spread of the predictions over other
            descriptions of the crystal; it ranks error, it is not an error bar); ``None`` where the
            structure failed or is not in the canonical frame (slabs, ``frame="input"``).
    """

    def __init__(self, items: Iterable = (), errors: dict[int, str] | None = None,
                 uncertainty: list[float | None] | None = None) -> None:
        super().__init__(items)
        self.errors = dict(errors or {})
        self.uncertainty = uncertainty


def _prepare_model(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself if already on ``device`` in ``dtype``, else a moved copy (the caller's
    model is never modified). A parameter-free model (a baseline) is used as it is."""
    param = next(model.parameters(), None)
    if param is None:
        return model
    dtype = dtype or param.dtype
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if param.device != device or param.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model


def relax_batch(
    structures,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
    max_atoms: int | None = None,
    on_error: str = "raise",
    dtype: torch.dtype | None = None,
    radius: float = RADIUS,
    max_neighbors: int = MAX_NEIGHBORS,
    graph_backend: str = "auto",
    refine=None,
    refine_steps: int = 0,
    refine_fmax: float = 0.05,
    precision: str = "default",
    frame: str = "auto",
    symmetry: str = "auto",
    symprec: float = SYMPREC,
    return_uncertainty: bool = False,
    frame_workers: int | str = "auto",
) -> RelaxResult:
    """Predict the relaxed structure of every input in one forward pass per batch.

    Args:
        structures: an iterable of pymatgen ``Structure``, ASE ``Atoms`` and/or
            ``(atomic_numbers (n,), positions (n, 3) Å, cell (3, 3) Å)`` triples; a single
            structure is accepted too (the result is still a list).
        model: an :class:`~e3relax_fast.model.E3Relax` (any module with its interface), or a name or
            checkpoint path for :func:`~e3relax_fast.model.load_pretrained`; ``None``: ``"default"``,
            the shipped model. ``paper_compat`` models see the original's graph (its 49-slot rule,
            spec §3.2, from pymatgen's neighbour list as the original computed it).
        device: where graphs are built and the model runs (``ValueError`` if it is not available).
        batch_size: at most this many structures per batch.
        max_atoms: at most this many atoms per batch (a larger structure runs alone). When both
            bounds are ``None``, the budget is 1024 atoms on CPU (64 when the model's message ops
            are the pure-PyTorch reference, which slows down on larger batches); on CUDA, what fits in half the
            free memory with every atom at its maximum in-degree (56 edges), at most 16384. A batch
            that runs out of memory anyway is split in halves and retried, down to one structure;
            a structure that does not fit alone fails with that reason (``on_error`` applies).
        on_error: ``"raise"``: raise :class:`InvalidStructureError` for the first invalid input
            (before any model work) or non-finite prediction; ``"skip"``: put ``None`` there;
            ``"return_input"``: put the unmodified input there. Both non-raising modes emit one
            :class:`RelaxWarning` listing every failure and fill ``RelaxResult.errors``.
        dtype: model precision; ``None`` keeps the model's. A model on another device or dtype is
            copied, never modified.
        radius: graph radius in Å. max_neighbors: per-atom neighbour cap (spec §3).
        graph_backend: backend of :func:`~e3relax_fast.build_graph`.
        refine: optional potential to polish the predictions with: an ASE calculator or a batched
            calculator (see :mod:`e3relax_fast.datagen.fire`). When given with ``refine_steps > 0``, every
            prediction is continued with at most ``refine_steps`` batched FIRE + unit-cell-filter
            steps (fewer once forces/stress fall below ``refine_fmax`` eV/Å). Needs ASE. A structure
            the potential fails on keeps its one-shot prediction (reported by a RelaxWarning).
        precision: arithmetic of the model's matrix products, for inference speed:
            ``"default"`` (the model dtype's own arithmetic; torch's global TF32 switches are left as
            they are), ``"tf32"`` (TF32 tensor-core matmuls on CUDA; float32 models, CUDA only) or
            ``"bf16"`` (``torch.autocast`` to bfloat16: linear layers in bf16, everything else in
            float32; float32 models). Graphs and the returned structures stay float64. Accuracy
            against float64 is measured by ``bench/bench_precision.py`` (bench/RESULTS.md).
        frame: ``"canonical"``: the model predicts each crystal in its canonical description
            (:mod:`e3relax_fast.frame`: primitive standard cell, one choice among equivalent ones)
            and the prediction is mapped back to the input's cell, basis, orientation and atom
            order, so the same crystal gets the same answer however it is written; ``"input"``: the
            model sees the input as given. ``"auto"``: canonical, except for ``paper_compat`` models
            (the original's raw behaviour).
        symmetry: ``"keep"``: the prediction is projected onto the input's space group (found at
            ``symprec`` Å), so Wyckoff-fixed atoms stay put and a cubic cell stays cubic (needs the
            canonical frame); ``"free"``: no projection. ``"auto"``: keep with the canonical frame.
        symprec: symmetry tolerance in Å; symmetry found within it is made exact in the input.
        return_uncertainty: also compute ``RelaxResult.uncertainty`` (costs two more forward passes
            per structure: about 2.4 times the time of the call without it).
        frame_workers: worker processes that build canonical frames beside this one
            (:mod:`e3relax_fast.frame_workers`; moyopy's symmetry search holds the GIL, so threads
            cannot): ``"auto"``: on a machine with at least 4 cores per process (per local rank of
            a ``torchrun`` job), one per core beyond this process's, at most 8, for calls with at
            least 64 crystals; ``0``: none; a number: that many. Same frames either way.

    Returns:
        :class:`RelaxResult`: one relaxed structure per input, in input order and of the input's
        type (see :func:`~e3relax_fast.io.from_arrays_like`), positions not wrapped.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    items = [structures] if structure_kind(structures) is not None else list(structures)
    device = check_device(device)
    if model is None or isinstance(model, (str, Path)):
        model = load_pretrained("default" if model is None else model, map_location=device)
    model = _prepare_model(model, device, dtype)
    if precision != "default" and next(model.parameters(), torch.empty(0)).dtype != torch.float32:
        raise ValueError(f"precision={precision!r} needs a float32 model (pass dtype=torch.float32)")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision='tf32' needs a CUDA device, got device={str(device)!r}")
    canonical, keep_symmetry = _frame_modes(model, frame, symmetry)

    errors: dict[int, str] = {}

    def fail(index: int, reason: str) -> None:
        if on_error == "raise":
            raise InvalidStructureError(index, reason)
        errors[index] = reason

    arrays, close = _valid_arrays(items, getattr(model, "num_elements", None), fail)
    _warn_close_atoms(close)
    fixed = _constraints(items, arrays, fail)
    paper_compat = getattr(model, "paper_compat", False)
    # The original's checkpoints see every structure as given and periodic in 3D, as the original did.
    views = _model_views(items, arrays, canonical, not paper_compat, symprec, radius, fail, frame_workers)
    # ... and the original's graph: its 49-slot rule (spec §3.2), which only pymatgen can tell.
    reserved = ({i: original_reserved_slots(v.numbers, v.positions, v.cell, radius) for i, v in views.items()}
                if paper_compat else None)
    if max_atoms is None and batch_size is None:
        max_atoms = _atom_budget(model, device, max_neighbors)
    valid = list(views)
    groups = [[valid[k] for k in group]
              for group in plan_batches([len(views[i].numbers) for i in valid], batch_size, max_atoms)]
    results: list = [None] * len(items)
    predicted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    canonical_predictions: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def predict(indices: list[int]):
        batch = _model_batch([views[i] for i in indices], device, radius, max_neighbors, graph_backend,
                             None if reserved is None else [reserved[i] for i in indices])
        return list(predict_batches(model, [batch], device, precision, graph_backend, radius, max_neighbors))[0]

    for indices, prediction in _predict_splitting(groups, predict, views, device, fail):
        for index, (pos, cell), ok in zip(indices, prediction.per_structure(), prediction.finite(), strict=True):
            if not ok:
                fail(index, "the model's prediction contains NaN or inf")
                continue
            view = views[index]
            if isinstance(view, CanonicalFrame):
                canonical_predictions[index] = (pos, cell)
            pos, cell = view.map_back(pos, cell, keep_symmetry or fixed[index].symmetry)
            pos = _honour_constraints(fixed[index], arrays[index], pos, cell)
            results[index] = from_arrays_like(items[index], pos, cell)
            predicted[index] = (pos, cell)
    if refine is not None and refine_steps > 0 and predicted:
        _refine(items, arrays, predicted, results, refine, refine_steps, refine_fmax)

    uncertainty = None
    if return_uncertainty:
        uncertainty = [None] * len(items)
        done = [i for i in canonical_predictions if i in predicted]
        spread = frame_spread(model, [views[i] for i in done], device,
                              predictions=[canonical_predictions[i] for i in done], symmetrize=keep_symmetry,
                              precision=precision, graph_backend=graph_backend, radius=radius,
                              max_neighbors=max_neighbors)
        for i, value in zip(done, spread, strict=True):
            uncertainty[i] = float(value)

    errors = dict(sorted(errors.items()))
    for index in errors:
        results[index] = items[index] if on_error == "return_input" else None
    _warn_failures(errors, len(items), on_error)
    return RelaxResult(results, errors, uncertainty)


FRAMES = ("auto", "canonical", "input")
SYMMETRIES = ("auto", "keep", "free")


def _frame_modes(model: nn.Module, frame: str, symmetry: str) -> tuple[bool, bool]:
    """``(canonical frame, keep symmetry)`` for the options of :func:`relax_batch`."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
    if symmetry not in SYMMETRIES:
        raise ValueError(f"symmetry must be one of {SYMMETRIES}, got {symmetry!r}")
    # The original's raw behaviour for its checkpoints: no frame, no projection.
    canonical = frame == "canonical" or (frame == "auto" and not getattr(model, "paper_compat", False))
    if symmetry == "keep" and not canonical:
        raise ValueError("symmetry='keep' needs frame='canonical' (the projection works in the canonical cell)")
    return canonical, canonical and symmetry != "free"


@dataclass
class _AsGiven:
    """The model's view of a structure taken as given (``frame="input"``, and every structure of a
    ``paper_compat`` model): no frame, no projection, no translation gauge."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray

    def map_back(self, positions, cell, symmetrize: bool):
        return positions, cell


def _model_views(items, arrays: dict, canonical: bool, respect_pbc: bool, symprec: float, radius: float,
                 fail, frame_workers: int | str = "auto") -> dict:
    """What the model sees of each valid input and how its prediction goes back: a
    :class:`~e3relax_fast.frame.CanonicalFrame` (crystals, canonical frame), a
    :class:`~e3relax_fast.frame.SlabFrame` (two periodic axes) or the input as given;
    ``fail(index, reason)`` for the others (molecules and wires, frames that cannot be built)."""
    periodic = {index: periodicity(items[index]) if respect_pbc else np.ones(3, dtype=bool) for index in arrays}
    crystals = [index for index, pbc in periodic.items() if pbc.all()] if canonical else []
    # All crystals' frames in one call (shared with worker processes where cores are idle); failures
    # are reported below in input order, as building them one by one would.
    frames = dict(zip(crystals, canonical_frames([arrays[i] for i in crystals], symprec, frame_workers),
                      strict=True))
    views = {}
    for index, (z, positions, cell) in arrays.items():
        pbc = periodic[index]
        try:
            if pbc.sum() < 2:
                raise FrameError(f"a molecule or a wire (pbc={pbc.tolist()}): the model is for periodic crystals "
                                 "and slabs (at least two periodic axes)")
            if pbc.sum() == 2:
                views[index] = slab_frame(z, positions, cell, pbc, radius)
            elif canonical:
                if isinstance(frames[index], FrameError):
                    raise frames[index]
                views[index] = frames[index]
            else:
                views[index] = _AsGiven(z, positions, cell)
        except FrameError as err:
            fail(index, str(err))
    return views


def _model_batch(views: list, device: torch.device, radius: float, max_neighbors: int, backend: str,
                 reserved: list[np.ndarray] | None = None) -> Batch:
    """The model's batch of ``views``; when it holds slabs, with the graph built here and their edges
    through the vacuum removed; with ``reserved`` (per view, the original's lost slots), with the
    original's graph built here (else :func:`predict_batches` builds the graph)."""
    batch = Batch.from_arrays([(v.numbers, v.positions, v.cell) for v in views], dtype=torch.float64)
    if reserved is not None:
        batch = batch.to(device)
        g = build_graph(batch.positions, batch.cells, batch.ptr, radius, max_neighbors, backend=backend,
                        reserved=torch.from_numpy(np.concatenate(reserved)).to(device))
        return replace(batch, edge_index=g.edge_index, cell_offsets=g.cell_offsets, rowptr=g.rowptr)
    slabs = [isinstance(v, SlabFrame) for v in views]
    if not any(slabs):
        return batch
    periodic = torch.tensor([[True, True, not slab] for slab in slabs])  # a slab's normal is its last axis
    return drop_images(batch.to(device).with_graph(radius, max_neighbors, backend=backend), periodic)


def _reference_message_ops(model: nn.Module) -> bool:
    """The model's atom–atom message op runs on the pure-PyTorch reference at inference on CPU."""
    try:
        return ops.resolve(ops.MESSAGE_PASSING, getattr(model, "backend", "auto"), "cpu")[0] == "reference"
    except ops.BackendUnavailableError:  # a backend named that cannot run here: the model fails anyway
        return False


def _atom_budget(model: nn.Module, device: torch.device, max_neighbors: int) -> int:
    """Atoms per batch when the caller gives no bound: :data:`DEFAULT_MAX_ATOMS` on CPU
    (:data:`DEFAULT_MAX_ATOMS_REFERENCE_OPS` when the message ops are the reference's); on CUDA the
    atoms whose activations fit in :data:`MEMORY_FRACTION` of the free memory (an edge budget: every
    atom counted at its largest in-degree, ``max_neighbors`` + 6 edges), at most
    :data:`DEFAULT_MAX_ATOMS_ACCELERATOR`."""
    if device.type != "cuda":
        if device.type == "cpu" and _reference_message_ops(model):
            return DEFAULT_MAX_ATOMS_REFERENCE_OPS
        return DEFAULT_MAX_ATOMS.get(device.type, DEFAULT_MAX_ATOMS_ACCELERATOR)
    param = next(model.parameters(), None)
    itemsize = param.element_size() if param is not None else 4
    # Unknown modules (wrappers, baselines) are costed as the paper-size model.
    hidden, rbf = getattr(model, "hidden_channels", 512), getattr(model, "num_rbf", 128)
    # Inference keeps about a dozen (E, H)-sized message tensors and the (E, R) basis alive at once
    # in the reference ops (the fused kernels need less), and a few dozen (N, H) atom features.
    per_edge = itemsize * (12 * hidden + 2 * rbf)
    # The bond strains' (E, W) bond features and (E, 3, 3) tensors, each.
    per_edge += itemsize * (6 * BOND_WIDTH + 9) * (getattr(model, "use_cell_virial", False)
                                                  + getattr(model, "use_bond_radii", False))
    per_atom = (max_neighbors + 6) * per_edge + itemsize * 32 * hidden
    if getattr(model, "use_bond_radii", False):  # on an accelerator, every atom's 342 own images alike
        per_atom += itemsize * OWN_IMAGES * (NUM_RELATIVE_BASIS + 2 * BOND_WIDTH + 9)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(DEFAULT_MAX_ATOMS_ACCELERATOR, int(MEMORY_FRACTION * free) // per_atom))


def _is_out_of_memory(err: BaseException) -> bool:
    """The device (or the host, for CPU runs) ran out of memory: torch's OutOfMemoryError, Python's
    MemoryError (the compiled graph builder's), or a RuntimeError with an allocator's message."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _predict_splitting(groups: list[list[int]], predict, views: dict, device: torch.device, fail):
    """``(indices, predict(indices))`` for each group, in order. A group that runs out of memory is
    split in halves, each retried (recursively, so nothing is dropped or run twice); a structure that
    runs out of memory alone is ``fail``ed with that reason."""
    pending = list(reversed(groups))  # a stack: the next group to run is last
    while pending:
        indices = pending.pop()
        reason = None
        try:
            prediction = predict(indices)
        except Exception as err:
            if not _is_out_of_memory(err):
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        # Outside the except block: the traceback (and the batch's tensors it holds) is gone.
        if reason is None:
            yield indices, prediction
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if len(indices) == 1:
            atoms = len(views[indices[0]].numbers)
            fail(indices[0], f"out of memory on {device} even alone ({atoms} atoms in the model's cell): {reason}")
        else:
            half = len(indices) // 2
            pending += [indices[half:], indices[:half]]


def _constraints(items, arrays: dict, fail) -> dict[int, Constraints]:
    """The constraints of each valid input; ``fail(index, reason)`` (and removal from ``arrays``) for
    those that cannot be honoured."""
    out = {}
    for index in list(arrays):
        try:
            out[index] = constraints(items[index], index)
        except InvalidStructureError as err:
            fail(index, err.reason)
            del arrays[index]
    return out


def _honour_constraints(fixed: Constraints, given: tuple, positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """``positions`` with the fixed components back at their input values: Cartesian ones (ASE) as
    given, fractional ones (selective_dynamics) as given in the predicted cell."""
    if not (fixed.cartesian.any() or fixed.fractional.any()):
        return positions
    _, input_positions, input_cell = given
    if fixed.fractional.any():
        frac = positions @ np.linalg.inv(cell)
        frac = np.where(fixed.fractional, input_positions @ np.linalg.inv(input_cell), frac)
        positions = frac @ cell
    # Last, so that fixed Cartesian components are the input's bit for bit.
    return np.where(fixed.cartesian, input_positions, positions)


def _valid_arrays(items: list, num_elements: int | None, fail) -> tuple[dict, dict]:
    """``({input index: (z, positions, cell)}, {input index: (i, j, distance)})``: the inputs that are
    valid model inputs, and those of them with implausibly close atoms (:func:`~e3relax_fast.io.close_atoms`);
    ``fail(index, reason)`` is called for each of the others."""
    arrays, close = {}, {}
    for index, structure in enumerate(items):
        try:
            z, positions, cell = to_arrays(structure, index=index)
            pair = validate(z, positions, cell, index=index)
        except InvalidStructureError as err:
            fail(index, err.reason)
            continue
        if num_elements is not None and z.max() >= num_elements:
            fail(index, f"element Z={int(z.max())} is outside the model's table (num_elements={num_elements})")
            continue
        arrays[index] = (z, positions, cell)
        if pair is not None:
            close[index] = pair
    return arrays, close


def _warn_close_atoms(pairs: dict[int, tuple[int, int, float]]) -> None:
    """One :class:`CloseAtomsWarning` naming every structure with atoms closer than 0.5 Å (``pairs``:
    input index -> its closest pair)."""
    close = {index: f"atoms {i} and {j} are {dist:.3g} Å apart" for index, (i, j, dist) in pairs.items()}
    if close:
        listing = "; ".join(f"[{index}] {what}" for index, what in close.items())
        warnings.warn(CloseAtomsWarning(f"relax_batch: implausibly close atoms (< 0.5 Å) in {len(close)} "
                                        f"structure(s), relaxed anyway: {listing}", close), stacklevel=3)


def _warn_failures(errors: dict[int, str], total: int, on_error: str) -> None:
    """One :class:`RelaxWarning` listing every structure that was not relaxed."""
    if not errors:
        return
    outcome = "returned unchanged" if on_error == "return_input" else "skipped (None in the result)"
    listing = "; ".join(f"[{index}] {reason}" for index, reason in errors.items())
    warnings.warn(f"relax_batch: {len(errors)} of {total} structure(s) could not be relaxed and were {outcome}: "
                  f"{listing}", RelaxWarning, stacklevel=3)


def _refine(items, arrays, predicted, results, calculator, steps: int, fmax: float) -> None:
    """Continue each prediction with a few batched FIRE steps (in place in ``results``)."""
    from .datagen import BatchedFIRE

    indices = list(predicted)
    start = [to_atoms(arrays[i][0], *predicted[i]) for i in indices]
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
