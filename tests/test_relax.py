"""relax_batch: types and order, batching invariance, error policies, and load_pretrained."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from e3relax_fast.io.structures import InvalidStructureError, to_arrays
from e3relax_fast.model import E3Relax, E3RelaxOutput, pretrained
from e3relax_fast.model.pretrained import PretrainedModelNotFoundError, infer_config, load_pretrained
from e3relax_fast.relax import RelaxResult, RelaxWarning, plan_batches, relax_batch

pmg = pytest.importorskip("pymatgen.core")
ase_build = pytest.importorskip("ase.build")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> E3Relax:
    torch.manual_seed(0)
    return E3Relax(hidden_channels=8, num_layers=2)


def structures() -> list:
    """pymatgen, ASE and triple inputs of different sizes, one triclinic."""
    nacl = pmg.Structure(pmg.Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    nacl.add_site_property("magmom", [1.0, -1.0])
    si = ase_build.bulk("Si", "diamond", a=5.43, cubic=True)
    si.info["id"] = "si"
    water = (
        torch.tensor([8, 1, 1]),
        torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=torch.float64),
        torch.eye(3, dtype=torch.float64) * 7.0,
    )
    tri = pmg.Structure(
        pmg.Lattice.from_parameters(3.1, 3.5, 4.2, 75, 82, 68),
        ["Mg", "O", "O"],
        [[0, 0, 0], [0.5, 0.4, 0.6], [0.1, 0.8, 0.3]],
    )
    return [nacl, si, water, tri]


def geometry(structure) -> tuple[np.ndarray, np.ndarray]:
    _, positions, cell = to_arrays(structure)
    return positions, cell


BAD = ([1, 1], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.05]], np.eye(3) * 6.0)


def test_same_types_order_and_metadata(model):
    inputs = structures()
    out = relax_batch(inputs, model)
    assert isinstance(out, RelaxResult) and isinstance(out, list) and out.errors == {}
    assert [type(o) for o in out] == [type(i) for i in inputs]
    assert [str(s.specie) for s in out[0]] == ["Na", "Cl"]
    assert out[0].site_properties == {"magmom": [1.0, -1.0]}
    assert out[1].get_chemical_symbols() == inputs[1].get_chemical_symbols() and out[1].info == {"id": "si"}
    assert out[2][0].tolist() == [8, 1, 1]
    assert [str(s.specie) for s in out[3]] == ["Mg", "O", "O"]
    for before, after in zip(inputs, out, strict=True):
        (p0, _), (p1, c1) = geometry(before), geometry(after)
        assert p1.shape == p0.shape and np.isfinite(p1).all() and np.isfinite(c1).all()
        assert not np.array_equal(p1, p0)  # the model moved something


def test_single_structure_and_generator_inputs(model):
    single = relax_batch(structures()[0], model)
    assert isinstance(single, list) and len(single) == 1
    triple = relax_batch(structures()[2], model)
    assert len(triple) == 1 and isinstance(triple[0], tuple)
    assert len(relax_batch((s for s in structures()), model)) == 4


def test_batched_equals_one_at_a_time_in_float64(model):
    inputs = structures()
    batched = relax_batch(inputs, model, dtype=torch.float64)
    for structure, together in zip(inputs, batched, strict=True):
        alone = relax_batch([structure], model, dtype=torch.float64)[0]
        for a, b in zip(geometry(together), geometry(alone), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    # Other bounds give the same answers too.
    for kwargs in ({"batch_size": 3}, {"max_atoms": 10}, {"batch_size": 2, "max_atoms": 5}):
        again = relax_batch(inputs, model, dtype=torch.float64, **kwargs)
        for a, b in zip(again, batched, strict=True):
            np.testing.assert_allclose(geometry(a)[0], geometry(b)[0], rtol=0, atol=1e-10)


def test_callers_model_is_not_modified(model):
    relax_batch(structures()[:1], model, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float32
    model.train()
    relax_batch(structures()[:1], model)
    assert model.training
    model.eval()


def relax_with_failures(model, on_error):
    inputs = structures()
    mixed = [inputs[0], BAD, inputs[1], "not a structure", inputs[2]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = relax_batch(mixed, model, on_error=on_error, dtype=torch.float64)
    relax_warnings = [w for w in caught if issubclass(w.category, RelaxWarning)]
    assert len(relax_warnings) == 1
    message = str(relax_warnings[0].message)
    assert "2 of 5" in message and "[1] atoms 0 and 1 overlap" in message and "[3] unsupported" in message
    assert sorted(out.errors) == [1, 3]
    assert "overlap" in out.errors[1] and "unsupported structure type" in out.errors[3]
    # The good structures come back exactly as when relaxed without the bad ones.
    clean = relax_batch([inputs[0], inputs[1], inputs[2]], model, dtype=torch.float64)
    for k, c in zip((0, 2, 4), clean, strict=True):
        np.testing.assert_allclose(geometry(out[k])[0], geometry(c)[0], rtol=0, atol=1e-10)
    return mixed, out


def test_on_error_skip(model):
    _, out = relax_with_failures(model, "skip")
    assert len(out) == 5 and out[1] is None and out[3] is None


def test_on_error_return_input(model):
    mixed, out = relax_with_failures(model, "return_input")
    assert out[1] is mixed[1] and out[3] is mixed[3]


def test_on_error_raise_names_the_first_bad_structure(model):
    with pytest.raises(InvalidStructureError, match=r"^structure 1: atoms 0 and 1 overlap") as info:
        relax_batch([structures()[0], BAD, "not a structure"], model)
    assert info.value.index == 1
    with pytest.raises(ValueError, match="on_error"):
        relax_batch(structures(), model, on_error="ignore")


def test_elements_outside_the_models_table():
    torch.manual_seed(0)
    small = E3Relax(hidden_channels=8, num_layers=1, num_elements=20)
    iron = ([26], [[0.0, 0.0, 0.0]], np.eye(3) * 2.9)
    with pytest.warns(RelaxWarning):
        out = relax_batch([structures()[2], iron], small, on_error="skip")
    assert out[1] is None and "Z=26" in out.errors[1] and "num_elements=20" in out.errors[1]


class NaNForSecondStructure(nn.Module):
    """Wraps a model and poisons the prediction of the second structure of every batch."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        out = self.inner(batch)
        positions = out.positions[-1].clone()
        lo, hi = int(batch.ptr[1]), int(batch.ptr[2])
        positions[lo:hi] = float("nan")
        return E3RelaxOutput(out.positions[:-1] + [positions], out.cells)


