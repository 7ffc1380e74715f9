"""bench.textbook_substitutions: each case is its host crystal with the named elements replaced."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ase")

from bench.textbook_substitutions import CASES, seen_in, substituted  # noqa: E402


def test_each_case_is_its_host_with_the_elements_replaced():
    from ase.build import bulk

    for name, (host, mapping) in CASES.items():
        atoms, original = substituted(host, mapping), bulk(host[0], host[1], a=host[2])
        np.testing.assert_array_equal(atoms.positions, original.positions, err_msg=name)
        np.testing.assert_array_equal(np.array(atoms.cell), np.array(original.cell), err_msg=name)
        expected = [mapping.get(s, s) for s in original.get_chemical_symbols()]
        assert atoms.get_chemical_symbols() == expected and expected != original.get_chemical_symbols(), name


def test_a_substitution_of_an_element_the_host_lacks_is_refused():
    with pytest.raises(ValueError, match=r"NaCl has no \['K'\]"):
        substituted(("NaCl", "rocksalt", 5.64), {"K": "Rb"})


def test_seen_in_counts_the_compound_in_the_hosts_space_group_only():
    pytest.importorskip("spglib")
    from ase.build import bulk

    from e3relax_fast.io import Pair
    from e3relax_fast.io.structures import to_arrays

    def pair(atoms):
        numbers, positions, cell = to_arrays(atoms)
        return Pair("p", numbers, positions, cell, positions, cell)

    inputs = {name: substituted(*CASES[name]) for name in ("KCl in NaCl's cell", "Ge in Si's cell")}
    pairs = [pair(bulk("KCl", "rocksalt", a=6.3)), pair(bulk("KCl", "rocksalt", a=6.3).repeat((2, 1, 1))),
             pair(bulk("KCl", "cesiumchloride", a=3.8)),  # the compound in another structure type
             pair(bulk("Ge", "diamond", a=5.7)), pair(bulk("Si", "diamond", a=5.4))]
    assert seen_in(pairs, inputs) == {"KCl in NaCl's cell": 2, "Ge in Si's cell": 1}
