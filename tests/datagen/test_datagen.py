"""Pair generation with ASE's EMT: protocols, symmetry, families, determinism, the CIF-folder output,
snapshots, resume, CLI."""

from __future__ import annotations

import csv
import importlib
import os
from pathlib import Path

import numpy as np
import pytest

ase = pytest.importorskip("ase")
from ase.build import bulk  # noqa: E402
from ase.io import write  # noqa: E402

from e3relax_fast.datagen import (  # noqa: E402
    JobPlan,
    apply_rattle,
    apply_substitution,
    dls_volume,
    family_of,
    generate,
    keep_symmetry,
    load_seed_source,
    parse_protocols,
    restore_run,
    similar_elements,
    split_of,
    substitutions,
    write_snapshot,
)
from e3relax_fast.io import SPLITS, read_pairs  # noqa: E402

Z = ase.data.atomic_numbers


def emt_seeds(path: Path) -> Path:
    """Six fcc binary seeds whose substitutions (Cu/Ag/Au, Ni/Pd/Pt) EMT can all evaluate."""
    frames = []
    for k, (a, b, lattice) in enumerate([("Cu", "Au", 3.85), ("Ni", "Pt", 3.7), ("Ag", "Pd", 4.0),
                                         ("Cu", "Ni", 3.55), ("Au", "Pt", 3.95), ("Pd", "Cu", 3.75)]):
        atoms = bulk(a, "fcc", a=lattice, cubic=True)
        atoms.numbers[[1, 2]] = Z[b]
        atoms.info["material_id"] = f"m{k}"
        frames.append(atoms)
    write(path, frames, format="extxyz")
    return path


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_similar_elements():
    assert similar_elements(Z["O"]) == [Z["S"]]
    assert similar_elements(Z["Ag"]) == [Z["Cu"], Z["Au"]]
    assert similar_elements(Z["Bi"]) == [Z["Sb"]]  # Mc (row 7) is out: Z > 83
    assert similar_elements(Z["La"]) == [Z["Y"], Z["Ce"]]
    assert similar_elements(Z["Nd"]) == [Z["Ce"] + 1]  # Pr; Pm is radioactive
    assert similar_elements(Z["Mo"]) == [Z["Cr"], Z["W"]]
    for excluded in ("H", "He", "Ar", "Tc", "Po", "U"):
        assert similar_elements(Z[excluded]) == []
    assert Z["Tc"] not in similar_elements(Z["Mn"]) and Z["Kr"] not in similar_elements(Z["Ar"])


def test_substitution_scales_volume_and_never_repeats():
    seed = bulk("Cu", "fcc", a=3.6, cubic=True)
    seed.numbers[[1, 2]] = Z["Ni"]
    found = substitutions("s", seed.numbers, 10, seed=0)
    keys = [tuple(sorted(m.items())) for m in found]
    assert len(set(keys)) == len(keys) and 1 <= len(found) <= 3  # Cu->Ag, Ni->Pd, both
    out, note = apply_substitution(seed, {Z["Cu"]: Z["Ag"]})
    r = ase.data.covalent_radii
    expected = (2 * r[Z["Ag"]] ** 3 + 2 * r[Z["Ni"]] ** 3) / (2 * r[Z["Cu"]] ** 3 + 2 * r[Z["Ni"]] ** 3)
    assert note == "Cu>Ag" and np.isclose(out.get_volume() / seed.get_volume(), expected)
    assert np.allclose(out.get_scaled_positions(), seed.get_scaled_positions())


