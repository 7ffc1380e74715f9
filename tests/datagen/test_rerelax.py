"""Re-relaxing committed pairs with the input's symmetry kept (datagen/rerelax.py)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ase")
spglib = pytest.importorskip("spglib")
from ase.build import bulk  # noqa: E402

from e3relax_fast.datagen.rerelax import keeps_symmetry, rerelax  # noqa: E402
from e3relax_fast.io import Pair, read_pairs, write_extxyz_pairs  # noqa: E402


def pair(pair_id: str, atoms, relaxed_positions, relaxed_cell, protocol: str) -> Pair:
    return Pair(pair_id, atoms.numbers.astype(np.int64), atoms.positions.copy(), atoms.cell.array.copy(),
                np.asarray(relaxed_positions, dtype=np.float64), np.asarray(relaxed_cell, dtype=np.float64),
                protocol=protocol)


def test_only_symmetry_broken_substitutions_are_relaxed_again(tmp_path):
    cu = bulk("Cu", "fcc", a=3.7, cubic=True)  # EMT's minimum is near 3.59: the cell shrinks
    tilted = cu.positions + np.random.default_rng(0).normal(0, 0.05, cu.positions.shape)  # a broken target
    pairs = [
        pair("broken", cu, tilted, cu.cell.array * 0.97, "subst"),
        pair("kept", cu, cu.positions * 0.97, cu.cell.array * 0.97, "subst"),
        pair("rattled", cu, tilted, cu.cell.array, "rattle"),  # relaxed freely on purpose: never touched
    ]
    assert [keeps_symmetry(p) for p in pairs] == [False, True, False]
    write_extxyz_pairs(pairs, tmp_path / "in", "train")
    with (tmp_path / "in" / "index.csv").open("w") as fh:
        fh.write("atoms_id,protocol,seed_id\nbroken,subst,perov-1\nkept,subst,perov-2\nrattled,rattle,oqmd-3\n")
    summary = rerelax([tmp_path / "in"], tmp_path / "out", calculator="emt")
    assert summary["symmetry_broken"] == 1 and summary["rerelaxed"] == 1 and summary["failed"] == 0
    out = {p.id: p for p in read_pairs(tmp_path / "out", "train")}
    assert keeps_symmetry(out["broken"]) and out["broken"].family == "perov"
    assert spglib.get_symmetry_dataset((out["broken"].cell_relaxed, out["broken"].pos_relaxed
                                        @ np.linalg.inv(out["broken"].cell_relaxed), out["broken"].atomic_numbers),
                                       symprec=1e-3).number == 225
    for name in ("kept", "rattled"):
        np.testing.assert_allclose(out[name].pos_relaxed, {p.id: p for p in pairs}[name].pos_relaxed, atol=1e-7)
    assert (tmp_path / "out" / "provenance.json").exists()


def test_a_rerun_resumes_from_the_journal(tmp_path):
    """Finished chunks are journalled: a re-run relaxes nothing again (no calculator is even made, so
    an unknown one passes) and writes the same targets; a line cut by a kill is dropped and redone."""
    cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    tilted = cu.positions + np.random.default_rng(1).normal(0, 0.05, cu.positions.shape)
    write_extxyz_pairs([pair("broken", cu, tilted, cu.cell.array * 0.97, "subst")], tmp_path / "in", "train")
    (tmp_path / "in" / "index.csv").write_text("atoms_id,protocol,seed_id\nbroken,subst,perov-1\n")
    first = rerelax([tmp_path / "in"], tmp_path / "out", calculator="emt")
    journal = (tmp_path / "out" / "rerelaxed.jsonl").read_text()
    again = rerelax([tmp_path / "in"], tmp_path / "out", calculator="no-such-calculator")
    assert (first["rerelaxed"], again["rerelaxed"]) == (1, 1)
    assert (tmp_path / "out" / "rerelaxed.jsonl").read_text() == journal
    (tmp_path / "out" / "rerelaxed.jsonl").write_text(journal[: len(journal) // 2])  # killed mid-write
    assert rerelax([tmp_path / "in"], tmp_path / "out", calculator="emt")["rerelaxed"] == 1
    assert keeps_symmetry(read_pairs(tmp_path / "out", "train")[0])
