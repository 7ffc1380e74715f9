"""Make unrelaxed → relaxed pairs from seed crystals with an interatomic potential (``e3relax-fast datagen``).

Protocols (``subst`` and ``rattle`` as for ``/work/shared/data/pairs/chgnet_v1``, see its README):

- ``subst``: replace 1..all elements of a seed by chemically similar ones (:func:`similar_elements`:
  same group, one row up or down; lanthanides Ce–Lu: their neighbours in the series; Z ≤ 83, no
  H, noble gases or radioactive elements; a new element is never one already in the structure),
  then scale the volume by Σ r_new³ / Σ r_old³ with ASE's covalent radii (an unrelaxed guess as
  prototype-substitution pipelines make); relaxed freely. The substitutions of one seed never
  repeat (also across ``subst`` and ``subst_sym``).
- ``subst_sym``: the same substitutions with a volume guess drawn per job from ``radius3`` (as
  ``subst``), ``dls`` (pymatgen's ``DLSVolumePredictor``) or ``none`` (the seed's cell), so no one
  generator's bias is learnt; relaxed with the input's space group kept.
- ``rattle``: symmetric strain with entries uniform in [−0.05, 0.05] (cell' = cell (I + ε)), then
  Gaussian displacements with σ = 0.08 Å; relaxed freely.
- ``jiggle``: the same with ±0.01 and σ = 0.02 Å: a near-minimum input; relaxed freely.
- ``seed``: the seed as given (DFT-relaxed, so near the potential's minimum), relaxed with its
  space group kept.
- ``minimum``: the seed relaxed as for ``seed``; the pair is that minimum → itself (``steps`` 0;
  relaxing it again would stop at once), so an already relaxed crystal is taught to stay put.

``seed`` and ``minimum`` are made once per seed (a later variant that draws one again becomes
``jiggle``); a ``subst*`` variant of a seed whose substitutions are used up becomes ``rattle``.
Symmetric protocols refine the input to its space group at ``symprec`` (spglib, Å) and relax it
under ASE's ``FixSymmetry`` (:class:`~e3relax_fast.datagen.fire.BatchedFIRE` honours it); the note
records the group (``sg=<number>``). Seeds with more than ``max_atoms`` atoms are skipped (listed
in ``dropped.csv``).

Every unrelaxed structure is relaxed (FIRE + unit-cell filter, ``fmax`` eV/Å, at most
``max_steps`` steps) with CHGNet or any ASE calculator; unconverged runs, volume changes beyond 3×
and structures the model could not take are dropped (listed in ``dropped.csv``).

Job ``k`` is a pure function of ``k``, the seed files and ``--seed``: sources are interleaved
(job k comes from source ``k mod S``), each source's seeds in a fixed shuffled order, the variant
of a seed is how often it came round before, and each (seed, variant) has its own RNG. Ids are
``<prefix><k:06d>``. A run is resumable: ids in ``index.csv`` or ``dropped.csv`` are skipped, and
``datagen.json`` records the settings that define the jobs (a resume with other ones is refused).
Splits are by seed (a hash of the seed id only, or inherited from an existing dataset), so the
variants of one seed — also across runs with other ``--seed`` — never straddle splits.

Output (the CIF folder format of :mod:`e3relax_fast.data`): ``CIF/<id>_unrelaxed.cif``,
``CIF/<id>_relaxed.cif`` (same atom order), ``train.csv``/``val.csv``/``test.csv`` (column
``atoms_id``), ``index.csv`` (``atoms_id,protocol,seed_id,note,natoms,steps,e_unrelaxed,e_relaxed,
family``, energies in eV/atom, family: :func:`family_of` the seed), ``dropped.csv``, ``datagen.json``
(settings and the command line of every start) and optionally ``extxyz/`` (a
:func:`~e3relax_fast.datagen.snapshot.write_snapshot` of the folder).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import SPLITS
from ..io.structures import to_atoms
from .calculators import make_calculator
from .fire import BatchedFIRE, relax_one_ase
from .protocols import (
    DEFAULT_PROTOCOLS,
    JIGGLE_SIGMA,
    JIGGLE_STRAIN,
    ONCE_PER_SEED,
    SYMPREC,
    VOLUME_GUESSES,
    apply_rattle,
    apply_substitution,
    keep_symmetry,
    parse_protocols,
    seeded_rng,
    substitutions,
)
from .seeds import SeedSource, family_of, load_seed_source

INDEX_COLUMNS = ("atoms_id", "protocol", "seed_id", "note", "natoms", "steps", "e_unrelaxed", "e_relaxed", "family")
DROPPED_COLUMNS = ("atoms_id", "protocol", "seed_id", "note", "natoms", "steps", "reason", "family")
#: Largest seed (atoms) used by default.
MAX_ATOMS = 40
#: Largest allowed volume ratio (either way) between relaxed and unrelaxed cells.
MAX_VOLUME_RATIO = 3.0

# --- jobs ---------------------------------------------------------------------------------------


@dataclass
class Job:
    """One unrelaxed structure to relax (``atoms`` carries ``FixSymmetry`` for symmetric protocols);
    ``skip`` says why it is not made at all (recorded in ``dropped.csv``)."""

    atoms_id: str
    seed_id: str
    protocol: str
    note: str
    atoms: object
    skip: str | None = None


class JobPlan:
    """Job ``k`` as a pure function of ``k`` (see the module docstring)."""

    def __init__(self, sources: Sequence[SeedSource], protocols: dict[str, float], seed: int = 0,
                 id_prefix: str = "g", max_atoms: int | None = None, symprec: float = SYMPREC) -> None:
        if not sources or any(len(s) == 0 for s in sources):
            raise ValueError("every seed source must hold at least one seed")
        all_ids = [i for s in sources for i in s.ids]
        if len(set(all_ids)) != len(all_ids):
            raise ValueError("seed ids repeat across or within seed files; rename a file or folder")
        self.sources = list(sources)
        self.protocols = protocols
        self.seed = seed
        self.id_prefix = id_prefix
        self.max_atoms = max_atoms
        self.symprec = symprec
        self.order = [seeded_rng(seed, "order", s.name, len(s)).permutation(len(s)) for s in self.sources]
        self._cache: dict[str, object] = {}

    def locate(self, k: int) -> tuple[SeedSource, int, int]:
        """(source, seed index, variant) of job ``k``."""
        src = self.sources[k % len(self.sources)]
        j = k // len(self.sources)
        order = self.order[k % len(self.sources)]
        return src, int(order[j % len(src)]), j // len(src)

    def atoms_id(self, k: int) -> str:
        return f"{self.id_prefix}{k:06d}"

    def _protocol(self, seed_id: str, variant: int) -> str:
        """The protocol drawn for a variant (before the fallbacks of :meth:`job`)."""
        names = list(self.protocols)
        rng = seeded_rng(self.seed, seed_id, variant, "protocol")
        return names[rng.choice(len(names), p=list(self.protocols.values()))]

    def job(self, k: int) -> Job:
        src, index, variant = self.locate(k)
        seed_id = src.ids[index]
        loaded = src.load(index)
        # Only species, positions and cell: CIF-reader extras (occupancies, kinds) would go stale.
        atoms = to_atoms(loaded.numbers, loaded.positions, loaded.cell.array)
        if self.max_atoms is not None and len(atoms) > self.max_atoms:
            return Job(self.atoms_id(k), seed_id, "skipped", "", atoms,
                       skip=f"seed has {len(atoms)} > {self.max_atoms} atoms")
        earlier = [self._protocol(seed_id, v) for v in range(variant)]
        protocol = self._protocol(seed_id, variant)
        if protocol in ONCE_PER_SEED and protocol in earlier:
            protocol = "jiggle"  # the seed's own pair exists already: a perturbed near-minimum instead
        if protocol in ("subst", "subst_sym"):
            rank = sum(p in ("subst", "subst_sym") for p in earlier)
            found = substitutions(seed_id, atoms.numbers, rank + 1, self.seed)
            if len(found) > rank:
                if protocol == "subst":
                    unrelaxed, note = apply_substitution(atoms, found[rank])
                    return Job(self.atoms_id(k), seed_id, "subst", note, unrelaxed)
                guess = VOLUME_GUESSES[seeded_rng(self.seed, seed_id, variant, "volume").integers(len(VOLUME_GUESSES))]
                unrelaxed, note = apply_substitution(atoms, found[rank], guess)
                return self._symmetric(k, seed_id, protocol, note, unrelaxed)
            protocol = "rattle"  # no (further) distinct substitution for this seed
        if protocol in ONCE_PER_SEED:
            return self._symmetric(k, seed_id, protocol, protocol, atoms)
        if protocol == "jiggle":
            rng = seeded_rng(self.seed, seed_id, variant, "jiggle")
            return Job(self.atoms_id(k), seed_id, protocol, "jiggle",
                       apply_rattle(atoms, rng, JIGGLE_STRAIN, JIGGLE_SIGMA))
        unrelaxed = apply_rattle(atoms, seeded_rng(self.seed, seed_id, variant, "rattle"))
        return Job(self.atoms_id(k), seed_id, protocol, "rattle", unrelaxed)

    def _symmetric(self, k: int, seed_id: str, protocol: str, note: str, atoms) -> Job:
        """A job relaxed with the input's space group kept; the note gains ``sg=<number>``."""
        atoms, number = keep_symmetry(atoms, self.symprec)
        return Job(self.atoms_id(k), seed_id, protocol, f"{note};sg={number}", atoms)


