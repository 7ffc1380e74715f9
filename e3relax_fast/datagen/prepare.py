"""Seed crystals made here: AFLOW prototypes decorated with charge-balanced compositions, and random
symmetric crystals (pyxtal), each relaxed once with the potential (space group kept) to become a
seed of ``e3relax-fast datagen`` (families ``aflow`` and ``pyxtal``; a file whose name starts with
``aflow`` belongs to the ``aflow`` family).

- ``aflow``: the 288 prototypes that ship with pymatgen (``analysis/prototypes/aflow_prototypes.json.gz``),
  those of at most ``max_atoms`` atoms. Each element of a prototype is replaced by a new one,
  ``draws`` times per prototype: where pymatgen's oxidation-state guess for the prototype's own
  composition finds anions, anion sites get elements with a negative common oxidation state and
  the others cations, such that common oxidation states balance the charge and every cation is
  less electronegative than every anion; prototypes with no guess (intermetallics) get metals, and
  elemental ones any element. The volume is pymatgen's DLS guess (covalent-radius³ scaling where
  it fails).
- ``simple``: as ``aflow`` for the 24 simple structure types of :data:`SIMPLE_LABELS` alone (fcc, bcc,
  rock salt, fluorite, perovskite, ...), from RNG streams of their own, with many draws each: these
  teach each element's size in the structures most screening starts from.
- ``pyxtal``: random crystals of a space group drawn uniformly from 2–230 with a charge-balanced
  composition of 1–3 elements (one anion for 2–3), at most ``max_atoms`` atoms in the
  conventional cell, stored as the primitive cell.

Elements are those :func:`~e3relax_fast.datagen.protocols.similar_elements` may use (Z ≤ 83, no
H, noble gases, Tc or Pm). Everything is drawn from per-item RNG streams of ``seed``, so a file is
a pure function of (kind, n, seed, settings). Structures are relaxed with the batched FIRE
(``fmax``, ``max_steps``), the space group kept at ``symprec``; unconverged or failed relaxations,
volume changes beyond 3×, invalid structures and implausible minima (:func:`implausible`: a
collapsed cell or a positive energy) are dropped. Output: an extxyz file, ``info``:
``material_id`` (the seed id's tail), ``formula``, ``prototype`` (AFLOW label, or
``pyxtal-<space group>``), ``spacegroup`` (of the relaxed crystal, spglib at ``symprec``),
``energy_per_atom`` (eV, the potential's), ``provenance``.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np

from .protocols import SYMPREC, _allowed, _radius_cubed_sum, dls_volume, keep_symmetry, seeded_rng

KINDS = ("aflow", "pyxtal", "simple")

#: The simple structure types of the AFLOW prototypes (``simple`` seeds): the elemental A1 (fcc), A2
#: (bcc), A3 (hcp), A4 (diamond), A_h (simple cubic); the binary B1 (rock salt), B2 (CsCl), B3
#: (zincblende), B4 (wurtzite), B_h (WC), B_k (BN), B8_1 (NiAs), L1_0, L1_2, A15, C1 (fluorite), C3
#: (cuprite), C4 (rutile), C6, C15 (Laves), D0_3; the ternary E2_1 (cubic perovskite), C1_b
#: (half-Heusler), L2_1 (Heusler). Most screening starts from one of these, and a one-shot model has to
#: know how big each element is in them (a crystal written in another's cell: Ge in Si's, KCl in NaCl's).
SIMPLE_LABELS = ("A_cF4_225_a", "A_cI2_229_a", "A_hP2_194_c", "A_cF8_227_a", "A_cP1_221_a", "AB_cF8_225_a_b",
                 "AB_cP2_221_b_a", "AB_cF8_216_c_a", "AB_hP4_186_b_b", "AB_hP2_187_d_a", "AB_hP4_194_c_d",
                 "AB_hP4_194_c_a", "AB_tP2_123_a_d", "AB3_cP4_221_a_c", "A3B_cP8_223_c_a", "AB2_cF12_225_a_c",
                 "A2B_cP6_224_b_a", "A2B_tP6_136_f_a", "AB2_hP3_164_a_d", "A2B_cF24_227_d_a", "AB3_cF16_225_a_bc",
                 "AB3C_cP5_221_a_c_b", "ABC_cF12_216_b_c_a", "AB2C_cF16_225_a_c_b")


def _oxidation_states() -> dict[int, tuple[int, ...]]:
    from pymatgen.core import Element

    return {z: tuple(int(q) for q in Element.from_Z(z).common_oxidation_states) for z in range(2, 84) if _allowed(z)}


def _electronegativity(z: int) -> float:
    from pymatgen.core import Element

    with warnings.catch_warnings():  # pymatgen warns for elements without a value (none here is used)
        warnings.simplefilter("ignore")
        x = Element.from_Z(z).X
    return float(x) if np.isfinite(x) else 0.0


class _Chemistry:
    """Element pools and the charge-balance test."""

    def __init__(self) -> None:
        self.states = _oxidation_states()
        self.x = {z: _electronegativity(z) for z in self.states}
        self.anions = sorted(z for z, s in self.states.items() if any(q < 0 for q in s))
        self.cations = sorted(z for z, s in self.states.items() if any(q > 0 for q in s))
        self.metals = sorted(z for z in self.cations if z not in self.anions and self.x[z] < 2.2)
        self.elements = sorted(self.states)

    def balanced(self, elements, counts, anion) -> bool:
        """Common oxidation states (negative on ``anion`` species, positive on the others) sum to
        zero over ``counts``, and every cation is less electronegative than every anion."""
        x_cations = [self.x[z] for z, a in zip(elements, anion, strict=True) if not a]
        x_anions = [self.x[z] for z, a in zip(elements, anion, strict=True) if a]
        if not x_cations or not x_anions or max(x_cations) >= min(x_anions):
            return False
        options = [[q for q in self.states[z] if (q < 0) == a and q != 0] for z, a in zip(elements, anion, strict=True)]
        return any(sum(c * q for c, q in zip(counts, qs, strict=True)) == 0 for qs in itertools.product(*options))

    def draw_ionic(self, counts, anion, rng, tries: int = 200) -> list[int] | None:
        """Distinct elements for species with these counts and anion roles, charge balanced."""
        for _ in range(tries):
            picks = [int(rng.choice(self.anions if a else self.cations)) for a in anion]
            if len(set(picks)) == len(picks) and self.balanced(picks, counts, anion):
                return picks
        return None


# --- AFLOW prototypes ----------------------------------------------------------------------------


def aflow_candidates(n_per_prototype: int = 2, seed: int = 0, max_atoms: int = 40, labels=None,
                     stream: str = "aflow", distinct: bool = False) -> list:
    """Unrelaxed decorated prototypes (``ase.Atoms`` with ``info``), ``n_per_prototype`` draws each
    (of the prototypes with AFLOW labels in ``labels`` only, when given), drawn from the RNG streams
    named ``stream``; with ``distinct``, a decoration drawn twice for one prototype is kept once
    (off for the ``aflow`` kind, whose committed seed file was made with its one repeat)."""
    import gzip
    import json
    from importlib.resources import files

    from ase import Atoms
    from pymatgen.core import Structure

    chem = _Chemistry()
    # The file itself, as plain JSON: importing pymatgen.analysis.prototypes builds StructureNL
    # objects of all of it with monty (10 s), Structure.from_dict takes 0.1 s.
    with gzip.open(files("pymatgen") / "analysis" / "prototypes" / "aflow_prototypes.json.gz") as fh:
        entries = json.load(fh)
    out, seen = [], set()
    for entry in entries:
        structure, label = Structure.from_dict(entry["snl"]), entry["tags"]["aflow"]
        formula = structure.composition.reduced_formula  # labels repeat (FeS2 and CaCl2 share one)
        if len(structure) > max_atoms or (labels is not None and label not in labels):
            continue
        species = sorted({site.specie.Z for site in structure})
        counts = [sum(site.specie.Z == z for site in structure) for z in species]
        guesses = structure.composition.oxi_state_guesses() if len(species) > 1 else ()
        anion = [guesses[0][el.symbol] < 0 for el in map(_element, species)] if guesses else None
        numbers = np.array([site.specie.Z for site in structure])
        for draw in range(n_per_prototype):
            rng = seeded_rng(seed, stream, label, formula, draw)
            if len(species) == 1:
                picks = [int(rng.choice(chem.elements))]
            elif anion is None:  # an intermetallic prototype: metals, no charge balance
                picks = [int(z) for z in rng.choice(chem.metals, size=len(species), replace=False)]
            else:
                picks = chem.draw_ionic(counts, anion, rng)
                if picks is None:
                    continue
            if distinct and (label, formula, tuple(picks)) in seen:
                continue
            seen.add((label, formula, tuple(picks)))
            mapping = dict(zip(species, picks, strict=True))
            atoms = Atoms(numbers=[mapping[int(z)] for z in numbers], positions=structure.cart_coords,
                          cell=structure.lattice.matrix, pbc=True)
            atoms = _guess_volume(atoms, numbers)
            atoms.info.update({"material_id": f"{label}-{formula}-{draw}", "prototype": label,
                               "mineral": entry["tags"].get("mineral") or "",
                               "provenance": f"pymatgen AFLOW prototype {label} ({formula}) decorated "
                                             f"(draw {draw}, seed {seed}{'' if stream == 'aflow' else ', ' + stream})"})
            out.append(atoms)
    return out


def _element(z: int):
    from pymatgen.core import Element

    return Element.from_Z(z)


def _guess_volume(atoms, old_numbers):
    """DLS volume guess, covalent-radius³ scaling from the prototype's volume where DLS fails."""
    try:
        volume = dls_volume(atoms)
    except ValueError:
        volume = atoms.get_volume() * _radius_cubed_sum(atoms.numbers) / _radius_cubed_sum(old_numbers)
    atoms.set_cell(atoms.cell.array * (volume / atoms.get_volume()) ** (1.0 / 3.0), scale_atoms=True)
    return atoms


