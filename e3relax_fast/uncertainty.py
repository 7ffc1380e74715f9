"""Uncertainty per structure: how much the prediction depends on how the crystal is written.

The model is not invariant to the description of a crystal (its three lattice nodes have their own
weights, and the atom–lattice geometry is measured from the atoms' centroid, which depends on the
periodic image chosen for each atom); :mod:`e3relax_fast.frame` removes that dependence by always
predicting in one canonical description. The predictions the model would have made in other,
equally valid descriptions are therefore a free-of-labels probe of how sure it is: where they agree
the model is on familiar ground, where they scatter its answer is arbitrary to that extent.

:func:`frame_spread` runs the model on ``K`` other descriptions of each canonical cell, maps every
prediction back into the canonical description and returns the RMS deviation of the atom positions
between them, in Å. Description ``k`` (1..K) takes:

* the lattice vectors in another order and sign, ``M_k @ cell`` with ``M_k`` one of the 23 other
  right-handed signed permutations (the two cyclic ones, (a, b, c) -> (b, c, a) -> (c, a, b),
  first): the same lattice, the same Cartesian atoms, but each lattice node gets another vector;
* every atom re-imaged into the cell shifted by ``-s_k`` (fractions wrapped into ``[-s_k, 1 - s_k)``):
  the same crystal with another centroid. ``s_k`` follows a quasi-random sequence, away from the
  special positions (0, 1/2, 1/4, ...) where symmetric crystals put atoms, so that no atom sits on
  the wrap boundary (where rounding noise would choose its image).

A one-atom cell has zero spread: its only position is the translation, which the fractional-centroid
gauge fixes.

On the test split of chgnet_v1..v3 the spread over K = 2 ranks the coordinate error with Spearman
ρ ≈ 0.52 for the shipped model (v3; K = 4: 0.53), 0.44 for v2 and 0.70 for v1 (trained without
already-relaxed twins, it moves the atoms more; K = 4: 0.73). Signals of the one forward pass (the
size of the last layers' updates: ρ ≈ 0.50, 0.47 and 0.69) cost nothing, but they depend on how a
model was trained: with an early checkpoint of a model trained in the canonical frame, which barely
moves the atoms, they fall to ρ ≈ 0.13 where the spread keeps 0.36. ``python -m
bench.bench_uncertainty`` prints the table of candidates (coordinate and volume error) and the cost.

Units: Å; cells ``(3, 3)`` with the lattice vectors as rows; fractional coordinates are rows ``x``
with Cartesian ``r = x @ cell``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .batch import Batch, plan_batches
from .frame import CanonicalFrame
from .model import predict_batches

#: Other descriptions per crystal by default: the two cyclic permutations of the lattice vectors, each
#: with its re-imaging (two extra forward passes).
DESCRIPTIONS = 2
#: Atom budget per batch of the extra forward passes (relax_batch's CPU default).
MAX_ATOMS = 4096


def _signed_permutations() -> np.ndarray:
    """``(23, 3, 3)`` int64: the right-handed signed permutation matrices other than the identity,
    the two cyclic permutations first (they change the lattice nodes' order but no vector's sign)."""
    cyclic = [np.roll(np.eye(3, dtype=np.int64), k, axis=1) for k in (1, 2)]  # rows (b, c, a), (c, a, b)
    others = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3), dtype=np.int64)
            matrix[range(3), order] = signs
            if round(np.linalg.det(matrix)) == 1 and not any((matrix == m).all() for m in [np.eye(3), *cyclic]):
                others.append(matrix)
    return np.array(cyclic + others)


BASES = _signed_permutations()
#: The additive recurrence of the generalised golden ratio in 3-D (Roberts' R3 sequence): shifts that
#: stay well spread for every K and avoid rational special positions.
_R3 = 1.0 / 1.2207440846057596 ** np.arange(1, 4)


def description(k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M (3, 3) int64, s (3,))``: description ``k`` (1..23) takes the lattice vectors ``M @ cell``
    and each atom's image in ``[-s, 1 - s)`` (fractions of the canonical cell)."""
    if not 1 <= k <= len(BASES):
        raise ValueError(f"description index must be in 1..{len(BASES)}, got {k}")
    return BASES[k - 1], (0.5 + k * _R3) % 1.0