def test_volume_guesses():
    pytest.importorskip("pymatgen.core")
    seed = bulk("Cu", "fcc", a=3.6, cubic=True)
    seed.numbers[[1, 2]] = Z["Ni"]
    unscaled, note = apply_substitution(seed, {Z["Cu"]: Z["Ag"]}, "none")
    assert note == "Cu>Ag;vol=none" and np.allclose(unscaled.cell.array, seed.cell.array)
    dls, note = apply_substitution(seed, {Z["Cu"]: Z["Ag"]}, "dls")
    assert note == "Cu>Ag;vol=dls" and np.isclose(dls.get_volume(), dls_volume(unscaled))
    assert np.allclose(dls.get_scaled_positions(), seed.get_scaled_positions())
    with pytest.raises(ValueError, match="volume guess"):
        apply_substitution(seed, {Z["Cu"]: Z["Ag"]}, "vegard")


def test_keep_symmetry_refines_and_constrains():
    from ase.constraints import FixSymmetry

    seed = bulk("Cu", "fcc", a=3.6, cubic=True)
    seed.positions[0] += 2e-4  # below symprec: refined away
    out, number = keep_symmetry(seed)
    assert number == 225 and isinstance(out.constraints[0], FixSymmetry) and not seed.constraints
    offsets = out.get_scaled_positions() - out.get_scaled_positions()[0]  # refined up to an origin shift
    assert np.allclose(offsets, [[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0]], atol=1e-12)


def test_rattle_strain_and_displacements():
    seed = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    out = apply_rattle(seed, np.random.default_rng(0))
    strain = np.linalg.solve(seed.cell.array, out.cell.array) - np.eye(3)
    assert np.allclose(strain, strain.T) and np.abs(strain).max() <= 0.05
    strained = seed.get_scaled_positions() @ out.cell.array
    shift = out.positions - strained
    assert 0.04 < shift.std() < 0.12 and out.get_volume() != seed.get_volume()


def test_jobs_are_deterministic_and_split_by_seed(tmp_path):
    source = load_seed_source(emt_seeds(tmp_path / "emt_6.extxyz"))
    assert source.ids[0] == "emt-m0" and len(source) == 6
    plan = JobPlan([source], parse_protocols("subst:1,rattle:1"), seed=3)
    again = JobPlan([load_seed_source(tmp_path / "emt_6.extxyz")], parse_protocols("subst:1,rattle:1"), seed=3)
    for k in range(14):
        a, b = plan.job(k), again.job(k)
        assert (a.atoms_id, a.seed_id, a.protocol, a.note) == (b.atoms_id, b.seed_id, b.protocol, b.note)
        assert np.array_equal(a.atoms.positions, b.atoms.positions)
    assert split_of("emt-m0") == split_of("emt-m0") in SPLITS
    assert split_of("x", inherited={"x": "test"}) == "test"


def test_protocols_symmetry_and_once_per_seed(tmp_path):
    source = load_seed_source(emt_seeds(tmp_path / "emt_6.extxyz"))
    plan = JobPlan([source], parse_protocols("subst_sym,rattle,jiggle,seed,minimum"), seed=1)
    jobs = [plan.job(k) for k in range(60)]  # 10 variants of each seed
    assert {j.protocol for j in jobs} == {"subst_sym", "rattle", "jiggle", "seed", "minimum"}
    for job in jobs:
        symmetric = job.protocol in ("subst_sym", "seed", "minimum")
        assert bool(job.atoms.constraints) == symmetric
        assert ("sg=123" in job.note) == symmetric  # the seeds are P4/mmm
    guesses = [[p for p in j.note.split(";") if p.startswith("vol=")] for j in jobs if j.protocol == "subst_sym"]
    assert {tuple(g) for g in guesses} == {(), ("vol=dls",), ("vol=none",)}  # radius3 is not named
    for seed_id in source.ids:  # the seed itself at most once each
        mine = [j.protocol for j in jobs if j.seed_id == seed_id]
        assert mine.count("seed") <= 1 and mine.count("minimum") <= 1
    for j in jobs:
        if j.protocol == "jiggle":
            seed = source.load(source.ids.index(j.seed_id))
            strain = np.linalg.solve(seed.cell.array, j.atoms.cell.array) - np.eye(3)
            assert np.abs(strain).max() <= 0.01
    # subst_sym's substitutions never repeat for a seed
    notes = [(j.seed_id, j.note.split(";vol")[0].split(";sg")[0]) for j in jobs if j.protocol == "subst_sym"]
    assert len(notes) == len(set(notes))


