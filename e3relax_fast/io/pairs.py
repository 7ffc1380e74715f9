"""Unrelaxed → relaxed pair datasets in the formats the original work released (spec §11): readers
returning :class:`Pair` records, and the extxyz writer (the training side,
:class:`~e3relax_fast.training.dataset.PairDataset`, builds graphs and targets from them).

Supported sources:

- a CIF folder: ``CIF/<id>_unrelaxed.cif`` + ``CIF/<id>_relaxed.cif`` (or ``<id>_U.cif`` /
  ``<id>_R.cif``; the ``CIF/`` level is optional) with split files ``train.csv`` / ``val.csv`` /
  ``test.csv`` (id column ``atoms_id`` or ``mp_id``) or ``id_prop_{split}_all.csv`` (ids in
  column 0);
- extxyz pairs: ``<split>_unrelaxed.extxyz[.gz]`` and ``<split>_relaxed.extxyz[.gz]``, frames in
  the same order, ids in ``info["atoms_id"]``;
- an ASE database whose rows are unrelaxed structures with ``data["pos_relaxed"]`` (n, 3) and
  ``data["cell_relaxed"]`` (3, 3) and key-value pairs ``atoms_id`` and ``split``.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .read import read_structure, read_structures
from .structures import to_arrays, to_atoms

SPLITS = ("train", "val", "test")


#: Seed families, for leave-one-family-out evaluation: a seed's family is the first of these that
#: its id's prefix (the letters of its seed file's name, e.g. ``perovval``, ``nomadbulk``,
#: ``aflowdecorated``) starts with, else the prefix itself.
FAMILIES = ("perov", "carbon", "oqmd", "mp", "nomad", "aflow", "pyxtal")


def family_of(seed_id: str) -> str:
    """Family of a seed id ``<prefix>-<id>`` (see :data:`FAMILIES`)."""
    prefix = seed_id.split("-", 1)[0]
    return next((f for f in FAMILIES if prefix.startswith(f)), prefix)


@dataclass
class Pair:
    """One unrelaxed → relaxed pair; atoms correspond by index. Positions (n, 3) Cartesian Å,
    cells (3, 3) Å with lattice vectors as rows, atomic numbers (n,) int64. ``family`` (the seed
    family, :data:`FAMILIES`) and ``protocol`` (how the unrelaxed structure was made) are "" where
    the dataset does not say. :func:`read_pairs` returns the relaxed structure turned into the
    unrelaxed one's orientation (:func:`without_relaxed_rotation`); a ``Pair`` built by hand is taken
    as given, so training and scoring see its relaxed orientation as a target."""

    id: str
    atomic_numbers: np.ndarray
    pos_unrelaxed: np.ndarray
    cell_unrelaxed: np.ndarray
    pos_relaxed: np.ndarray
    cell_relaxed: np.ndarray
    family: str = ""
    protocol: str = ""


def _pair_from_atoms(pair_id: str, unrelaxed, relaxed) -> Pair:
    z, pos_u, cell_u = to_arrays(unrelaxed)
    z_r, pos_r, cell_r = to_arrays(relaxed)
    if not np.array_equal(z, z_r):
        raise ValueError(f"pair {pair_id}: unrelaxed and relaxed structures have different species/order")
    return Pair(pair_id, z, pos_u, cell_u, pos_r, cell_r)


def _split_ids(root: Path, split: str) -> list[str]:
    for name in (f"{split}.csv", f"id_prop_{split}_all.csv"):
        path = root / name
        if not path.exists():
            continue
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        header = rows[0] if rows else []
        for column in ("atoms_id", "mp_id"):
            if column in header:
                col = header.index(column)
                return [r[col] for r in rows[1:] if r]
        return [r[0] for r in rows if r]  # id_prop files have no header: ids in column 0
    raise FileNotFoundError(f"no {split}.csv or id_prop_{split}_all.csv in {root}")


def read_cif_pairs(root: str | Path, split: str) -> list[Pair]:
    """Pairs of one split of a CIF folder; pairs with a missing file are skipped with a warning."""
    root = Path(root)
    folder = root / "CIF" if (root / "CIF").is_dir() else root
    pairs, missing = [], []
    for pair_id in _split_ids(root, split):
        for u_name, r_name in ((f"{pair_id}_unrelaxed.cif", f"{pair_id}_relaxed.cif"),
                               (f"{pair_id}_U.cif", f"{pair_id}_R.cif")):
            u_path, r_path = folder / u_name, folder / r_name
            if u_path.exists() and r_path.exists():
                pairs.append(_pair_from_atoms(pair_id, read_structure(u_path), read_structure(r_path)))
                break
        else:
            missing.append(pair_id)
    if missing:
        warnings.warn(f"{root} ({split}): {len(missing)} pairs skipped, files missing: {missing[:10]}",
                      stacklevel=2)
    return pairs


def _extxyz_path(root: Path, stem: str) -> Path:
    for suffix in (".extxyz", ".extxyz.gz", ".xyz", ".xyz.gz"):
        if (root / f"{stem}{suffix}").exists():
            return root / f"{stem}{suffix}"
    raise FileNotFoundError(f"no {stem}.extxyz[.gz] in {root}")


def read_extxyz_pairs(root: str | Path, split: str) -> list[Pair]:
    """Pairs from ``<split>_unrelaxed.extxyz[.gz]`` and ``<split>_relaxed.extxyz[.gz]``."""
    root = Path(root)
    unrelaxed = read_structures(_extxyz_path(root, f"{split}_unrelaxed"))
    relaxed = read_structures(_extxyz_path(root, f"{split}_relaxed"))
    if len(unrelaxed) != len(relaxed):
        raise ValueError(f"{root} ({split}): {len(unrelaxed)} unrelaxed but {len(relaxed)} relaxed frames")
    pairs = []
    for k, (u, r) in enumerate(zip(unrelaxed, relaxed, strict=True)):
        pair_id = str(u.info.get("atoms_id", k))
        if str(r.info.get("atoms_id", pair_id)) != pair_id:
            raise ValueError(f"{root} ({split}): frame {k} ids differ: {pair_id} vs {r.info['atoms_id']}")
        pair = _pair_from_atoms(pair_id, u, r)
        pair.family, pair.protocol = str(u.info.get("family", "")), str(u.info.get("protocol", ""))
        pairs.append(pair)
    return pairs


def write_extxyz_pairs(pairs: list[Pair], root: str | Path, split: str, compress: bool = True) -> None:
    """Write pairs in the format :func:`read_extxyz_pairs` reads."""
    from ase.io import write

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".extxyz.gz" if compress else ".extxyz"
    for role, pos_key, cell_key in (("unrelaxed", "pos_unrelaxed", "cell_unrelaxed"),
                                    ("relaxed", "pos_relaxed", "cell_relaxed")):
        frames = [to_atoms(p.atomic_numbers, getattr(p, pos_key), getattr(p, cell_key), atoms_id=p.id)
                  for p in pairs]
        write(root / f"{split}_{role}{suffix}", frames, format="extxyz")


def read_ase_db_pairs(path: str | Path, split: str | None = None) -> list[Pair]:
    """Pairs from an ASE database (see the module docstring for the row layout)."""
    from ase.db import connect

    pairs = []
    selection = {"split": split} if split is not None else {}
    for row in connect(str(path)).select(**selection):
        z, positions, cell = to_arrays(row.toatoms())
        pairs.append(Pair(
            str(row.get("atoms_id", row.id)), z, positions, cell,
            np.asarray(row.data["pos_relaxed"], dtype=np.float64).reshape(-1, 3),
            np.asarray(row.data["cell_relaxed"], dtype=np.float64).reshape(3, 3),
        ))
    return pairs


def relaxed_rotation(pair: Pair) -> np.ndarray:
    """``(3, 3)`` rotation ``R`` (proper, det +1) by which the relaxed structure is turned relative to
    the unrelaxed one: the deformation ``F = C_u⁻¹ C_r`` (cells as rows, ``C_r = C_u F``) split as
    ``F = P R`` with ``P`` symmetric positive definite (polar decomposition, by SVD); row vectors
    ``r`` of the stretched structure become ``r R``.

    Raises:
        ValueError: the pair's cells are singular or of opposite handedness (no rotation relates
            them); the message names the pair.
    """
    try:
        deformation = np.linalg.solve(pair.cell_unrelaxed, pair.cell_relaxed)
    except np.linalg.LinAlgError:
        raise ValueError(f"pair {pair.id}: unrelaxed cell is singular") from None
    if not np.linalg.det(deformation) > 0:
        raise ValueError(f"pair {pair.id}: unrelaxed and relaxed cells are of opposite handedness "
                         f"(det C_u^-1 C_r = {np.linalg.det(deformation):.3g}): no rotation relates them")
    u, _, vt = np.linalg.svd(deformation)
    return u @ vt


def without_relaxed_rotation(pair: Pair) -> Pair:
    """The pair with its relaxed structure turned rigidly back by :func:`relaxed_rotation`: same
    fractional coordinates, relaxed cell ``C_u P`` (the rotation-free deformation of the unrelaxed
    cell).

    Why: a relaxed structure's orientation is not data. A CIF keeps none (each structure is read back
    with a along x and b in the xy plane, so a pair from CIFs is turned by up to tens of degrees
    wherever the cell's shape changed), and a stress-driven relaxation applies no torque. Left in, the
    rotation is label noise on Cartesian targets, and an error no model can remove from the
    coordinate MAE of input and prediction alike.
    """
    rotation = relaxed_rotation(pair)
    if np.abs(rotation - np.eye(3)).max() < 1e-12:  # unturned already (e.g. input = target): leave it bit for bit
        return pair
    return replace(pair, pos_relaxed=pair.pos_relaxed @ rotation.T, cell_relaxed=pair.cell_relaxed @ rotation.T)


#: What :func:`read_pairs` does with the relaxed structure's orientation: ``"remove"`` turns it
#: into the unrelaxed one's (:func:`without_relaxed_rotation`), ``"keep"`` leaves it as stored (the
#: original's training and metrics, and models trained here before 2026-12-06 22:00 UTC).
TARGET_ROTATION = ("remove", "keep")


def read_pairs(sources: str | Path | list, split: str, target_rotation: str = "remove") -> list[Pair]:
    """The pairs of ``split`` from one source or several (in order): a CIF folder, an extxyz folder
    or an ASE database (``.db``); relaxed structures in the unrelaxed ones' orientation unless
    ``target_rotation="keep"`` (:data:`TARGET_ROTATION`)."""
    if target_rotation not in TARGET_ROTATION:
        raise ValueError(f"target_rotation must be one of {TARGET_ROTATION}, got {target_rotation!r}")
    if isinstance(sources, (list, tuple)):
        return [pair for source in sources for pair in read_pairs(source, split, target_rotation)]
    source = Path(sources)
    if source.is_file():
        pairs = read_ase_db_pairs(source, split)
    else:
        extxyz = any(source.glob(f"{split}_unrelaxed.*"))
        pairs = _annotate(read_extxyz_pairs(source, split) if extxyz else read_cif_pairs(source, split),
                          source / "index.csv")
    return [without_relaxed_rotation(p) for p in pairs] if target_rotation == "remove" else pairs


def _annotate(pairs: list[Pair], index: Path) -> list[Pair]:
    """Fill in each pair's family and protocol from the dataset's ``index.csv`` where it has them
    (columns ``atoms_id``, ``protocol``, ``seed_id``, optionally ``family``)."""
    if not index.exists():
        return pairs
    with index.open(newline="") as fh:
        rows = {row["atoms_id"]: row for row in csv.DictReader(fh) if row.get("atoms_id")}
    for pair in pairs:
        row = rows.get(pair.id)
        if row is None:
            continue
        pair.protocol = pair.protocol or row.get("protocol") or ""
        pair.family = pair.family or row.get("family") or (family_of(row["seed_id"]) if row.get("seed_id") else "")
    return pairs
