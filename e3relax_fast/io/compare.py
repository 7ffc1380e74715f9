"""Comparing structures with pymatgen's StructureMatcher."""

from __future__ import annotations

import warnings

from .structures import to_pymatgen


def structures_match(first, second, **matcher_options) -> list[bool] | None:
    """Whether each structure of ``first`` matches the same-index one of ``second`` under pymatgen's
    ``StructureMatcher(**matcher_options)`` (its defaults when none are given); ``None`` when pymatgen
    is not installed.

    Args:
        first, second: equally long sequences of ``(atomic_numbers (n,), positions (n, 3) Å,
            cell (3, 3) Å)`` triples.
    """
    try:
        from pymatgen.analysis.structure_matcher import StructureMatcher
    except ImportError:
        return None
    matcher = StructureMatcher(**matcher_options)
    matches = []
    for a, b in zip(first, second, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns about e.g. missing oxidation states
            matches.append(bool(matcher.fit(to_pymatgen(*a), to_pymatgen(*b))))
    return matches
