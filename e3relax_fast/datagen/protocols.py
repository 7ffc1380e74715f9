"""How an unrelaxed structure is made from a seed crystal: similar-element substitution with a
volume guess, strain + rattle, small perturbations and the seed itself (see
:mod:`e3relax_fast.datagen.generate` for the pipeline and what each protocol is for)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from ..io.structures import to_pymatgen

PROTOCOLS = ("subst", "subst_sym", "rattle", "jiggle", "seed", "minimum")
#: Protocols relaxed with the input's space group kept (ASE's FixSymmetry): their inputs are
#: symmetric, and a free relaxation would let float noise break the symmetry into a target no
#: one-shot model can predict (e.g. octahedral tilts of substituted cubic perovskites).
SYMMETRIC = frozenset({"subst_sym", "seed", "minimum"})
#: Protocols whose input is (the potential's minimum near) the seed itself: at most one per seed.
ONCE_PER_SEED = frozenset({"seed", "minimum"})
#: Default mix (see data/README.md for why).
DEFAULT_PROTOCOLS = "subst_sym:5,rattle:2,jiggle:1,seed:1,minimum:1"
#: Volume guesses of ``subst_sym``, one drawn per job.
VOLUME_GUESSES = ("radius3", "dls", "none")
STRAIN = 0.05  # rattle: strain entries uniform in [-STRAIN, STRAIN]
RATTLE_SIGMA = 0.08  # Å
JIGGLE_STRAIN = 0.01  # jiggle: a near-minimum input
JIGGLE_SIGMA = 0.02  # Å
#: spglib tolerance (Å) for the space group a symmetric relaxation keeps.
SYMPREC = 1e-3

# --- chemistry ----------------------------------------------------------------------------------

NOBLE_GASES = frozenset({2, 10, 18, 36, 54, 86})
RADIOACTIVE = frozenset({43, 61})  # Tc, Pm; and everything above Bi (Z > 83)
MAX_SUBST_Z = 83
LANTHANIDES = range(58, 72)  # Ce..Lu; La sits in group 3
_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)


def period_group(z: int) -> tuple[int, int | None]:
    """(row, IUPAC group) of element ``z``; group ``None`` for Ce–Lu and Th–Lr."""
    start = 0
    for row, end in enumerate(_PERIOD_ENDS, start=1):
        if z <= end:
            pos = z - start - 1
            length = end - start
            if length == 2:
                return row, (1 if pos == 0 else 18)
            if length == 8:
                return row, (pos + 1 if pos < 2 else pos + 11)
            if length == 18:
                return row, pos + 1
            if pos <= 2:  # alkali, alkaline earth, La/Ac
                return row, pos + 1
            if pos <= 16:
                return row, None
            return row, pos - 13
        start = end
    raise ValueError(f"no element Z={z}")


def _allowed(z: int) -> bool:
    return 1 < z <= MAX_SUBST_Z and z not in NOBLE_GASES and z not in RADIOACTIVE


def similar_elements(z: int) -> list[int]:
    """Elements that may replace ``z`` in ``subst`` (ascending Z; empty if ``z`` itself is excluded)."""
    if not _allowed(z):
        return []
    row, group = period_group(z)
    out = set()
    if group is not None:
        for other in range(1, MAX_SUBST_Z + 1):
            r, g = period_group(other)
            if g == group and abs(r - row) == 1:
                out.add(other)
    if z in LANTHANIDES or z == 57:
        out.update(o for o in (z - 1, z + 1) if 57 <= o <= 71)
    return sorted(o for o in out if _allowed(o))


def _radius_cubed_sum(numbers: Sequence[int]) -> float:
    from ase.data import covalent_radii

    return float(np.sum(covalent_radii[np.asarray(numbers)] ** 3))


# --- protocols ----------------------------------------------------------------------------------


def seeded_rng(*words) -> np.random.Generator:
    """A NumPy generator seeded by a hash of ``words``: each (seed, job, purpose) has its own stream."""
    digest = hashlib.sha256("|".join(map(str, words)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _draw_substitution(numbers: np.ndarray, rng: np.random.Generator) -> dict[int, int] | None:
    species = sorted(set(int(z) for z in numbers))
    options = {z: similar_elements(z) for z in species}
    movable = [z for z in species if options[z]]
    if not movable:
        return None
    count = int(rng.integers(1, len(movable) + 1))
    chosen = [movable[i] for i in rng.permutation(len(movable))[:count]]
    present = set(species)
    mapping = {}
    for z in chosen:
        free = [o for o in options[z] if o not in present]
        if not free:
            continue
        new = int(free[rng.integers(len(free))])
        mapping[z] = new
        present.discard(z)
        present.add(new)
    return mapping or None


def substitutions(seed_id: str, numbers: np.ndarray, count: int, seed: int, tries: int = 50) -> list[dict]:
    """The first ``count`` distinct substitutions of a seed (fewer if it has no more); element
    maps ``{old Z: new Z}``, drawn from the seed's own RNG stream."""
    rng = seeded_rng(seed, seed_id, "subst")
    found: list[dict] = []
    seen = set()
    for _ in range(tries * count):
        if len(found) >= count:
            break
        mapping = _draw_substitution(numbers, rng)
        if mapping is None:
            break
        key = tuple(sorted(mapping.items()))
        if key not in seen:
            seen.add(key)
            found.append(mapping)
    return found