def split_of(seed_id: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), inherited: dict | None = None) -> str:
    """Split of a seed's material (the id without a ``#<n>`` frame suffix, see
    :func:`load_seed_source`): ``inherited[material]`` when given, else from a hash of it alone."""
    material = seed_id.split("#", 1)[0]
    if inherited and material in inherited:
        return inherited[material]
    u = int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "little") / 2.0**64
    edges = np.cumsum(fractions) / np.sum(fractions)
    return SPLITS[min(int(np.searchsorted(edges, u, side="right")), len(SPLITS) - 1)]


def inherit_splits(root: str | Path) -> dict[str, str]:
    """``{seed_id: split}`` of an existing dataset (its ``index.csv`` and split CSVs)."""
    root = Path(root)
    seed_of = {row["atoms_id"]: row["seed_id"] for row in _read_rows(root / "index.csv", INDEX_COLUMNS)}
    out = {}
    for split in SPLITS:
        path = root / f"{split}.csv"
        if path.exists():
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("atoms_id") in seed_of:
                        out[seed_of[row["atoms_id"]]] = split
    return out


@dataclass
class Settings:
    """What a worker needs to relax jobs."""

    calculator: str = "chgnet"
    batched: bool = True
    fmax: float = 0.05
    max_steps: int = 300
    batch_size: int = 32
    threads: int = 1
    device: str = "cpu"


