"""Uncertainty per structure (e3relax_fast/uncertainty.py): the spread of the predictions over
equivalent descriptions of a crystal.

Stub models with a known answer check the bookkeeping and the units (a description-independent
prediction has zero spread; a known description-dependent one has its analytic spread, in Å); the
shipped model checks determinism, invariance (the same crystal written another way gets the same
value) and that the value ranks the coordinate error on a fixed slice of the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("moyopy")
ase = pytest.importorskip("ase")
from ase.build import bulk, make_supercell  # noqa: E402

from e3relax_fast import load_pretrained  # noqa: E402
from e3relax_fast.batch import Batch  # noqa: E402
from e3relax_fast.frame import canonical_frame  # noqa: E402
from e3relax_fast.io import read_pairs  # noqa: E402
from e3relax_fast.model import E3RelaxOutput, predict_batches  # noqa: E402
from e3relax_fast.uncertainty import BASES, description, equivalent_predictions, frame_spread  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Stub(nn.Module):
    """A parameter-free model: ``positions @ F``, ``cell @ F`` (a fixed Cartesian deformation, the same
    whatever the description) and, with ``kick``, the first atom of each crystal moved by ``kick`` Å
    along its crystal's first lattice vector (which depends on the description)."""

    def __init__(self, deformation=None, kick: float = 0.0):
        super().__init__()
        self.deformation = torch.eye(3, dtype=torch.float64) if deformation is None else torch.as_tensor(deformation)
        self.kick = kick

    def forward(self, batch: Batch) -> E3RelaxOutput:
        positions = batch.positions @ self.deformation
        first = batch.cells[:, 0] / torch.linalg.vector_norm(batch.cells[:, 0], dim=-1, keepdim=True)
        positions[batch.ptr[:-1]] += self.kick * first
        return E3RelaxOutput([positions], [batch.cells @ self.deformation])


def frame_of(atoms):
    return canonical_frame(atoms.numbers, atoms.positions, atoms.cell.array)


def split_crystal(index: int):
    """The unrelaxed input of test pair ``index`` of data/chgnet_v3."""
    p = read_pairs(ROOT / "data" / "chgnet_v3", "test")[index]
    return ase.Atoms(numbers=p.atomic_numbers, positions=p.pos_unrelaxed, cell=p.cell_unrelaxed, pbc=True)


def crystals() -> dict:
    """Low and high symmetry, one to several atoms per primitive cell."""
    return {"GaAs zincblende": bulk("GaAs", "zincblende", a=5.65),
            "ZnO wurtzite (polar)": bulk("ZnO", "wurtzite", a=3.25, c=5.2),
            "Cu fcc": bulk("Cu", "fcc", a=3.61),
            "test pair 0": split_crystal(0), "test pair 5": split_crystal(5)}


def rewritings(atoms, rng) -> dict:
    """The same crystal written in other ways (as in tests/test_frame.py)."""
    basis = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 1]])
    shifted = atoms.copy()
    shifted.positions += rng.integers(-2, 3, (len(atoms), 3)) @ atoms.cell.array
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ (q if np.linalg.det(q) > 0 else -q).T, scale_atoms=True)
    translated = make_supercell(atoms, np.diag([2, 1, 1]))
    translated.positions += rng.normal(0.0, 2.0, 3)
    return {"basis": make_supercell(atoms, basis), "lattice shifts": shifted, "rotation": rotated,
            "2x1x1 + translation": translated}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_pretrained("default")


@pytest.mark.parametrize("symmetrize", [False, True])
def test_a_description_independent_prediction_has_zero_spread(symmetrize):
    """Every description maps back onto the same prediction: bases, images and cells undone exactly."""
    frames = [frame_of(a) for a in crystals().values()]
    deformation = np.eye(3) + np.array([[0.03, 0.01, 0.0], [0.0, -0.02, 0.01], [0.02, 0.0, 0.01]])
    for stub in (Stub(), Stub(deformation)):
        spread = frame_spread(stub, frames, descriptions=len(BASES), symmetrize=symmetrize)
        assert spread.shape == (len(frames),) and spread.dtype == np.float64
        np.testing.assert_allclose(spread, 0.0, atol=1e-12)


def test_spread_is_the_rms_deviation_in_angstrom():
    """CsCl (primitive cubic, two atoms): the stub moves atom 0 by δ along the first lattice vector,
    which is a, b or c in the three descriptions; in the centroid gauge the atoms deviate from their
    mean by ±(d − d̄)/2 with |d − d̄|² = 2δ²/3, so the RMS spread is δ/√6."""
    cscl = ase.Atoms("CsCl", scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5]], cell=np.eye(3) * 4.1, pbc=True)
    frames = [frame_of(cscl)]
    for kick in (0.1, 0.2):
        spread = frame_spread(Stub(kick=kick), frames, descriptions=2, symmetrize=False)
        np.testing.assert_allclose(spread, [kick / np.sqrt(6)], rtol=1e-12)
    # The projection onto the cubic group removes a displacement of one atom: nothing left to spread.
    assert frame_spread(Stub(kick=0.1), frames, descriptions=2)[0] < 1e-12
    assert np.isnan(frame_spread(Stub(kick=np.nan), frames)).all()  # a non-finite prediction: NaN


