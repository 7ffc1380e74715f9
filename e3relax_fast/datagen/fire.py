"""Batched FIRE relaxation with a unit-cell filter: many crystals, one potential call per step.

:class:`BatchedFIRE` reproduces ASE's ``FIRE(UnitCellFilter(atoms))`` for every structure of a
batch (same degrees of freedom, same FIRE parameters and update rule, same convergence test), but
evaluates all active structures with one call of a *batched calculator*. Structures that converge
or run out of steps leave the active set and, when more are queued, new ones take their place, so
the batch stays full.

Units (ASE's): positions and cells in Å (lattice vectors as rows), energies in eV per structure
(not per atom), forces in eV/Å, stress in eV/Å³ with ASE's sign convention (the derivative of the
energy with respect to strain divided by the volume: positive when the cell wants to shrink),
``fmax`` in eV/Å. The cell degrees of freedom are ASE's ``UnitCellFilter`` ones: the deformation
gradient ``F`` (cell = orig_cell @ F.T) scaled by ``cell_factor`` = number of atoms; their
"forces" are the virial ``-volume * stress`` (eV) mapped through ``F`` and divided by
``cell_factor``. A structure has converged when every atom's force and every row of that
cell force is below ``fmax`` (strictly), as in ASE.

Symmetry: a structure that carries ASE's ``FixSymmetry`` constraint (``atoms.set_constraint(
FixSymmetry(atoms, symprec))``, which also refines the structure to that symmetry) is relaxed with its
space group kept, as ASE's ``FIRE(UnitCellFilter(atoms))`` does with the constraint: forces and stress
are symmetrised after every evaluation and each step's cell and position updates are projected onto
the group (the constraint's own ``adjust_*`` methods, called in ASE's order). Structures without it
relax freely; other constraints are not supported (reported as an error).

A batched calculator is any callable ``calc(list_of_atoms) -> (energies (B,), forces, stresses)``
with ``forces`` a list of ``(n_b, 3)`` arrays (or one ``(sum n_b, 3)`` array) and ``stresses``
``(B, 3, 3)`` or Voigt ``(B, 6)``; a structure that cannot be evaluated gets a non-finite energy
and is reported as an error. Adapters: :class:`ASEBatchCalculator` (any ASE calculator, one
structure after another) and :class:`CHGNetBatchCalculator` (CHGNet's batched prediction).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..io.structures import to_atoms
from .calculators import as_batch_calculator


@dataclass(frozen=True)
class FireParams:
    """FIRE parameters; the defaults are ASE's (``ase.optimize.FIRE``). ``maxstep`` (Å) bounds the
    norm of one structure's whole step (all atoms and cell rows together), as in ASE."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    Nmin: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


@dataclass
class RelaxOutcome:
    """Result of relaxing one structure.

    Attributes:
        atoms: the final structure (an ``ase.Atoms`` copy of the input with new positions and cell,
            no calculator, no constraints); the last structure evaluated.
        converged: the convergence test passed within ``max_steps``.
        steps: FIRE steps taken (ASE's ``nsteps``).
        energy_initial, energy: potential energy (eV) of the input and of ``atoms``.
        fmax: the largest force/cell-force row norm (eV/Å) of ``atoms``.
        error: why the structure could not be evaluated, else ``None``.
    """

    atoms: object
    converged: bool
    steps: int
    energy_initial: float
    energy: float
    fmax: float
    error: str | None = None


def _as_full_stress(stresses) -> np.ndarray:
    s = np.asarray(stresses, dtype=np.float64)
    if s.ndim == 2 and s.shape[1] == 6:  # Voigt xx yy zz yz xz xy
        xx, yy, zz, yz, xz, xy = s.T
        s = np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], 1)
    if s.ndim != 3 or s.shape[1:] != (3, 3):
        raise ValueError(f"stresses must be (B, 3, 3) or (B, 6), got {s.shape}")
    return s