def test_non_finite_prediction_is_that_structures_error(model):
    inputs = structures()
    with pytest.warns(RelaxWarning, match="NaN or inf"):
        out = relax_batch(inputs, NaNForSecondStructure(model), on_error="skip")
    assert list(out.errors) == [1] and out[1] is None
    assert all(o is not None for k, o in enumerate(out) if k != 1)
    with pytest.raises(InvalidStructureError, match="structure 1: the model's prediction contains NaN"):
        relax_batch(inputs, NaNForSecondStructure(model))


def test_model_none_without_pretrained_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "_bundled_path", lambda name: tmp_path / f"{name}.pt")
    with pytest.raises(
        PretrainedModelNotFoundError, match="no pretrained E3Relax model 'default' ships"
    ) as info:
        relax_batch(structures())
    assert isinstance(info.value, FileNotFoundError) and "model=" in str(info.value)


# --- batching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "max_atoms"), [(None, 10), (3, None), (2, 7), (None, 1), (100, 1000)])
def test_plan_batches_covers_every_structure_once_in_order(batch_size, max_atoms):
    sizes = np.random.default_rng(0).integers(1, 12, 50).tolist()
    batches = plan_batches(sizes, batch_size, max_atoms)
    assert [k for b in batches for k in b] == list(range(len(sizes)))
    for b in batches:
        assert batch_size is None or len(b) <= batch_size
        assert max_atoms is None or len(b) == 1 or sum(sizes[k] for k in b) <= max_atoms
    with pytest.raises(ValueError, match="max_atoms"):
        plan_batches(sizes, None, 0)


