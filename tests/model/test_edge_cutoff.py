"""The optional atom–atom basis cutoff (E3Relax(edge_cutoff=...)): the same Gaussians over a shorter
range for the atom–atom edges; the atom–lattice distances keep the 30 Å basis."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import assert_close, backend_params, golden_batch, golden_model_instance, model_trains

from e3relax_fast import E3Relax, load_pretrained
from e3relax_fast.ops import MESSAGE_PASSING
from e3relax_fast.reference.rbf import radial_basis


def _with_edge_cutoff(golden_model, edge_cutoff: float, backend: str = "reference") -> E3Relax:
    """The golden weights in a default-mode model with the given atom–atom cutoff."""
    plain = golden_model_instance(golden_model, paper_compat=False)
    model = E3Relax(hidden_channels=32, num_layers=4, edge_cutoff=edge_cutoff, backend=backend).to(torch.float64)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing == ["edge_basis_cutoff"]
    return model


def test_the_atom_atom_edges_use_the_edge_cutoff_and_the_lattice_keeps_30(golden_model, monkeypatch):
    module = importlib.import_module("e3relax_fast.reference.message_passing")
    seen = []

    def recording(d, centres, coeff, cutoff):
        seen.append(cutoff)
        return radial_basis(d, centres, coeff, cutoff)

    monkeypatch.setattr(module, "radial_basis", recording)
    model = _with_edge_cutoff(golden_model, 6.0)
    model(golden_batch(golden_model))
    assert seen == [6.0] * 4  # one atom–atom message op per layer
    assert model.radial_basis.cutoff == 30.0  # the atom–lattice ops' basis


def test_the_default_cutoff_is_the_original_basis_and_6_changes_the_outputs(golden_model):
    batch = golden_batch(golden_model)
    plain = golden_model_instance(golden_model, paper_compat=False)(batch)
    same = _with_edge_cutoff(golden_model, 30.0)(batch)
    short = _with_edge_cutoff(golden_model, 6.0)(batch)
    for a, b in zip(plain.positions + plain.cells, same.positions + same.cells, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert (plain.positions[-1] - short.positions[-1]).abs().max() > 1e-3


# float64: the fused ops' own tolerance against the reference; float32: that of float32 rounding.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 5e-6}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("backend", backend_params(MESSAGE_PASSING, "cpu", "cuda", "triton", "cueq"), indirect=True)
def test_the_fused_ops_take_the_edge_cutoff(golden_model, backend, dtype):
    """Every fused atom–atom op, on its device, with a 6 Å basis matches the reference model: the
    cutoff reaches it as an argument, not a constant (models with a forward-only op run without autograd)."""
    batch = golden_batch(golden_model, dtype)
    expected = _with_edge_cutoff(golden_model, 6.0).to(dtype)(batch)
    model = _with_edge_cutoff(golden_model, 6.0, backend.name).to(device=backend.device, dtype=dtype)
    with torch.set_grad_enabled(model_trains(backend.name, backend.device.type)):
        got = model(batch.to(backend.device))
    for n in range(4):
        assert_close(got.positions[n], expected.positions[n], TOLERANCE[dtype], f"positions L{n}")
        assert_close(got.cells[n], expected.cells[n], TOLERANCE[dtype], f"cells L{n}")


def test_a_checkpoint_keeps_its_edge_cutoff(tmp_path):
    model = E3Relax(hidden_channels=8, num_layers=2, edge_cutoff=6.0)
    torch.save({"state_dict": model.state_dict(), "config": model.config}, tmp_path / "with.pt")
    assert load_pretrained(tmp_path / "with.pt").config["edge_cutoff"] == 6.0
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict says it by its buffer
    assert load_pretrained(tmp_path / "bare.pt", paper_compat=False).config["edge_cutoff"] == 6.0
    torch.save(E3Relax(hidden_channels=8, num_layers=2).state_dict(), tmp_path / "plain.pt")
    assert load_pretrained(tmp_path / "plain.pt", paper_compat=False).config["edge_cutoff"] is None
    assert load_pretrained("default").config["edge_cutoff"] is None  # the shipped model (v6.1): one basis


def test_bad_edge_cutoffs_are_refused():
    with pytest.raises(ValueError, match="edge_cutoff is a default-mode option"):
        E3Relax(hidden_channels=8, num_layers=2, paper_compat=True, edge_cutoff=6.0)
    with pytest.raises(ValueError, match="positive length"):
        E3Relax(hidden_channels=8, num_layers=2, edge_cutoff=0.0)


def test_the_cli_refuses_a_bad_edge_cutoff_in_one_line(capsys):
    from e3relax_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--data", "d", "--out", "r", "--edge-cutoff", "0"])
    err = capsys.readouterr().err
    assert "--edge-cutoff: expected a positive length in Å, got '0'" in err and "Traceback" not in err
