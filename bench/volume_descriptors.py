"""How much of a substitution's volume change the elements' descriptors tell, per seed family.

A baseline outside the model: for every substitution pair (protocol ``subst_sym``) a handful of
descriptors of the unrelaxed input — its volume per atom, the mean cube of its atoms' covalent radii,
the mean, spread and range of their electronegativities, the mean ratio of each atom's nearest-
neighbour distance to the sum of the two covalent radii, the fractions of group 1-2 and group 16-17
atoms, the mean period (the table of :mod:`e3relax_fast.model.elements`) — and a ridge regression
(quadratic in the standardized descriptors, λ = 1) for ln(V_relaxed / V_unrelaxed). Scored as
MAE of ln V against Dummy's (ln V = 0), leaving each seed family out in turn (trained on every
other family's pairs, all splits; scored on all of the held-out family's).

    python -m bench.volume_descriptors --data data/chgnet_v4e --data data/chgnet_v5c
    python -m bench.volume_descriptors --all-protocols --data data/chgnet_v13sym --data data/chgnet_v4b \
        --data data/chgnet_v5b

``--all-protocols`` fits and scores every pair, not only the substitutions, and adds the coordinate
MAE and volume error of the input rescaled isotropically to the predicted volume, each / Dummy.

It asks whether chemistry the model has not seen is predictable from the elements alone: the
model's own volume on held-out families is in the model card's leave-one-family-out table.
"""

from __future__ import annotations

import argparse
import math

import numpy as np


def descriptors(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray) -> list[float]:
    """The descriptors of one structure (see the module docstring); Å."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    from e3relax_fast.model.elements import ELEMENTS

    radius, electronegativity, period, group = (np.array(column, dtype=float) for column in
                                                zip(*(ELEMENTS[z - 1] for z in numbers), strict=True))
    electronegativity = np.where(np.isnan(electronegativity), np.nanmean(electronegativity), electronegativity)
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
    i, j, d = neighbor_list("ijd", atoms, 8.0)
    nearest = np.full(len(numbers), np.inf)
    np.minimum.at(nearest, i, d / (radius[i] + radius[j]))
    nearest = nearest[np.isfinite(nearest)]
    return [math.log(abs(np.linalg.det(cell)) / len(numbers)), math.log(np.mean(radius ** 3)),
            electronegativity.mean(), electronegativity.std(), np.ptp(electronegativity),
            float(np.log(nearest).mean()) if len(nearest) else 0.0, float(np.mean(group <= 2)),
            float(np.mean((group >= 16) & (group <= 17))), period.mean()]


def log_volume_change(pair) -> float:
    """``ln(V_relaxed / V_unrelaxed)`` of a pair."""
    return math.log(abs(np.linalg.det(pair.cell_relaxed) / np.linalg.det(pair.cell_unrelaxed)))


def _quadratic(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    z = (x - mean) / scale
    pairs = [z[:, a:a + 1] * z[:, b:b + 1] for a in range(z.shape[1]) for b in range(a, z.shape[1])]
    return np.hstack([np.ones((len(z), 1)), z, *pairs])


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, ridge: float = 1.0) -> np.ndarray:
    """Ridge regression, quadratic in the descriptors standardized on the training rows."""
    mean, scale = x_train.mean(axis=0), x_train.std(axis=0) + 1e-9
    a = _quadratic(x_train, mean, scale)
    w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ y_train)
    return _quadratic(x_test, mean, scale) @ w


def main(argv=None) -> None:
    from e3relax_fast.io import read_pairs

    ap = argparse.ArgumentParser(prog="python -m bench.volume_descriptors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True, help="pair folder (repeatable)")
    ap.add_argument("--all-protocols", action="store_true", help="every pair, not only the substitutions; "
                    "adds the rescale's coordinate MAE and volume error / Dummy")
    args = ap.parse_args(argv)
    pairs = [pair for split in ("train", "val", "test") for pair in read_pairs(args.data, split)
             if args.all_protocols or pair.protocol == "subst_sym"]
    x = np.array([descriptors(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in pairs])
    # An element without an electronegativity in the table (a noble gas alone) leaves a NaN: the column's mean.
    x = np.where(np.isfinite(x), x, np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0))
    y = np.array([log_volume_change(p) for p in pairs])
    families = np.array([p.family for p in pairs])
    what = "pairs" if args.all_protocols else "substitutions"
    extra = " rescale: coordinates / Dummy | rescale: volume / Dummy |" if args.all_protocols else ""
    print(f"| held-out family | {what} | MAE of ln V: descriptors / Dummy | correlation |{extra}")
    print("|---|---|---|---|" + ("---|---|" if args.all_protocols else ""))
    for family in sorted(set(families)):
        held = families == family
        predicted = fit_predict(x[~held], y[~held], x[held])
        ratio = np.abs(predicted - y[held]).mean() / np.abs(y[held]).mean()
        row = f"| {family} | {held.sum()} | {ratio:.3f} | {np.corrcoef(predicted, y[held])[0, 1]:.2f} |"
        if args.all_protocols:
            coords, volume = rescale_ratios([p for p, h in zip(pairs, held, strict=True) if h], predicted)
            row += f" {coords:.3f} | {volume:.3f} |"
        print(row)


def rescale_ratios(pairs: list, log_volume_change: np.ndarray) -> tuple[float, float]:
    """Coordinate MAE and volume error of each pair's input rescaled isotropically by
    ``exp(log_volume_change / 3)``, each mean / Dummy's mean."""
    import torch

    from e3relax_fast.training.evaluate import inputs_and_targets
    from e3relax_fast.training.metrics import structure_metrics

    batch, targets, cells = inputs_and_targets(pairs)
    scale = torch.from_numpy(np.exp(np.asarray(log_volume_change) / 3))
    rescaled = structure_metrics(batch.positions * scale[batch.graph_index()].unsqueeze(-1),
                                 batch.cells * scale.reshape(-1, 1, 1), targets, cells, batch.ptr)
    dummy = structure_metrics(batch.positions, batch.cells, targets, cells, batch.ptr)
    return tuple(float(rescaled[k].mean() / dummy[k].mean()) for k in ("coord_mae", "volume_error"))


if __name__ == "__main__":
    main()