_WORKER: dict = {}


def _init_worker(settings: Settings) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.threads))
    try:
        import torch

        torch.set_num_threads(settings.threads)
    except ImportError:
        pass
    _WORKER["settings"] = settings
    _WORKER["calc"] = make_calculator(settings.calculator, settings.batched, settings.batch_size, settings.device)


def _relax_iter(atoms_iter, settings: Settings) -> Iterator[tuple[int, object]]:
    """Yield ``(position in atoms_iter, RelaxOutcome)`` as relaxations finish."""

    if "calc" not in _WORKER or _WORKER["settings"] != settings:
        _init_worker(settings)
    calc = _WORKER["calc"]
    if settings.batched:
        fire = BatchedFIRE(calc, fmax=settings.fmax, max_steps=settings.max_steps, max_batch=settings.batch_size)
        yield from fire.irelax(atoms_iter)
    else:
        for k, atoms in enumerate(atoms_iter):
            yield k, relax_one_ase(atoms, calc, fmax=settings.fmax, max_steps=settings.max_steps)


def _relax_chunk(args) -> list:
    atoms_list, settings = args
    return sorted(_relax_iter(atoms_list, settings), key=lambda t: t[0])


def judge(job: Job, outcome) -> str | None:
    """Why a relaxation is dropped, or ``None`` to keep it."""
    from ..io import InvalidStructureError, validate

    if outcome.error:
        return outcome.error
    if not outcome.converged:
        return f"not converged in {outcome.steps} steps (fmax {outcome.fmax:.3f} eV/A)"
    ratio = outcome.atoms.get_volume() / job.atoms.get_volume()
    if not 1.0 / MAX_VOLUME_RATIO <= ratio <= MAX_VOLUME_RATIO:
        return f"volume changed {ratio:.2f}x"
    try:
        validate(outcome.atoms.numbers, outcome.atoms.positions, outcome.atoms.cell.array)
    except InvalidStructureError as err:
        return f"relaxed structure invalid: {err.reason}"
    return None