# --- random symmetric crystals ---------------------------------------------------------------------


def pyxtal_candidates(n: int, seed: int = 0, max_atoms: int = 40, max_tries: int | None = None) -> list:
    """``n`` random symmetric crystals (``ase.Atoms`` with ``info``; fewer if ``max_tries`` runs out)."""
    import pyxtal as pyxtal_package
    import spglib
    from ase import Atoms
    from pyxtal import pyxtal

    chem = _Chemistry()
    out = []
    for attempt in range(max_tries or 50 * n):
        if len(out) >= n:
            break
        rng = seeded_rng(seed, "pyxtal", attempt)
        group = int(rng.integers(2, 231))
        n_species = int(rng.choice([1, 2, 3], p=[0.1, 0.5, 0.4]))
        anion = [False] * (n_species - 1) + [n_species > 1]
        counts = [int(c) for c in rng.integers(1, 5, size=n_species)]
        picks = chem.draw_ionic(counts, anion, rng, tries=50) if n_species > 1 else [int(rng.choice(chem.elements))]
        if picks is None:
            continue
        sizes = [u for u in range(1, 9) if u * sum(counts) <= max_atoms]
        for units in sizes:  # formula units: the fewest the group's Wyckoff sites take
            crystal = pyxtal()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    crystal.from_random(3, group, [_element(z).symbol for z in picks],
                                        [int(c * units) for c in counts], random_state=int(rng.integers(2**31)))
            except Exception:  # pyxtal raises many kinds for a composition the group cannot take
                continue
            if crystal.valid:
                break
        else:
            continue
        conventional = crystal.to_ase()
        cell = spglib.standardize_cell((conventional.cell.array, conventional.get_scaled_positions(),
                                        conventional.numbers), to_primitive=True, symprec=SYMPREC)
        if cell is None:
            continue
        atoms = Atoms(numbers=cell[2], scaled_positions=cell[1], cell=cell[0], pbc=True)
        atoms.info.update({"material_id": str(attempt), "prototype": f"pyxtal-{group}",
                           "provenance": f"pyxtal {pyxtal_package.__version__} from_random(group {group}), "
                                         f"attempt {attempt}, seed {seed}"})
        out.append(atoms)
    return out