@dataclass
class _Active:
    """State of the active structures: per-atom rows concatenated, per-structure arrays (B, ...)."""

    slots: list = field(default_factory=list)  # index of each active structure in the input
    atoms: list = field(default_factory=list)  # ase.Atoms handed to the calculator
    natoms: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pos: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (N, 3) Å
    cell: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 3)))  # (B, 3, 3) Å
    orig_cell: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 3)))
    vel: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (N, 3) atom velocities
    vel_cell: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 3)))
    dt: np.ndarray = field(default_factory=lambda: np.zeros(0))
    a: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_positive: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # ASE's Nsteps
    started: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # ASE's vel is not None
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    energy0: np.ndarray = field(default_factory=lambda: np.zeros(0))
    symmetry: list = field(default_factory=list)  # ASE FixSymmetry of each structure, or None (free)

    ATOM_FIELDS = ("pos", "vel")
    GRAPH_FIELDS = ("natoms", "cell", "orig_cell", "vel_cell", "dt", "a", "n_positive", "started", "steps",
                    "energy0")

    def __len__(self) -> int:
        return len(self.slots)

    def segment(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.slots)), self.natoms)

    def keep(self, mask: np.ndarray) -> None:
        atom_mask = np.repeat(mask, self.natoms)
        for name in self.ATOM_FIELDS:
            setattr(self, name, getattr(self, name)[atom_mask])
        for name in self.GRAPH_FIELDS:
            setattr(self, name, getattr(self, name)[mask])
        self.slots = [s for s, m in zip(self.slots, mask, strict=True) if m]
        self.atoms = [a for a, m in zip(self.atoms, mask, strict=True) if m]
        self.symmetry = [c for c, m in zip(self.symmetry, mask, strict=True) if m]

    def add(self, new: list[tuple[int, object, object]], params: FireParams) -> None:
        if not new:
            return
        cells = np.stack([np.asarray(a.cell.array, dtype=np.float64) for _, a, _ in new])
        n = np.array([len(a) for _, a, _ in new], dtype=np.int64)
        b = len(new)
        pos = np.concatenate([np.asarray(a.positions, dtype=np.float64) for _, a, _ in new])
        parts = {
            "pos": pos, "vel": np.zeros_like(pos), "natoms": n, "cell": cells, "orig_cell": cells.copy(),
            "vel_cell": np.zeros((b, 3, 3)), "dt": np.full(b, params.dt), "a": np.full(b, params.astart),
            "n_positive": np.zeros(b, dtype=np.int64), "started": np.zeros(b, dtype=bool),
            "steps": np.zeros(b, dtype=np.int64), "energy0": np.full(b, np.nan),
        }
        for name, value in parts.items():
            setattr(self, name, np.concatenate([getattr(self, name), value]))
        self.slots += [i for i, _, _ in new]
        self.atoms += [a for _, a, _ in new]
        self.symmetry += [c for _, _, c in new]


def _split_constraints(atoms) -> tuple[object, str | None]:
    """Take the constraints off ``atoms`` (the calculator sees none): its ``FixSymmetry`` (or
    ``None``) and an error message for constraints :class:`BatchedFIRE` does not support."""
    from ase.constraints import FixSymmetry

    constraints = atoms.constraints
    atoms.set_constraint()
    others = sorted({type(c).__name__ for c in constraints if not isinstance(c, FixSymmetry)})
    if others:
        return None, f"constraints other than FixSymmetry are not supported: {', '.join(others)}"
    return next((c for c in constraints if isinstance(c, FixSymmetry)), None), None