class Recorder(nn.Module):
    """Wraps a model and records the atom count of every batch it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.atoms: list[list[int]] = []

    def forward(self, batch):
        self.atoms.append((batch.ptr[1:] - batch.ptr[:-1]).tolist())
        return self.inner(batch)


def test_atom_budget_batching_runs_every_structure_exactly_once(model):
    inputs = structures() * 3  # 2, 8, 3, 3 atoms, repeated
    recorder = Recorder(model)
    out = relax_batch(inputs, recorder, max_atoms=9, frame="input")  # the inputs' own sizes
    assert [n for batch in recorder.atoms for n in batch] == [len(to_arrays(s)[0]) for s in inputs]
    assert all(sum(batch) <= 9 for batch in recorder.atoms)
    assert len(out) == len(inputs) and out.errors == {}


# --- load_pretrained ---------------------------------------------------------------------------------


def test_load_original_format_checkpoint(tmp_path):
    torch.manual_seed(1)
    original = E3Relax(hidden_channels=8, num_layers=2, paper_compat=True)
    state = {f"module.{k}": v for k, v in original.state_dict().items() if k != "radial_basis.rbf.offset"}
    torch.save(state, tmp_path / "ema.pt")

    loaded = load_pretrained(tmp_path / "ema.pt")
    assert loaded.paper_compat and not loaded.training
    assert (loaded.hidden_channels, loaded.num_layers, loaded.num_rbf, loaded.num_elements) == (
        8,
        2,
        128,
        118,
    )
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    inputs = structures()
    for a, b in zip(relax_batch(inputs, original), relax_batch(inputs, loaded), strict=True):
        np.testing.assert_array_equal(geometry(a)[0], geometry(b)[0])


def test_load_package_format_checkpoint(tmp_path):
    torch.manual_seed(2)
    ours = E3Relax(hidden_channels=8, num_layers=3, num_elements=90)
    torch.save({"state_dict": ours.state_dict(), "config": ours.config}, tmp_path / "ours.pt")
    loaded = load_pretrained(str(tmp_path / "ours.pt"))
    assert not loaded.paper_compat and loaded.config == ours.config
    torch.save({"state_dict": ours.state_dict(), "paper_compat": True}, tmp_path / "paper.pt")
    assert load_pretrained(tmp_path / "paper.pt").paper_compat


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(PretrainedModelNotFoundError, match="no checkpoint file"):
        load_pretrained(tmp_path / "missing.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an E3Relax checkpoint"):
        load_pretrained(tmp_path / "other.pt")
    torch.save({"atom_emb.embeddings.weight": torch.zeros(118, 8)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="missing 'message_passing_layers.0.edge_proj.weight'"):
        load_pretrained(tmp_path / "partial.pt")


def test_infer_config_at_paper_size_shapes():
    h, r = 512, 128
    state = {"atom_emb.embeddings.weight": torch.empty(118, h)}
    state.update({f"message_passing_layers.{n}.edge_proj.weight": torch.empty(3 * h, r) for n in range(4)})
    assert infer_config(state) == {
        "hidden_channels": 512,
        "num_layers": 4,
        "num_rbf": 128,
        "num_elements": 118,
        "cell_transport": False,
        "element_features": False,
        "cell_strain": False,
        "cell_mix": False,
        "edge_cutoff": None,
        "volume_prior": False,
        "cell_virial": False,
        "bond_radii": False,
        "bond_forces": False,
    }
    state["cell_transport_marker"] = torch.ones(())
    assert infer_config(state)["cell_transport"] is True
    state["element_features.proj.weight"] = torch.zeros(h, 51)
    assert infer_config(state)["element_features"] is True
    state["cell_strain_layers.0.0.weight"] = torch.zeros(1, h)
    assert infer_config(state)["cell_strain"] is True
    state["cell_mix_layers.0.0.weight"] = torch.zeros(3, h + 6)
    assert infer_config(state)["cell_mix"] is True
    state["volume_prior.out.weight"] = torch.zeros(1, h)
    assert infer_config(state)["volume_prior"] is True
    state["cell_virial_layers.0.out.weight"] = torch.zeros(1, 32)
    assert infer_config(state)["cell_virial"] is True
    state["bond_radii_layers.0.out.weight"] = torch.zeros(1, 32)
    assert infer_config(state)["bond_radii"] is True
    state["bond_radii_layers.0.force.weight"] = torch.zeros(1, 32)
    assert infer_config(state)["bond_forces"] is True


def test_inference_precisions():
    shipped = load_pretrained("default")
    inputs = structures()
    f32 = relax_batch(inputs, shipped, dtype=torch.float32)
    bf16 = relax_batch(inputs, shipped, dtype=torch.float32, precision="bf16")
    assert not torch.is_autocast_enabled("cpu")
    dev = max(float(np.abs(geometry(a)[k] - geometry(b)[k]).max())
              for a, b in zip(f32, bf16, strict=True) for k in (0, 1))
    # bf16 matmuls really ran (results differ) and stay close (bench_precision measures ~0.03 Å).
    assert 1e-5 < dev < 0.2
    with pytest.raises(ValueError, match="needs a CUDA device"):
        relax_batch(inputs, shipped, precision="tf32")
    with pytest.raises(ValueError, match="needs a float32 model"):
        relax_batch(inputs, shipped, dtype=torch.float64, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        relax_batch(inputs, shipped, precision="fp8")