# --- relax and write -------------------------------------------------------------------------------

#: Closest approach allowed in a seed, as a fraction of the two atoms' summed covalent radii.
MIN_BOND_FRACTION = 0.6


def implausible(atoms, energy_per_atom: float) -> str | None:
    """Why a relaxed seed is no plausible crystal, else ``None``: two atoms (periodic images
    included) closer than :data:`MIN_BOND_FRACTION` of their summed covalent radii — a minimum
    the symmetry constraint let collapse (seen: Tl₁₂As₄ at 1.05 Å) — or a positive energy per
    atom (the potential's; every element's own crystal is below zero)."""
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    if energy_per_atom > 0:
        return "positive energy"
    radii = covalent_radii[atoms.numbers]
    i, j, d = neighbor_list("ijd", atoms, 2 * MIN_BOND_FRACTION * radii.max())
    if np.any(d < MIN_BOND_FRACTION * (radii[i] + radii[j])):
        return "atoms too close"
    return None


def make_seeds(kind: str, out: str | Path, n: int, seed: int = 0, calculator: str = "chgnet",
               max_atoms: int = 40, fmax: float = 0.05, max_steps: int = 500, symprec: float = SYMPREC,
               batch_size: int = 64, progress: bool = True) -> dict:
    """Make, relax (space group kept) and write seeds of ``kind`` (``aflow``: ``n`` decorations per
    prototype; ``pyxtal``: ``n`` crystals attempted) to the extxyz file ``out``; see the module
    docstring. Returns ``{"candidates", "written", "dropped": {reason: count}}``."""
    import spglib
    from ase.io import write

    from ..io import InvalidStructureError, validate
    from .calculators import make_calculator
    from .fire import BatchedFIRE

    if kind == "aflow":
        candidates = aflow_candidates(n, seed, max_atoms)
    elif kind == "simple":
        candidates = aflow_candidates(n, seed, max_atoms, labels=SIMPLE_LABELS, stream="simple", distinct=True)
    elif kind == "pyxtal":
        candidates = pyxtal_candidates(n, seed, max_atoms)
    else:
        raise ValueError(f"unknown seed kind {kind!r}; choose from {', '.join(KINDS)}")
    constrained = [keep_symmetry(a, symprec)[0] for a in candidates]
    fire = BatchedFIRE(make_calculator(calculator, True, batch_size), fmax=fmax, max_steps=max_steps,
                       max_batch=batch_size)
    kept, dropped = {}, {}
    for k, outcome in fire.irelax(constrained):
        reason = None
        ratio = outcome.atoms.get_volume() / candidates[k].get_volume() if not outcome.error else np.nan
        if outcome.error:
            reason = "failed"
        elif not outcome.converged:
            reason = "not converged"
        elif not 1 / 3 <= ratio <= 3:
            reason = "volume changed beyond 3x"
        else:
            try:
                validate(outcome.atoms.numbers, outcome.atoms.positions, outcome.atoms.cell.array)
                reason = implausible(outcome.atoms, outcome.energy / len(outcome.atoms))
            except InvalidStructureError:
                reason = "invalid"
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        atoms = outcome.atoms
        atoms.info = dict(candidates[k].info)
        dataset = spglib.get_symmetry_dataset((atoms.cell.array, atoms.get_scaled_positions(), atoms.numbers),
                                              symprec=symprec)
        atoms.info.update({"formula": atoms.get_chemical_formula(mode="hill"),
                           "spacegroup": int(dataset.number) if dataset is not None else 0,
                           "energy_per_atom": round(outcome.energy / len(atoms), 6)})
        atoms.info["provenance"] += (f"; relaxed with {calculator} (FixSymmetry at {symprec} A, FIRE + unit-cell "
                                     f"filter, fmax {fmax}, {outcome.steps} steps)")
        kept[k] = atoms
        if progress:
            print(f"make-seeds {kind}: {len(kept)} kept, {sum(dropped.values())} dropped of {len(candidates)}",
                  flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write(out, [kept[k] for k in sorted(kept)], format="extxyz")
    return {"candidates": len(candidates), "written": len(kept), "dropped": dropped}