def _symmetric_update(constraint, atoms, cell: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASE's ``UnitCellFilter.set_positions`` under ``FixSymmetry``: ``atoms`` holds the current
    cell and positions; the new cell's deformation step is symmetrised (``adjust_cell``), the atoms
    are scaled with it, then their step to ``positions`` is symmetrised (``adjust_positions``)."""
    cell = cell.copy()
    constraint.adjust_cell(atoms, cell)
    scaled = atoms.positions @ np.linalg.solve(atoms.cell.complete(), cell)
    atoms.set_cell(cell, scale_atoms=False)
    atoms.positions = scaled
    positions = positions.copy()
    constraint.adjust_positions(atoms, positions)
    return cell, positions


def _segment_sum(values: np.ndarray, seg: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(seg, weights=values, minlength=size)


class BatchedFIRE:
    """FIRE + unit-cell filter (ASE ``UnitCellFilter`` degrees of freedom) over many structures.

    Args:
        calculator: a batched calculator (see the module docstring) or an ASE calculator.
        fmax: convergence threshold in eV/Å on atom forces and cell-force rows.
        max_steps: FIRE steps at most per structure (ASE's ``steps``).
        max_batch: structures evaluated together at most (``None``: all).
        relax_cell: ``False`` keeps every cell fixed (positions-only FIRE).
        params: :class:`FireParams` (ASE's defaults).
    """

    def __init__(self, calculator, fmax: float = 0.05, max_steps: int = 300, max_batch: int | None = None,
                 relax_cell: bool = True, params: FireParams | None = None) -> None:
        self.calculator = as_batch_calculator(calculator)
        self.fmax = fmax
        self.max_steps = max_steps
        self.max_batch = max_batch
        self.relax_cell = relax_cell
        self.params = params or FireParams()
        #: calculator calls and structure evaluations of the last run (for profiling).
        self.calls = 0
        self.evaluations = 0

    def relax(self, structures: Iterable) -> list[RelaxOutcome]:
        """Relax every structure (``ase.Atoms``; inputs are not modified); outcomes in input order."""
        outcomes: dict[int, RelaxOutcome] = dict(self.irelax(structures))
        return [outcomes[i] for i in range(len(outcomes))]

    def irelax(self, structures: Iterable) -> Iterator[tuple[int, RelaxOutcome]]:
        """Yield ``(input index, outcome)`` as structures finish (not in input order)."""
        queue = enumerate(structures)
        exhausted = False
        state = _Active()
        self.calls = self.evaluations = 0
        while True:
            room = (self.max_batch or np.iinfo(np.int64).max) - len(state)
            new = []
            while not exhausted and room > 0:
                try:
                    index, atoms = next(queue)
                except StopIteration:
                    exhausted = True
                    break
                atoms = atoms.copy()
                atoms.calc = None
                atoms.pbc = True
                symmetry, error = _split_constraints(atoms)
                if len(atoms) == 0 or not abs(np.linalg.det(atoms.cell.array)) > 1e-6:
                    error = "no atoms or a degenerate cell"
                if error:
                    yield index, RelaxOutcome(atoms, False, 0, float("nan"), float("nan"), float("nan"), error)
                    continue
                new.append((index, atoms, symmetry))
                room -= 1
            state.add(new, self.params)
            if not len(state):
                return
            yield from self._iterate(state)

    def _evaluate(self, state: _Active):
        from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

        offsets = np.concatenate([[0], np.cumsum(state.natoms)])
        for b, atoms in enumerate(state.atoms):
            atoms.set_cell(state.cell[b], scale_atoms=False)
            atoms.positions = state.pos[offsets[b]:offsets[b + 1]]
        energies, forces, stresses = self.calculator(state.atoms)
        self.calls += 1
        self.evaluations += len(state)
        energies = np.asarray(energies, dtype=np.float64).reshape(-1)
        if not isinstance(forces, np.ndarray) or forces.ndim != 2:
            forces = np.concatenate([np.asarray(f, dtype=np.float64).reshape(-1, 3) for f in forces])
        else:
            forces = np.array(forces, dtype=np.float64)  # a copy: symmetrised in place below
        stresses = _as_full_stress(stresses)
        for b, constraint in enumerate(state.symmetry):
            if constraint is not None:  # as ase.Atoms.get_forces/get_stress apply FixSymmetry
                constraint.adjust_forces(state.atoms[b], forces[offsets[b]:offsets[b + 1]])
                voigt = full_3x3_to_voigt_6_stress(stresses[b])
                constraint.adjust_stress(state.atoms[b], voigt)
                stresses[b] = voigt_6_to_full_3x3_stress(voigt)
        return energies, forces, stresses

    def _fire_step(self, state: _Active, g_atoms: np.ndarray, g_cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FIRE's update (``ase.optimize.FIRE.step``) of each structure's velocities, time step and
        mixing, from its gradients; returns the displacements ``(dr (N, 3), dr_cell (B, 3, 3))``. The
        degrees of freedom are the atoms plus the cell rows."""
        p = self.params
        seg = state.segment()
        b = len(state)
        vf = _segment_sum((g_atoms * state.vel).sum(1), seg, b) + (g_cell * state.vel_cell).sum((1, 2))
        g2 = _segment_sum((g_atoms * g_atoms).sum(1), seg, b) + (g_cell * g_cell).sum((1, 2))
        v2 = _segment_sum((state.vel * state.vel).sum(1), seg, b) + (state.vel_cell * state.vel_cell).sum((1, 2))
        started = state.started
        mix = started & (vf > 0.0)
        reset = started & ~(vf > 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(mix, state.a * np.sqrt(v2) / np.sqrt(g2), 0.0)
        keep_v = np.where(mix, 1.0 - state.a, np.where(reset, 0.0, 1.0))
        state.vel = keep_v[seg, None] * state.vel + scale[seg, None] * g_atoms
        state.vel_cell = keep_v[:, None, None] * state.vel_cell + scale[:, None, None] * g_cell
        grow = mix & (state.n_positive > p.Nmin)
        state.dt = np.where(grow, np.minimum(state.dt * p.finc, p.dtmax), state.dt)
        state.a = np.where(grow, state.a * p.fa, state.a)
        state.n_positive = np.where(mix, state.n_positive + 1, state.n_positive)
        state.a = np.where(reset, p.astart, state.a)
        state.dt = np.where(reset, state.dt * p.fdec, state.dt)
        state.n_positive = np.where(reset, 0, state.n_positive)
        state.started = np.ones(b, dtype=bool)

        state.vel = state.vel + state.dt[seg, None] * g_atoms
        state.vel_cell = state.vel_cell + state.dt[:, None, None] * g_cell
        dr = state.dt[seg, None] * state.vel
        dr_cell = state.dt[:, None, None] * state.vel_cell
        norm = np.sqrt(_segment_sum((dr * dr).sum(1), seg, b) + (dr_cell * dr_cell).sum((1, 2)))
        shrink = np.where(norm > p.maxstep, p.maxstep / np.where(norm > 0, norm, 1.0), 1.0)
        dr = dr * shrink[seg, None]
        dr_cell = dr_cell * shrink[:, None, None]

        return dr, dr_cell

    def _move(self, state: _Active, deform, cell_factor, dr, dr_cell, energies,
              fmax) -> Iterator[tuple[int, RelaxOutcome]]:
        """Apply the displacements through the unit-cell filter (and each structure's symmetry);
        yields the structures whose symmetrised step failed."""
        seg = state.segment()
        b = len(state)
        # x = (F^-1 positions, cell_factor F); x += dr; then cell = orig_cell F'^T, positions = F' r.
        r = np.einsum("nij,nj->ni", np.linalg.inv(deform)[seg], state.pos) + dr
        new_deform = (cell_factor[:, None, None] * deform + dr_cell) / cell_factor[:, None, None]
        if not self.relax_cell:
            new_deform = deform
        cell = state.orig_cell @ np.swapaxes(new_deform, 1, 2)
        pos = np.einsum("nij,nj->ni", new_deform[seg], r)
        offsets = np.concatenate([[0], np.cumsum(state.natoms)])
        failed = np.zeros(b, dtype=bool)
        for k, constraint in enumerate(state.symmetry):
            if constraint is not None:
                part = slice(offsets[k], offsets[k + 1])
                try:
                    cell[k], pos[part] = _symmetric_update(constraint, state.atoms[k], cell[k], pos[part])
                except RuntimeError as err:  # FixSymmetry refuses a cell step beyond 0.25 strain
                    failed[k] = True
                    yield state.slots[k], RelaxOutcome(state.atoms[k].copy(), False, int(state.steps[k]),
                                                       float(state.energy0[k]), float(energies[k]), float(fmax[k]),
                                                       f"symmetrised step failed: {err}")
        state.cell, state.pos = cell, pos
        state.steps = state.steps + 1
        if failed.any():
            state.keep(~failed)

    def _iterate(self, state: _Active) -> Iterator[tuple[int, RelaxOutcome]]:
        """One evaluation of the active set, then the FIRE step of the unconverged ones."""
        energies, forces, stresses = self._evaluate(state)
        b = len(state)
        seg = state.segment()
        fresh = np.isnan(state.energy0)
        state.energy0[fresh] = energies[fresh]

        # UnitCellFilter forces: atom forces mapped by F, virial mapped by F^-T, divided by n.
        volume = np.abs(np.linalg.det(state.cell))
        collapsed = ~(volume > 1e-6)  # also NaN; such structures fail below
        state.cell[collapsed] = state.orig_cell[collapsed]
        energies = np.where(collapsed, np.nan, energies)
        deform = np.swapaxes(np.linalg.solve(state.orig_cell, state.cell), 1, 2)  # F, (B, 3, 3)
        virial = -volume[:, None, None] * stresses
        virial = np.swapaxes(np.linalg.solve(deform, np.swapaxes(virial, 1, 2)), 1, 2)
        cell_factor = state.natoms.astype(np.float64)
        g_atoms = np.einsum("ni,nij->nj", forces, deform[seg])
        g_cell = virial / cell_factor[:, None, None]
        if not self.relax_cell:
            g_cell = np.zeros_like(g_cell)

        finite = np.isfinite(energies) & np.isfinite(g_cell).all(axis=(1, 2))
        finite &= _segment_sum(np.isfinite(g_atoms).all(axis=1).astype(np.float64), seg, b) == state.natoms
        atom_norm = np.linalg.norm(np.where(np.isfinite(g_atoms), g_atoms, np.inf), axis=1)
        fmax_atoms = np.full(b, -np.inf)
        np.maximum.at(fmax_atoms, seg, atom_norm)
        fmax = np.maximum(fmax_atoms, np.linalg.norm(g_cell, axis=2).max(axis=1))
        converged = finite & (fmax < self.fmax)
        done = converged | ~finite | (state.steps >= self.max_steps)

        for k in np.flatnonzero(done):
            atoms = state.atoms[k].copy()
            error = None if finite[k] else "the potential returned NaN/inf or failed on this structure"
            yield state.slots[k], RelaxOutcome(atoms, bool(converged[k]), int(state.steps[k]),
                                               float(state.energy0[k]), float(energies[k]), float(fmax[k]), error)
        go = ~done
        if not go.any():
            state.keep(go)
            return
        g_atoms, g_cell = g_atoms[np.repeat(go, state.natoms)], g_cell[go]
        deform, cell_factor = deform[go], cell_factor[go]
        energies, fmax = energies[go], fmax[go]
        state.keep(go)
        dr, dr_cell = self._fire_step(state, g_atoms, g_cell)
        yield from self._move(state, deform, cell_factor, dr, dr_cell, energies, fmax)


def relax_one_ase(atoms, calculator, fmax: float = 0.05, max_steps: int = 300) -> RelaxOutcome:
    """The reference path: ASE's own ``FIRE(UnitCellFilter(atoms))`` on one structure (with the
    structure's constraints, e.g. ``FixSymmetry``; the outcome's atoms carry none)."""
    from ase.filters import UnitCellFilter
    from ase.optimize import FIRE

    atoms = atoms.copy()
    atoms.pbc = True
    atoms.calc = calculator
    try:
        energy0 = atoms.get_potential_energy()
        ucf = UnitCellFilter(atoms)
        opt = FIRE(ucf, logfile=None)
        converged = bool(opt.run(fmax=fmax, steps=max_steps))
        energy = atoms.get_potential_energy()
        fmax_final = float(np.linalg.norm(ucf.get_forces(), axis=1).max())
        error = None if np.isfinite(energy) else "non-finite energy"
        steps = opt.nsteps
    except Exception as err:  # a third-party calculator failing on this structure
        energy0 = energy = fmax_final = float("nan")
        converged, steps, error = False, 0, f"{type(err).__name__}: {err}"
    atoms.calc = None
    atoms.set_constraint()
    return RelaxOutcome(atoms, converged and error is None, steps, float(energy0), float(energy), fmax_final, error)


def _to_atoms(structure, reference=None):
    """``ase.Atoms`` from Atoms, a :class:`~e3relax_fast.io.Pair`-like ``(positions, cell)`` pair
    with ``reference``'s species, or an ``(atomic_numbers, positions, cell)`` triple."""
    from ase import Atoms

    if isinstance(structure, Atoms):
        return structure
    if len(structure) == 2 and reference is not None:
        return to_atoms(reference, *structure)
    return to_atoms(*structure)


def steps_saved(pairs: Sequence, predictions: Sequence, calculator, fmax: float = 0.05, max_steps: int = 300,
                max_batch: int | None = 64) -> dict:
    """Potential steps to converge from each unrelaxed structure vs from the model's prediction.

    Args:
        pairs: :class:`~e3relax_fast.data.Pair` records (their unrelaxed structures are relaxed).
        predictions: one per pair: ``ase.Atoms``, ``(positions (n, 3), cell (3, 3))`` or an
            ``(atomic_numbers, positions, cell)`` triple, atoms in the pair's order.
        calculator: batched or ASE calculator; fmax (eV/Å), max_steps, max_batch: as
            :class:`BatchedFIRE`.

    Returns:
        A dict of per-pair lists ``ids``, ``steps_unrelaxed``, ``steps_prediction``,
        ``converged_unrelaxed``, ``converged_prediction``, ``energy_unrelaxed`` and
        ``energy_prediction`` (eV/atom at the end of each relaxation) and summaries over the pairs
        where both converged: ``n_both_converged``, ``mean_steps_unrelaxed``,
        ``mean_steps_prediction``, ``mean_steps_saved``, ``median_steps_saved``,
        ``fraction_steps_saved`` (1 - sum prediction / sum unrelaxed) and
        ``mean_energy_difference`` (prediction-start minimum minus unrelaxed-start minimum, eV/atom;
        negative: the prediction led to a lower minimum).
    """
    if len(pairs) != len(predictions):
        raise ValueError(f"{len(pairs)} pairs but {len(predictions)} predictions")
    start = [_to_atoms((p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed)) for p in pairs]
    pred = [_to_atoms(s, p.atomic_numbers) for s, p in zip(predictions, pairs, strict=True)]
    for p, a in zip(pairs, pred, strict=True):
        if list(a.numbers) != list(p.atomic_numbers):
            raise ValueError(f"pair {p.id}: the prediction has other species or atom order")
    fire = BatchedFIRE(calculator, fmax=fmax, max_steps=max_steps, max_batch=max_batch)
    outcomes = fire.relax(start + pred)
    from_u, from_p = outcomes[:len(pairs)], outcomes[len(pairs):]
    n = np.array([len(p.atomic_numbers) for p in pairs], dtype=np.float64)
    result = {
        "ids": [p.id for p in pairs],
        "steps_unrelaxed": [o.steps for o in from_u],
        "steps_prediction": [o.steps for o in from_p],
        "converged_unrelaxed": [o.converged for o in from_u],
        "converged_prediction": [o.converged for o in from_p],
        "energy_unrelaxed": [o.energy / k for o, k in zip(from_u, n, strict=True)],
        "energy_prediction": [o.energy / k for o, k in zip(from_p, n, strict=True)],
    }
    both = np.array(result["converged_unrelaxed"]) & np.array(result["converged_prediction"])
    su = np.array(result["steps_unrelaxed"], dtype=np.float64)[both]
    sp = np.array(result["steps_prediction"], dtype=np.float64)[both]
    de = (np.array(result["energy_prediction"]) - np.array(result["energy_unrelaxed"]))[both]
    nan = float("nan")
    result.update({
        "n_both_converged": int(both.sum()),
        "mean_steps_unrelaxed": float(su.mean()) if both.any() else nan,
        "mean_steps_prediction": float(sp.mean()) if both.any() else nan,
        "mean_steps_saved": float((su - sp).mean()) if both.any() else nan,
        "median_steps_saved": float(np.median(su - sp)) if both.any() else nan,
        "fraction_steps_saved": float(1.0 - sp.sum() / su.sum()) if both.any() and su.sum() > 0 else nan,
        "mean_energy_difference": float(de.mean()) if both.any() else nan,
    })
    return result


def energies_above_minimum(pairs: Sequence, predictions: Sequence, calculator) -> dict:
    """Single-point energies (no relaxation) of each pair's unrelaxed input and of the model's
    prediction, above the pair's relaxed structure's energy (the potential's minimum), eV/atom.

    Args:
        pairs: :class:`~e3relax_fast.io.Pair` records; predictions: one per pair, as for
            :func:`steps_saved`; calculator: batched (it batches the forward passes itself) or ASE
            calculator.

    Returns:
        ``ids``, ``input_above`` and ``prediction_above`` (per-pair lists, eV/atom; NaN where the
        potential failed) and over the pairs with all three energies: ``n``, ``fraction_closer`` (the
        prediction's energy is below the input's), ``median_input_above`` and
        ``median_prediction_above``.
    """
    if len(pairs) != len(predictions):
        raise ValueError(f"{len(pairs)} pairs but {len(predictions)} predictions")
    calc = as_batch_calculator(calculator)
    inputs = [_to_atoms((p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed)) for p in pairs]
    relaxed = [_to_atoms((p.atomic_numbers, p.pos_relaxed, p.cell_relaxed)) for p in pairs]
    pred = [_to_atoms(s, p.atomic_numbers) for s, p in zip(predictions, pairs, strict=True)]
    energies = calc(inputs + relaxed + pred)[0]
    n = np.array([len(p.atomic_numbers) for p in pairs], dtype=np.float64)
    e_input, e_min, e_pred = (energies[k * len(pairs):(k + 1) * len(pairs)] / n for k in range(3))
    above_input, above_pred = e_input - e_min, e_pred - e_min
    ok = np.isfinite(above_input) & np.isfinite(above_pred)
    nan = float("nan")
    return {
        "ids": [p.id for p in pairs], "input_above": above_input.tolist(), "prediction_above": above_pred.tolist(),
        "n": int(ok.sum()),
        "fraction_closer": float((above_pred[ok] < above_input[ok]).mean()) if ok.any() else nan,
        "median_input_above": float(np.median(above_input[ok])) if ok.any() else nan,
        "median_prediction_above": float(np.median(above_pred[ok])) if ok.any() else nan,
    }