def equivalent_predictions(
    model: nn.Module,
    frames: Sequence[CanonicalFrame],
    device: str | torch.device | None = None,
    descriptions: int | Sequence[tuple] = DESCRIPTIONS,
    predictions: Sequence[tuple] | None = None,
    symmetrize: bool = True,
    max_atoms: int = MAX_ATOMS,
    **predict_options,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The model's predictions for each crystal in ``K + 1`` descriptions, all mapped back into the
    canonical one.

    Args:
        model: an :class:`~e3relax_fast.model.E3Relax` (or any module with its interface).
        frames: the crystals' canonical frames (:func:`~e3relax_fast.frame.canonical_frame`).
        device: where the model runs (``None``: the model's device).
        descriptions: ``K``, the other descriptions per crystal: descriptions ``1..K`` of
            :func:`description` (``K`` in 1..23), or ``K`` pairs ``(M, s)``: lattice vectors ``M @ cell``
            (``M`` a right-handed unimodular integer matrix) and atoms re-imaged into ``[-s, 1 - s)``
            (``s=None``: images kept).
        predictions: the model's predictions ``(positions (m, 3), cell (3, 3))`` Å for the canonical
            cells themselves, as :func:`~e3relax_fast.model.predict_batches` gives them, reused as
            description 0; ``None``: computed here (one more forward pass).
        symmetrize: project every prediction onto the crystal's space group first
            (:meth:`CanonicalFrame.symmetrize`), as ``relax_batch(symmetry="keep")`` does with its
            answer: the spread is then that of the answers a user would get.
        max_atoms: atom budget per batch of the forward passes.
        predict_options: passed to :func:`~e3relax_fast.model.predict_batches` (``precision``,
            ``graph_backend``, ``radius``, ``max_neighbors``): the same graph and arithmetic as the
            prediction itself.

    Returns:
        Per crystal ``(positions (K + 1, m, 3), cells (K + 1, 3, 3))`` float64, Å, canonical
        description, canonical atom order; index 0 is the canonical description's own prediction.
        Positions are in the fractional-centroid gauge (:meth:`CanonicalFrame.align`), which fixes the
        translation no model can know.
    """
    views = [description(k) for k in range(1, descriptions + 1)] if isinstance(descriptions, int) \
        else list(descriptions)
    if not views:
        raise ValueError("descriptions: at least one other description is needed")
    views = ([] if predictions is not None else [(np.eye(3, dtype=np.int64), None)]) + views
    inputs, images = [], []
    for frame in frames:
        for basis, shift in views:
            image = np.zeros((len(frame.numbers), 3), dtype=np.int64) if shift is None \
                else -np.floor(frame.frac + shift).astype(np.int64)
            inputs.append((frame.numbers, frame.positions + image @ frame.cell, basis @ frame.cell))
            images.append(image)
    chunks = plan_batches([len(z) for z, _, _ in inputs], max_atoms=max_atoms)
    batches = (Batch.from_arrays([inputs[i] for i in chunk], dtype=torch.float64) for chunk in chunks)
    predicted = []
    for prediction in predict_batches(model, batches, device, **predict_options):
        for positions, cell in prediction.per_structure():
            # Back into the canonical description: the cell rows recombined (M^-1), each atom moved
            # back by the lattice vectors it was re-imaged by, now those of the predicted cell.
            basis, _ = views[len(predicted) % len(views)]
            canonical_cell = np.linalg.solve(np.asarray(basis, dtype=np.float64), cell)
            predicted.append((positions - images[len(predicted)] @ canonical_cell, canonical_cell))
    out = []
    for g, frame in enumerate(frames):
        own = [] if predictions is None else [tuple(np.asarray(a, dtype=np.float64) for a in predictions[g])]
        positions, cells = [], []
        for pos, cell in own + predicted[g * len(views):(g + 1) * len(views)]:
            if symmetrize:
                pos, cell = frame.symmetrize(pos, cell)
            positions.append(frame.align(pos, cell))
            cells.append(cell)
        out.append((np.array(positions), np.array(cells)))
    return out


def position_spread(positions: np.ndarray) -> float:
    """RMS deviation (Å) of ``positions (D, m, 3)`` from their mean over the ``D`` descriptions:
    ``sqrt(mean over descriptions and atoms of |r - mean r|^2)``."""
    return float(np.sqrt(np.mean(np.sum((positions - positions.mean(axis=0)) ** 2, axis=-1))))


def frame_spread(
    model: nn.Module,
    frames: Sequence[CanonicalFrame],
    device: str | torch.device | None = None,
    descriptions: int | Sequence[tuple] = DESCRIPTIONS,
    predictions: Sequence[tuple] | None = None,
    symmetrize: bool = True,
    max_atoms: int = MAX_ATOMS,
    **predict_options,
) -> np.ndarray:
    """Uncertainty of each crystal's prediction: ``(G,)`` float64, Å.

    The RMS deviation of the predicted atom positions over ``K + 1`` equivalent
    descriptions of the crystal (the canonical one and ``K`` others: lattice vectors permuted, atoms
    re-imaged; see the module docstring), each mapped back into the canonical description and put in
    the fractional-centroid gauge. It measures how much the answer depends on how the crystal is
    written, which is larger where the model is wrong (Spearman ρ 0.44–0.70 with the coordinate error
    on the test split, depending on the model; see the module docstring). It ranks; it is not a
    calibrated error (median spread / coordinate MAE 0.36 with the shipped model, widely spread). It
    does **not** flag chemistry the model has not seen: there the shipped model barely moves the
    atoms, in every description alike, so the spread is small (median 0.0055 Å on the never-seen
    AFLOW/pyxtal test pairs against 0.041 Å on the in-family ones, AUROC 0.17: ``python -m
    bench.bench_uncertainty --never-seen data/chgnet_v5b``). The same crystal written any other way
    has the same canonical frame, hence the same value. NaN where a prediction is not finite.

    Costs ``K`` forward passes of the model (``K + 1`` without ``predictions``): with the default
    K = 2 and the predictions reused, about 1.4 times the time of the ``relax_batch`` call itself
    (CPU, test split). Arguments as in :func:`equivalent_predictions`.
    """
    return np.array([position_spread(positions) for positions, _ in equivalent_predictions(
        model, frames, device, descriptions, predictions, symmetrize, max_atoms, **predict_options)])