def test_families_and_seed_frames(tmp_path):
    assert [family_of(i) for i in ("perovval-1", "carbonval-C-1-2", "oqmd-5", "mp-0", "nomadbulk-x#2",
                                   "aflowdecorated-A_cF4_225_a-Cu", "pyxtalrandom-7", "emt-m0")] == [
        "perov", "carbon", "oqmd", "mp", "nomad", "aflow", "pyxtal", "emt"]
    a, b = bulk("Cu", "fcc", a=3.6), bulk("Cu", "fcc", a=3.7)
    for atoms in (a, b):
        atoms.info["nomad_id"] = "x"
    write(tmp_path / "nomad_bulk.extxyz", [a, a.copy(), b], format="extxyz")  # one material, an exact repeat
    source = load_seed_source(tmp_path / "nomad_bulk.extxyz")
    assert source.ids == ["nomadbulk-x", "nomadbulk-x#2"]
    assert np.isclose(source.load(1).cell.array[0, 1], 1.85)
    assert split_of("nomadbulk-x#2") == split_of("nomadbulk-x")
    assert split_of("nomadbulk-x#2", inherited={"nomadbulk-x": "val"}) == "val"


def test_seed_csv_and_cif_folder(tmp_path):
    folder = tmp_path / "my_cifs"
    folder.mkdir()
    write(folder / "a.cif", bulk("Cu", "fcc", a=3.6))
    write(folder / "b.cif", bulk("Ni", "fcc", a=3.5))
    cifs = sorted(folder.glob("*.cif"))
    with (tmp_path / "perov_5_val.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["", "material_id", "cif"])
        for k, path in enumerate(cifs):
            writer.writerow([k, 100 + k, path.read_text()])
    from_csv = load_seed_source(tmp_path / "perov_5_val.csv")
    from_folder = load_seed_source(folder)
    assert from_csv.ids == ["perovval-100", "perovval-101"]
    assert from_folder.ids == ["mycifs-a", "mycifs-b"]
    assert list(from_csv.load(1).numbers) == list(from_folder.load(1).numbers) == [Z["Ni"]]


def test_generate_reads_back_and_resumes(tmp_path):
    seeds = emt_seeds(tmp_path / "emt_6.extxyz")
    out = tmp_path / "pairs"
    summary = generate([seeds], out, n=6, calculator="emt", batch_size=4, progress=False, extxyz=True)
    assert summary["written"] == 6 and summary["total"] == 6
    index = {r["atoms_id"]: r for r in rows(out / "index.csv")}
    assert len(index) == 6 and set(rows(out / "index.csv")[0]) == {
        "atoms_id", "protocol", "seed_id", "note", "natoms", "steps", "e_unrelaxed", "e_relaxed", "family"}
    assert {r["family"] for r in index.values()} == {"emt"}
    seen, seeds_of_split = set(), {}
    for split in SPLITS:
        pairs = read_pairs(out, split)
        assert [p.id for p in pairs] == sorted(p.id for p in pairs)
        for p in pairs:
            row = index[p.id]
            assert p.id not in seen and len(p.atomic_numbers) == int(row["natoms"])
            assert float(row["e_relaxed"]) <= float(row["e_unrelaxed"]) + 1e-6
            assert np.isclose(abs(np.linalg.det(p.cell_relaxed)) / abs(np.linalg.det(p.cell_unrelaxed)), 1, atol=0.5)
            seen.add(p.id)
            seeds_of_split.setdefault(split, set()).add(row["seed_id"])
        if not pairs:
            assert not (out / "extxyz" / f"{split}_unrelaxed.extxyz.gz").exists()
            continue
        from_extxyz = read_pairs(out / "extxyz", split)
        assert [p.id for p in from_extxyz] == [p.id for p in pairs]
        for a, b in zip(pairs, from_extxyz, strict=True):
            assert np.array_equal(a.atomic_numbers, b.atomic_numbers)
            assert np.allclose(a.pos_relaxed, b.pos_relaxed) and np.allclose(a.cell_unrelaxed, b.cell_unrelaxed)
    assert seen == set(index)
    groups = list(seeds_of_split.values())
    assert all(not (x & y) for i, x in enumerate(groups) for y in groups[i + 1:])  # no seed straddles splits
    # The relaxed structure has the species of the unrelaxed one, with the substitution applied.
    for row in index.values():
        if row["protocol"].startswith("subst"):
            old, new = row["note"].split(";")[0].split(">")
            pair = next(p for s in SPLITS for p in read_pairs(out, s) if p.id == row["atoms_id"])
            assert Z[new] in pair.atomic_numbers and Z[old] not in pair.atomic_numbers

    stamps = {p: p.stat().st_mtime_ns for p in (out / "CIF").iterdir()}
    again = generate([seeds], out, n=6, calculator="emt", batch_size=4, progress=False)
    assert again["written"] == 0 and again["total"] == 6
    more = generate([seeds], out, n=9, calculator="emt", batch_size=4, progress=False)
    assert more["written"] == 3 and more["total"] == 9
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # done work is not redone
    ids = [r["atoms_id"] for r in rows(out / "index.csv")]
    assert len(ids) == len(set(ids)) == 9 and set(index) < set(ids)
    assert sum(len(rows(out / f"{s}.csv")) for s in SPLITS) == 9

    # A fresh run with the same settings makes the same jobs (ids, protocols, notes).
    fresh = tmp_path / "fresh"
    generate([seeds], fresh, n=9, calculator="emt", batch_size=2, progress=False)
    key = ("atoms_id", "protocol", "seed_id", "note", "natoms")
    assert sorted(tuple(r[k] for k in key) for r in rows(fresh / "index.csv")) == \
        sorted(tuple(r[k] for k in key) for r in rows(out / "index.csv"))

    with pytest.raises(ValueError, match="other settings"):
        generate([seeds], out, n=10, calculator="emt", seed=1, progress=False)
    (out / "datagen.lock").write_text(f"{os.getppid()}\n")  # a live process owns the folder
    with pytest.raises(ValueError, match="being written"):
        generate([seeds], out, n=10, calculator="emt", progress=False)


def test_unconverged_runs_are_dropped_and_inherited_splits(tmp_path):
    seeds = emt_seeds(tmp_path / "emt_6.extxyz")
    first = tmp_path / "first"
    generate([seeds], first, n=4, calculator="emt", progress=False, protocols="rattle")
    seed_of = {r["atoms_id"]: r["seed_id"] for r in rows(first / "index.csv")}
    split_by_seed = {seed_of[r["atoms_id"]]: split for split in SPLITS for r in rows(first / f"{split}.csv")}
    out = tmp_path / "capped"
    summary = generate([seeds], out, n=2, calculator="emt", max_steps=2, progress=False, max_attempts=3,
                       inherit=first, batched=False)
    assert summary["written"] == 0 and summary["dropped"] == 3
    dropped = rows(out / "dropped.csv")
    assert len(dropped) == 3 and all("not converged" in r["reason"] for r in dropped)
    # resuming does not retry dropped ids
    assert generate([seeds], out, n=2, calculator="emt", max_steps=2, progress=False, max_attempts=3,
                    inherit=first, batched=False)["dropped"] == 0
    from e3relax_fast.datagen import inherit_splits

    assert inherit_splits(first) == split_by_seed


def test_minimum_pairs_skipped_seeds_and_snapshot(tmp_path, capsys):
    seeds = emt_seeds(tmp_path / "emt_6.extxyz")
    big = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    big.info["material_id"] = "big"
    write(tmp_path / "big_1.extxyz", [big], format="extxyz")
    out = tmp_path / "run"
    summary = generate([seeds, tmp_path / "big_1.extxyz"], out, n=8, calculator="emt", protocols="minimum,jiggle",
                       progress=False, max_atoms=16, max_attempts=16)
    skipped = [r for r in rows(out / "dropped.csv") if r["seed_id"] == "big-big"]
    assert skipped and all(r["reason"] == "seed has 32 > 16 atoms" and r["protocol"] == "skipped" for r in skipped)
    # a resume keeps the skipped rows and does not skip them again
    assert generate([seeds, tmp_path / "big_1.extxyz"], out, n=8, calculator="emt", protocols="minimum,jiggle",
                    progress=False, max_atoms=16, max_attempts=16)["dropped"] == 0
    assert len([r for r in rows(out / "dropped.csv") if r["seed_id"] == "big-big"]) == len(skipped)
    assert summary["total"] == 8
    index = {r["atoms_id"]: r for r in rows(out / "index.csv")}
    minima = [r for r in index.values() if r["protocol"] == "minimum"]
    assert minima and all(r["steps"] == "0" and r["e_unrelaxed"] == r["e_relaxed"] for r in minima)

    counts = write_snapshot(out, tmp_path / "snap")
    assert counts["pairs"] == 8 and counts["families"] == {"emt": 8}
    assert sum(counts["splits"].values()) == 8 and sum(counts["family_split"].values()) == 8
    assert {r["atoms_id"] for r in rows(tmp_path / "snap" / "index.csv")} == set(index)
    from ase.io import read

    for split in SPLITS:
        if not counts["splits"][split]:
            continue
        pairs = read_pairs(tmp_path / "snap", split)  # the package's reader takes the extra info keys
        frames = read(tmp_path / "snap" / f"{split}_unrelaxed.extxyz.gz", index=":")
        assert [p.id for p in pairs] == [f.info["atoms_id"] for f in frames] == sorted(p.id for p in pairs)
        for pair, frame in zip(pairs, frames, strict=True):
            row = index[pair.id]
            assert (frame.info["family"], frame.info["protocol"], frame.info["seed_id"], frame.info["note"]) == (
                row["family"], row["protocol"], row["seed_id"], row["note"])
            if row["protocol"] == "minimum":  # the input is the minimum itself
                assert np.allclose(pair.pos_unrelaxed, pair.pos_relaxed, atol=1e-5)
    provenance = (tmp_path / "snap" / "provenance.json").read_text()
    assert '"argv"' in provenance and '"max_atoms": 16' in provenance

    from e3relax_fast.cli import main

    assert main(["datagen", "--out", str(out), "--snapshot", str(tmp_path / "snap2")]) == 0
    assert "8 pairs" in capsys.readouterr().out
    assert (tmp_path / "snap2" / "index.csv").read_text() == (tmp_path / "snap" / "index.csv").read_text()

    # A run killed before it wrote its last pairs' split rows (SIGTERM): the snapshot takes each pair's
    # split from its seed, as the generator does, and loses none.
    split_rows = {split: (out / f"{split}.csv").read_text() for split in SPLITS}
    for split in SPLITS:
        (out / f"{split}.csv").write_text("atoms_id\n")
    killed = write_snapshot(out, tmp_path / "snap3")
    assert killed == counts
    assert (tmp_path / "snap3" / "index.csv").read_text() == (tmp_path / "snap" / "index.csv").read_text()
    for split in SPLITS:
        assert (out / f"{split}.csv").read_text() == "atoms_id\n"  # the run folder is only read
        (out / f"{split}.csv").write_text(split_rows[split])


@pytest.mark.parametrize("with_dropped_csv", [True, False])
def test_restore_from_snapshot_resumes_with_new_jobs_only(tmp_path, with_dropped_csv):
    """A run rebuilt from its snapshot (a fresh checkout has only data/) resumes as the run itself would:
    the same next pairs, none made twice, the old pairs unchanged; snapshots older than dropped.csv
    restore the missing jobs below the last kept id as dropped."""
    big = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)
    big.info["material_id"] = "big"
    write(tmp_path / "big_1.extxyz", [big], format="extxyz")
    seeds = [emt_seeds(tmp_path / "emt_6.extxyz"), tmp_path / "big_1.extxyz"]
    # every other job comes from the 32-atom seed, over max_atoms: dropped.csv is not empty
    kwargs = dict(calculator="emt", protocols="subst_sym:2,rattle:1,minimum:1", progress=False, max_atoms=16)
    original = tmp_path / "run"
    generate(seeds, original, n=6, **kwargs)
    assert rows(original / "dropped.csv"), "the test needs a dropped job"
    write_snapshot(original, tmp_path / "snap")
    if not with_dropped_csv:
        (tmp_path / "snap" / "dropped.csv").unlink()
    restored = tmp_path / "restored"
    counts = restore_run(tmp_path / "snap", restored)
    assert counts["pairs"] == 6
    kept = {r["atoms_id"] for r in rows(original / "index.csv")}
    last = max(int(i[1:]) for i in kept)
    expected_dropped = {r["atoms_id"] for r in rows(original / "dropped.csv") if int(r["atoms_id"][1:]) < last}
    assert {r["atoms_id"] for r in rows(restored / "dropped.csv")} >= expected_dropped
    with pytest.raises(ValueError, match="holds pairs already"):
        restore_run(tmp_path / "snap", restored)
    # both resume to 9 pairs: the same new ids and notes, no id made twice
    generate(seeds, original, n=9, **kwargs)
    resumed = generate(seeds, restored, n=9, **kwargs)
    assert resumed["written"] == 3  # the 6 restored pairs are not made again
    a = {r["atoms_id"]: r["note"] for r in rows(original / "index.csv")}
    b = {r["atoms_id"]: r["note"] for r in rows(restored / "index.csv")}
    assert a == b and len(b) == 9
    # the old pairs are the snapshot's, to the precision of the CIF files and up to a lattice translation
    # per atom (ASE's CIF reader wraps fractions into [0, 1): an atom at 0.99999999999 may come back at 0)
    write_snapshot(restored, tmp_path / "snap2")
    from ase.io import read

    for split in SPLITS:
        path = tmp_path / "snap" / f"{split}_relaxed.extxyz.gz"
        if not path.exists():
            continue
        old = {f.info["atoms_id"]: f for f in read(path, index=":")}
        new = {f.info["atoms_id"]: f for f in read(tmp_path / "snap2" / f"{split}_relaxed.extxyz.gz", index=":")}
        assert set(old) <= set(new)
        for i, frame in old.items():
            assert np.array_equal(frame.numbers, new[i].numbers)
            assert np.allclose(frame.cell.array, new[i].cell.array, atol=1e-6)
            shift = (new[i].positions - frame.positions) @ np.linalg.inv(frame.cell.array)
            assert np.allclose(shift, np.round(shift), atol=1e-8)


