"""How an unrelaxed structure is made from a seed crystal: similar-element substitution with a
volume guess, and strain + rattle (see :mod:`e3relax_fast.datagen.generate` for the pipeline)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

PROTOCOLS = ("subst", "rattle")
STRAIN = 0.05  # strain entries uniform in [-STRAIN, STRAIN]
RATTLE_SIGMA = 0.08  # Å

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


def apply_substitution(atoms, mapping: dict[int, int]):
    """A copy of ``atoms`` with elements replaced and the volume scaled by Σ r_new³ / Σ r_old³."""
    from ase.data import chemical_symbols

    out = atoms.copy()
    old = out.numbers.copy()
    out.numbers = np.array([mapping.get(int(z), int(z)) for z in old])
    scale = (_radius_cubed_sum(out.numbers) / _radius_cubed_sum(old)) ** (1.0 / 3.0)
    out.set_cell(out.cell.array * scale, scale_atoms=True)
    note = ";".join(f"{chemical_symbols[a]}>{chemical_symbols[b]}" for a, b in sorted(mapping.items()))
    return out, note


def apply_rattle(atoms, rng: np.random.Generator):
    """A copy of ``atoms`` strained (symmetric ε, entries in [−0.05, 0.05]) and rattled (σ = 0.08 Å)."""
    out = atoms.copy()
    upper = rng.uniform(-STRAIN, STRAIN, size=6)
    eps = np.zeros((3, 3))
    eps[np.triu_indices(3)] = upper
    eps = eps + np.triu(eps, 1).T
    out.set_cell(out.cell.array @ (np.eye(3) + eps), scale_atoms=True)
    out.positions = out.positions + rng.normal(0.0, RATTLE_SIGMA, size=out.positions.shape)
    return out


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