def dls_volume(atoms) -> float:
    """Volume (Å³) pymatgen's data-mined bond-length scheme (``DLSVolumePredictor``, scaling
    clipped to [0.5, 1.5]) predicts for ``atoms``; raises ``ValueError`` when it finds no bond."""
    import warnings

    from pymatgen.analysis.structure_prediction.volume_predictor import DLSVolumePredictor

    structure = to_pymatgen(atoms.numbers, atoms.positions, atoms.cell.array)
    with warnings.catch_warnings():  # it warns for every element without bond parameters
        warnings.simplefilter("ignore")
        return float(DLSVolumePredictor().predict(structure))


def apply_substitution(atoms, mapping: dict[int, int], volume: str = "radius3"):
    """A copy of ``atoms`` with elements replaced and a volume guess: ``radius3`` scales by
    Σ r_new³ / Σ r_old³ (covalent radii), ``dls`` takes :func:`dls_volume` (``radius3`` where that
    fails), ``none`` keeps the seed's cell. Returns ``(atoms, note)``; the note lists the
    replacements and, for guesses other than ``radius3``, ``vol=<guess used>``."""
    from ase.data import chemical_symbols

    if volume not in VOLUME_GUESSES:
        raise ValueError(f"unknown volume guess {volume!r}; choose from {', '.join(VOLUME_GUESSES)}")
    out = atoms.copy()
    old = out.numbers.copy()
    out.numbers = np.array([mapping.get(int(z), int(z)) for z in old])
    note = ";".join(f"{chemical_symbols[a]}>{chemical_symbols[b]}" for a, b in sorted(mapping.items()))
    if volume == "dls":
        try:
            out.set_cell(out.cell.array * (dls_volume(out) / out.get_volume()) ** (1.0 / 3.0), scale_atoms=True)
            return out, note + ";vol=dls"
        except ValueError:
            volume = "radius3"
            note += ";vol=radius3(dls failed)"
    elif volume == "none":
        return out, note + ";vol=none"
    scale = (_radius_cubed_sum(out.numbers) / _radius_cubed_sum(old)) ** (1.0 / 3.0)
    out.set_cell(out.cell.array * scale, scale_atoms=True)
    return out, note


def apply_rattle(atoms, rng: np.random.Generator, strain: float = STRAIN, sigma: float = RATTLE_SIGMA):
    """A copy of ``atoms`` strained (symmetric ε, entries uniform in [−strain, strain]) and rattled
    (Gaussian displacements, σ = ``sigma`` Å); defaults: ``rattle``'s 0.05 and 0.08 Å."""
    out = atoms.copy()
    out.set_cell(out.cell.array @ random_stretch(rng, strain), scale_atoms=True)
    out.positions = out.positions + rng.normal(0.0, sigma, size=out.positions.shape)
    return out


def random_stretch(rng: np.random.Generator, strain: float = STRAIN) -> np.ndarray:
    """``(3, 3)`` ``I + ε``: ε symmetric, its six entries uniform in [−strain, strain] (a cell's rows
    times it: a pure stretch, no rotation)."""
    eps = np.zeros((3, 3))
    eps[np.triu_indices(3)] = rng.uniform(-strain, strain, size=6)
    return np.eye(3) + eps + np.triu(eps, 1).T


def keep_symmetry(atoms, symprec: float = SYMPREC):
    """``atoms`` refined to its space group at ``symprec`` (Å) with ASE's ``FixSymmetry`` attached,
    so relaxations keep the group, and its space-group number (``None``, and no constraint, where
    spglib finds no group: such a structure relaxes freely)."""
    import spglib
    from ase.constraints import FixSymmetry

    out = atoms.copy()
    try:
        out.set_constraint(FixSymmetry(out, symprec=symprec))  # also refines ``out``
    except (spglib.error.SpglibError, AttributeError):  # no dataset (e.g. atoms too close)
        return atoms.copy(), None
    dataset = spglib.get_symmetry_dataset((out.cell.array, out.get_scaled_positions(), out.numbers),
                                          symprec=symprec)
    return out, (int(dataset.number) if dataset is not None else None)


def parse_protocols(text: str) -> dict[str, float]:
    """``"subst,rattle"`` or with weights ``"subst:4,rattle:1"`` → normalised weights."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
        weights[name] = float(weight) if weight else 1.0
        if weights[name] <= 0:
            raise ValueError(f"protocol weight must be positive: {part!r}")
    if not weights:
        raise ValueError("no protocol given")
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}