def test_unbatched_and_workers_give_the_same_pairs(tmp_path):
    seeds = emt_seeds(tmp_path / "emt_6.extxyz")
    serial = tmp_path / "serial"
    generate([seeds], serial, n=4, calculator="emt", batched=False, progress=False)
    pooled = tmp_path / "pooled"
    generate([seeds], pooled, n=4, calculator="emt", workers=2, batch_size=2, progress=False)
    a = {r["atoms_id"]: r for r in rows(serial / "index.csv")}
    b = {r["atoms_id"]: r for r in rows(pooled / "index.csv")}
    assert set(a) == set(b)
    for k in a:
        assert a[k]["note"] == b[k]["note"]
        assert abs(float(a[k]["e_relaxed"]) - float(b[k]["e_relaxed"])) < 1e-3


def test_cli_datagen(tmp_path, capsys):
    from e3relax_fast.cli import main

    seeds = emt_seeds(tmp_path / "emt_6.extxyz")
    status = main(["datagen", "--seeds", str(seeds), "--out", str(tmp_path / "cli"), "--n", "3",
                   "--calculator", "emt", "--protocol", "subst,rattle", "--no-batched", "--quiet"])
    assert status == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    assert sum(len(read_pairs(tmp_path / "cli", s)) for s in SPLITS) == 3
    assert main(["datagen", "--seeds", str(seeds), "--out", str(tmp_path / "bad"), "--n", "1",
                 "--calculator", "emt", "--protocol", "melt", "--quiet"]) == 2


