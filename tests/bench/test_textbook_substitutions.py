"""bench.textbook_substitutions: each case is its host crystal with the named elements replaced."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ase")

from bench.textbook_substitutions import CASES, substituted  # noqa: E402


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