def test_descriptions():
    matrices = {m.tobytes() for m in BASES}
    assert len(matrices) == 23 and all(round(np.linalg.det(m)) == 1 for m in BASES)
    assert (description(1)[0] @ np.arange(9).reshape(3, 3))[0].tolist() == [3, 4, 5]  # (a, b, c) -> (b, c, a)
    shifts = np.array([description(k)[1] for k in range(1, 24)])
    assert np.all((shifts > 0) & (shifts < 1)) and np.abs(shifts - 0.5).min() > 1e-3  # no special positions
    with pytest.raises(ValueError):
        description(24)
    with pytest.raises(ValueError):
        frame_spread(Stub(), [frame_of(bulk("Cu"))], descriptions=0)


def test_deterministic_reusable_and_independent_of_the_batch(model):
    frames = [frame_of(a) for a in crystals().values()]
    spread = frame_spread(model, frames)
    np.testing.assert_array_equal(spread, frame_spread(model, frames))
    # The model is not description-invariant (v6.1 and v6 move the first crystal by 6e-4 and 5e-4 Å, v5 5e-5; rounding
    # alone would give ~1e-15)...
    assert np.all(spread[[0, 1, 3, 4]] > 1e-6)
    assert spread[2] < 1e-12  # ...but a one-atom cell's position is the gauge itself
    alone = [frame_spread(model, [frame])[0] for frame in frames]
    np.testing.assert_allclose(alone, spread, rtol=1e-4, atol=1e-7)
    # The canonical cells' own predictions (what relax_batch has already computed) are reused as is.
    batch = Batch.from_arrays([(f.numbers, f.positions, f.cell) for f in frames])
    own = [s for prediction in predict_batches(model, [batch]) for s in prediction.per_structure()]
    np.testing.assert_allclose(frame_spread(model, frames, predictions=own), spread, rtol=1e-6, atol=1e-9)
    positions, cells = equivalent_predictions(model, frames[:1])[0]
    assert positions.shape == (3, len(frames[0].numbers), 3) and cells.shape == (3, 3, 3)


def test_the_same_crystal_written_another_way_gets_the_same_uncertainty(model):
    rng = np.random.default_rng(0)
    for name, atoms in crystals().items():
        others = rewritings(atoms, rng)
        spread = frame_spread(model, [frame_of(a) for a in [atoms, *others.values()]])
        np.testing.assert_allclose(spread[1:], spread[0], rtol=1e-3, atol=1e-6, err_msg=f"{name}: {list(others)}")


def test_the_spread_ranks_the_coordinate_error(model):
    """On the first 120 test pairs of chgnet_v3 the spread ranks the per-structure coordinate error of
    the prediction relax_batch makes (Spearman ρ 0.389 with the shipped model v6.1, 0.375 with v6, 0.496 with
    v5; on the first 40, as this test read before v6: v6.1 0.435, v6 0.317, v5 0.50, v4 0.50, v3 0.60, v2 0.54,
    v1 0.73). An
    unrelated signal would give about 0, ± 0.092 at one standard deviation on 120 pairs, so the bound,
    0.23, is 2.5 of them above chance."""
    from e3relax_fast.training.evaluate import evaluate

    pairs = read_pairs(ROOT / "data" / "chgnet_v3", "test")[:120]
    error = evaluate(model, pairs, match=False)["per_structure"]["model"]["coord_mae"]
    spread = frame_spread(model, [canonical_frame(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed)
                                  for p in pairs])

    def ranks(x):
        return np.argsort(np.argsort(x))

    rho = np.corrcoef(ranks(spread), ranks(error))[0, 1]
    assert rho > 0.23, rho


def test_relax_batch_returns_one_uncertainty_per_input():
    """relax_batch(return_uncertainty=True): the spread of each relaxed crystal (the same however it is
    written), None where the structure failed or is a slab (no canonical frame)."""
    from ase.build import bulk, fcc111, make_supercell

    from e3relax_fast import load_pretrained, relax_batch

    model = load_pretrained("default")
    si = bulk("Si")
    slab = fcc111("Cu", (2, 2, 3), vacuum=5.0)
    slab.pbc = (True, True, False)
    overlap = ([14, 14], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.01]], np.eye(3) * 5.0)
    out = relax_batch([si, overlap, slab, make_supercell(si, np.diag([2, 1, 1]))], model, on_error="skip",
                      return_uncertainty=True)
    assert out.uncertainty[0] > 0 and out.uncertainty[1] is None and out.uncertainty[2] is None
    assert out.uncertainty[3] == pytest.approx(out.uncertainty[0], abs=1e-6)  # float32 model, other batches
    assert relax_batch([si], model).uncertainty is None  # not asked, not paid for