def test_cli_datagen_ctrl_c_is_one_line_and_the_command_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C is how a long generator run is stopped: one line (no traceback), status 130, the
    pairs finished before it kept, and the same command finishes the run."""
    from e3relax_fast.cli import main
    generate_module = importlib.import_module("e3relax_fast.datagen.generate")  # the package re-exports generate()

    seeds = emt_seeds(tmp_path / "emt_6.extxyz")
    command = ["datagen", "--seeds", str(seeds), "--out", str(tmp_path / "cli"), "--n", "4", "--calculator", "emt",
               "--protocol", "subst,rattle", "--no-batched", "--quiet"]
    record = generate_module._Run.record

    def ctrl_c_on_the_third(self, job, outcome):
        if self.counters["written"] == 2:
            raise KeyboardInterrupt
        record(self, job, outcome)

    monkeypatch.setattr(generate_module._Run, "record", ctrl_c_on_the_third)
    assert main(command) == 130
    err = capsys.readouterr().err
    assert "e3relax-fast datagen: interrupted" in err and "resumes" in err and "Traceback" not in err
    assert len(rows(tmp_path / "cli" / "index.csv")) == 2
    assert not (tmp_path / "cli" / "datagen.lock").exists()
    monkeypatch.undo()
    assert main(command) == 0
    assert "wrote 2 pairs" in capsys.readouterr().out
    assert sum(len(read_pairs(tmp_path / "cli", s)) for s in SPLITS) == 4


@pytest.mark.filterwarnings("ignore::UserWarning")  # chgnet's own tensor-conversion warning
def test_chgnet_datagen(tmp_path):
    pytest.importorskip("chgnet", reason="chgnet is not installed (pip install e3relax-fast[datagen])")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        atoms = bulk("Si", "diamond", a=5.6)
        atoms.info["material_id"] = "si"
        write(tmp_path / "si_1.extxyz", [atoms], format="extxyz")
        summary = generate([tmp_path / "si_1.extxyz"], tmp_path / "out", n=1, calculator="chgnet",
                           protocols="rattle", progress=False)
        # A cubic perovskite substituted and relaxed with its symmetry kept stays cubic (freely, CHGNet's
        # float32 noise can tilt the octahedra).
        perovskite = ase.Atoms("CaTiO3", scaled_positions=[(0, 0, 0), (.5, .5, .5), (.5, .5, 0), (.5, 0, .5),
                                                             (0, .5, .5)], cell=np.eye(3) * 3.9, pbc=True)
        perovskite.info["material_id"] = "cto"
        write(tmp_path / "perov_1.extxyz", [perovskite], format="extxyz")
        generate([tmp_path / "perov_1.extxyz"], tmp_path / "sym", n=1, calculator="chgnet", protocols="subst_sym",
                 progress=False)
    finally:
        torch.set_num_threads(threads)
    assert summary["written"] == 1
    assert sum(len(read_pairs(tmp_path / "out", s)) for s in SPLITS) == 1
    (pair,) = [p for s in SPLITS for p in read_pairs(tmp_path / "sym", s)]
    import spglib

    cell = (pair.cell_relaxed, np.linalg.solve(pair.cell_relaxed.T, pair.pos_relaxed.T).T, pair.atomic_numbers)
    assert spglib.get_symmetry_dataset(cell, symprec=1e-3).number == 221