# --- output -------------------------------------------------------------------------------------


def _read_rows(path: Path, columns: Sequence[str]) -> list[dict]:
    """Complete rows of a CSV written by this module (a torn last line is ignored)."""
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    good = [r for r in rows if None not in r and all(r.get(c) not in (None, "") for c in columns[:3])]
    return list({r["atoms_id"]: r for r in good}.values())


def _rewrite_rows(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


class _Appender:
    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        new = not path.exists()
        self.fh = path.open("a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=columns)
        if new:
            self.writer.writeheader()
            self.fh.flush()

    def write(self, row: dict) -> None:
        self.writer.writerow(row)
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()


def _write_cif(atoms, path: Path) -> None:
    from ase.io import write

    tmp = path.with_name(path.name + ".tmp")
    write(tmp, atoms, format="cif", wrap=False)
    tmp.replace(path)


def assign_splits(rows, fractions: Sequence[float], inherited: dict | None) -> dict[str, list[str]]:
    """``{split: [atoms_id, ...]}`` of index ``rows`` (dicts with ``atoms_id``, ``seed_id``), each pair in
    its seed's split (:func:`split_of`)."""
    ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    for row in rows:
        ids[split_of(row["seed_id"], fractions, inherited)].append(row["atoms_id"])
    return ids


def write_splits(out: Path, fractions: Sequence[float], inherited: dict | None) -> dict[str, int]:
    """(Re)write ``train.csv``/``val.csv``/``test.csv`` from ``index.csv``; returns the counts."""
    ids = assign_splits(_read_rows(out / "index.csv", INDEX_COLUMNS), fractions, inherited)
    for split, members in ids.items():
        _rewrite_rows(out / f"{split}.csv", ("atoms_id",), [{"atoms_id": i} for i in sorted(members)])
    return {s: len(v) for s, v in ids.items()}


class _Progress:
    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.total, self.count, self.enabled = total, initial, enabled
        self.start = time.perf_counter()
        self.bar = None
        self.last = 0.0
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="pair", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, written: int, dropped: int) -> None:
        self.count += written
        if self.bar is not None:
            self.bar.update(written)
            self.bar.set_postfix(dropped=dropped, refresh=False)
        elif self.enabled and (time.perf_counter() - self.last > 30 or self.count >= self.total):
            self.last = time.perf_counter()
            print(f"datagen: {self.count}/{self.total} pairs, {dropped} dropped, "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(seeds: Sequence[str | Path], out: str | Path, n: int, protocols: str | dict = DEFAULT_PROTOCOLS,
             calculator: str = "chgnet", workers: int = 1, batched: bool = True, fmax: float = 0.05,
             max_steps: int = 300, seed: int = 0, batch_size: int = 64, split_fractions=(0.8, 0.1, 0.1),
             inherit: str | Path | None = None, id_prefix: str = "g", extxyz: bool = False,
             progress: bool = True, threads: int = 1, max_attempts: int | None = None,
             time_limit: float | None = None, max_atoms: int | None = MAX_ATOMS, symprec: float = SYMPREC) -> dict:
    """Make pairs until ``out`` holds ``n`` of them (resuming earlier work); see the module docstring.

    Args:
        seeds: seed files/folders (:func:`load_seed_source`).
        protocols: ``"subst,rattle"``-style string with optional ``:weight`` (default
            :data:`~e3relax_fast.datagen.protocols.DEFAULT_PROTOCOLS`; chgnet_v1 was
            ``subst:4,rattle:1``) or a ``{name: weight}`` dict.
        calculator: ``chgnet``, ``emt`` or ``module:factory`` (:func:`make_calculator`).
        workers: processes relaxing in parallel (each with ``threads`` torch threads).
        batched: :class:`~e3relax_fast.fire.BatchedFIRE` with ``batch_size`` structures per
            potential call; else ASE's FIRE + UnitCellFilter one structure at a time.
        split_fractions: train/val/test shares for seeds not in ``inherit`` (a dataset folder whose
            seed → split assignment is reused, so the datasets can be merged without leakage).
        max_attempts: stop after this many jobs were tried in total (default ``4 n + 100``).
        time_limit: stop starting new work after this many seconds.
        max_atoms: seeds with more atoms are skipped (``None``: none are).
        symprec: spglib tolerance (Å) of the symmetric protocols.

    Returns:
        A summary: ``written`` (this call), ``dropped`` (this call), ``total`` (pairs in ``out``),
        ``splits`` (counts), ``seconds``, ``pairs_per_hour``.
    """
    out = Path(out)
    (out / "CIF").mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        return _generate(seeds, out, n, protocols, calculator, workers, batched, fmax, max_steps, seed, batch_size,
                         split_fractions, inherit, id_prefix, extxyz, progress, threads, max_attempts, time_limit,
                         max_atoms, symprec)
    finally:
        lock.unlink(missing_ok=True)


def _lock(out: Path) -> Path:
    """Refuse a second live run on the same folder (``datagen.lock`` holds the owner's pid)."""
    lock = out / "datagen.lock"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if alive:
            raise ValueError(f"{out} is being written by process {pid} (remove {lock} if that is wrong)")
    lock.write_text(f"{os.getpid()}\n")
    return lock


def _generate(seeds, out, n, protocols, calculator, workers, batched, fmax, max_steps, seed, batch_size,
              split_fractions, inherit, id_prefix, extxyz, progress, threads, max_attempts, time_limit,
              max_atoms, symprec) -> dict:
    weights = parse_protocols(protocols) if isinstance(protocols, str) else dict(protocols)
    sources = [load_seed_source(p) for p in seeds]
    plan = JobPlan(sources, weights, seed=seed, id_prefix=id_prefix, max_atoms=max_atoms, symprec=symprec)
    config = {"seeds": [str(Path(p).resolve()) for p in seeds], "seed_counts": [len(s) for s in sources],
              "protocols": weights, "seed": seed, "id_prefix": id_prefix, "fmax": fmax, "max_steps": max_steps,
              "calculator": calculator, "split_fractions": list(split_fractions),
              "inherit": str(Path(inherit).resolve()) if inherit else None, "max_atoms": max_atoms,
              "symprec": symprec}
    _check_config(out / "datagen.json", config)
    _log_start(out / "datagen.json", n)
    inherited = inherit_splits(inherit) if inherit else None
    run = _Run(out, plan, n, max_attempts if max_attempts is not None else 4 * n + 100, time_limit,
               split_fractions, inherited, progress)
    try:
        run.relax_all(Settings(calculator, batched, fmax, max_steps, batch_size, threads), workers)
    finally:
        run.close()
    seconds = time.perf_counter() - run.start
    splits = write_splits(out, split_fractions, inherited)
    if extxyz:
        from .snapshot import write_snapshot

        write_snapshot(out, out / "extxyz")
    written = run.counters["written"]
    rate = written / seconds * 3600 if seconds > 0 else float("nan")
    return {"written": written, "dropped": run.counters["dropped"], "total": run.total + written,
            "splits": splits, "seconds": seconds, "pairs_per_hour": rate}


class _Run:
    """One call of :func:`generate` on an output folder: what is done already, the jobs still to do,
    and the record of each relaxation as it finishes (pair files + ``index.csv``, or ``dropped.csv``)."""

    def __init__(self, out: Path, plan: JobPlan, n: int, max_attempts: int, time_limit: float | None,
                 split_fractions, inherited: dict | None, progress: bool) -> None:
        self.out, self.plan, self.n, self.max_attempts, self.time_limit = out, plan, n, max_attempts, time_limit
        self.split_fractions, self.inherited = split_fractions, inherited
        index_rows = _read_rows(out / "index.csv", INDEX_COLUMNS)
        dropped_rows = _read_rows(out / "dropped.csv", DROPPED_COLUMNS)
        for path, columns, rows in ((out / "index.csv", INDEX_COLUMNS, index_rows),
                                    (out / "dropped.csv", DROPPED_COLUMNS, dropped_rows)):
            for row in rows:  # folders made before the family column get it here
                row["family"] = row.get("family") or family_of(row["seed_id"])
            if path.exists():
                _rewrite_rows(path, columns, rows)  # drop a torn line left by an interrupted run
        self.done = {r["atoms_id"] for r in index_rows} | {r["atoms_id"] for r in dropped_rows}
        self.total = len(index_rows)
        self.index = _Appender(out / "index.csv", INDEX_COLUMNS)
        self.dropped = _Appender(out / "dropped.csv", DROPPED_COLUMNS)
        self.bar = _Progress(n, min(self.total, n), progress)
        self.start = time.perf_counter()
        self.counters = {"written": 0, "dropped": 0, "in_flight": 0, "next": 0}

    def pending(self) -> Iterator[Job]:
        """Jobs not done yet, while more pairs are needed (lazily, so stopping is prompt)."""
        counters = self.counters
        while counters["next"] < self.max_attempts:
            if self.total + counters["written"] + counters["in_flight"] >= self.n:
                return
            if self.time_limit is not None and time.perf_counter() - self.start > self.time_limit:
                return
            k = counters["next"]
            counters["next"] += 1
            if self.plan.atoms_id(k) in self.done:
                continue
            job = self.plan.job(k)
            if job.skip:
                self.dropped.write({"atoms_id": job.atoms_id, "protocol": job.protocol, "seed_id": job.seed_id,
                                    "note": job.note, "natoms": len(job.atoms), "steps": 0, "reason": job.skip,
                                    "family": family_of(job.seed_id)})
                continue
            counters["in_flight"] += 1
            yield job

    def record(self, job: Job, outcome) -> None:
        """Keep the pair (files and an ``index.csv`` row) or drop it (a ``dropped.csv`` row and why)."""
        counters = self.counters
        counters["in_flight"] -= 1
        reason = judge(job, outcome)
        natoms = len(job.atoms)
        family = family_of(job.seed_id)
        if reason is not None:
            self.dropped.write({"atoms_id": job.atoms_id, "protocol": job.protocol, "seed_id": job.seed_id,
                                "note": job.note, "natoms": natoms, "steps": outcome.steps, "reason": reason,
                                "family": family})
            counters["dropped"] += 1
            self.bar.update(0, counters["dropped"])
            return
        unrelaxed, note, steps, energy_initial = job.atoms, job.note, outcome.steps, outcome.energy_initial
        if job.protocol == "minimum":  # the pair is the minimum itself: relaxing it again takes no step
            unrelaxed, note, energy_initial = outcome.atoms, f"{note};reached in {steps} steps", outcome.energy
            steps = 0
        _write_cif(unrelaxed, self.out / "CIF" / f"{job.atoms_id}_unrelaxed.cif")
        _write_cif(outcome.atoms, self.out / "CIF" / f"{job.atoms_id}_relaxed.cif")
        self.index.write({"atoms_id": job.atoms_id, "protocol": job.protocol, "seed_id": job.seed_id, "note": note,
                          "natoms": natoms, "steps": steps, "e_unrelaxed": f"{energy_initial / natoms:.6f}",
                          "e_relaxed": f"{outcome.energy / natoms:.6f}", "family": family})
        counters["written"] += 1
        self.bar.update(1, counters["dropped"])
        if counters["written"] % 20 == 0:  # keep the split files usable while a long run goes on
            write_splits(self.out, self.split_fractions, self.inherited)

    def relax_all(self, settings: Settings, workers: int) -> None:
        """Relax the pending jobs, in rounds: a round feeds jobs until enough are in flight; drops are
        made up by the next one."""
        pool = None
        try:
            if workers > 1:
                import multiprocessing as mp

                pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(settings,))
            while True:
                before = self.counters["next"]
                if pool is None:
                    jobs: list[Job | None] = []

                    def feed(jobs=jobs):
                        for job in self.pending():
                            jobs.append(job)
                            yield job.atoms

                    for k, outcome in _relax_iter(feed(), settings):
                        self.record(jobs[k], outcome)
                        jobs[k] = None  # free memory
                else:
                    _run_pool(pool, self.pending(), settings, 2 * workers, self.record)
                if self.counters["next"] == before:
                    break
        finally:
            if pool is not None:
                pool.terminate()

    def close(self) -> None:
        self.index.close()
        self.dropped.close()
        self.bar.close()


def _run_pool(pool, jobs: Iterator[Job], settings: Settings, max_in_flight: int, record) -> None:
    """Relax chunks of jobs in the worker pool, at most ``max_in_flight`` chunks at a time."""
    chunk = settings.batch_size if settings.batched else 4
    in_flight = []
    exhausted = False
    while True:
        while not exhausted and len(in_flight) < max_in_flight:
            part = []
            for job in jobs:
                part.append(job)
                if len(part) >= chunk:
                    break
            if not part:
                exhausted = True
                break
            in_flight.append((part, pool.apply_async(_relax_chunk, (([j.atoms for j in part], settings),))))
        if not in_flight:
            return
        ready = next((x for x in in_flight if x[1].ready()), None)
        if ready is None:
            time.sleep(0.2)
            continue
        in_flight.remove(ready)
        part, result = ready
        for k, outcome in result.get():
            record(part[k], outcome)


def _check_config(path: Path, config: dict) -> None:
    """Refuse to resume with settings that change what job ``k`` is (or what counts as done).

    ``max_atoms`` and ``symprec`` are checked only where the folder recorded them: older folders
    were made before they existed, from seeds of at most 40 atoms and with no symmetric protocol,
    which the defaults reproduce."""
    if path.exists():
        old = json.loads(path.read_text())
        keys = ("seeds", "seed_counts", "protocols", "seed", "id_prefix", "fmax", "max_steps", "split_fractions",
                "inherit", "max_atoms", "symprec")
        changed = [k for k in keys if old.get(k, config.get(k)) != config.get(k)]
        if changed:
            raise ValueError(f"{path.parent} was made with other settings ({', '.join(changed)}: "
                             f"{[old.get(k) for k in changed]} then, {[config.get(k) for k in changed]} now); "
                             "use another --out")
        if old.get("calculator") != config["calculator"]:
            raise ValueError(f"{path.parent} was made with calculator {old.get('calculator')!r}; use another --out")
        return
    path.write_text(json.dumps(config, indent=1) + "\n")


def _log_start(path: Path, n: int) -> None:
    """Append this start (UTC time, target, command line) to ``datagen.json``'s ``starts``: the
    provenance of every part of the folder."""
    import sys

    config = json.loads(path.read_text())
    config.setdefault("starts", []).append({"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "n": n,
                                            "argv": sys.argv, "pid": os.getpid()})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=1) + "\n")
    tmp.replace(path)

