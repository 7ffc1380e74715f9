"""load_pretrained never guesses a mode silently and names the file it cannot read."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from e3relax_fast import load_pretrained, relax_batch
from e3relax_fast.model import E3Relax

ROCKSALT = (np.array([11, 17, 11, 17]), np.array([[0, 0, 0], [2.9, 0, 0], [0, 2.8, 2.8], [2.9, 2.8, 2.8]]),
            np.diag([5.8, 5.6, 5.6]))


def test_a_bare_state_dict_needs_its_mode(tmp_path):
    """Before: torch.save(load_pretrained("default").state_dict(), p); load_pretrained(p) came back in
    paper_compat mode and moved atoms by tenths of an Å. Now: refused unless the mode is given."""
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=16, num_layers=2).eval()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ValueError, match=r"weights.pt is a bare state dict .* paper_compat=False"):
        load_pretrained(path)
    same = load_pretrained(path, paper_compat=False)
    expected = relax_batch([ROCKSALT], model)[0][1]
    np.testing.assert_array_equal(relax_batch([ROCKSALT], same)[0][1], expected)
    # What the old loader silently did: another model altogether (here untrained, so it moves the
    # atoms by hundredths of an Å where the default mode keeps the symmetric rock salt).
    other = load_pretrained(path, paper_compat=True)
    assert other.paper_compat
    assert np.abs(relax_batch([ROCKSALT], other)[0][1] - expected).max() > 5e-3


def test_a_bare_state_dict_keeps_the_cell_transport(tmp_path):
    """The shipped model carries its atoms along with each cell update (cell_transport), an option
    without weights: its bare state dict still records it (a marker buffer), so loading it gives the
    same model, and asking for the original's arithmetic is refused by name."""
    shipped = load_pretrained("default")
    assert shipped.cell_transport
    path = tmp_path / "weights.pt"
    torch.save(shipped.state_dict(), path)
    same = load_pretrained(path, paper_compat=False)
    assert same.cell_transport
    np.testing.assert_array_equal(relax_batch([ROCKSALT], same)[0][1], relax_batch([ROCKSALT], shipped)[0][1])
    with pytest.raises(ValueError, match=r"weights.pt: cell_transport is a default-mode option"):
        load_pretrained(path, paper_compat=True)
    without = {k: v for k, v in shipped.state_dict().items() if k != "cell_transport_marker"}
    # the shipped model's other options (they have weights of their own)
    others = {k: shipped.config[k] for k in ("cell_strain", "cell_virial", "bond_radii", "bond_forces")}
    with pytest.raises(RuntimeError, match="cell_transport_marker"):  # strict: a model without it refuses
        E3Relax(hidden_channels=64, num_layers=4, **others).load_state_dict(shipped.state_dict())
    E3Relax(hidden_channels=64, num_layers=4, cell_transport=True, **others).load_state_dict(without)  # older


def test_recorded_modes_and_the_authors_format(tmp_path):
    torch.manual_seed(0)
    ours = E3Relax(hidden_channels=8, num_layers=1)
    torch.save({"state_dict": ours.state_dict(), "config": ours.config}, tmp_path / "ours.pt")
    assert not load_pretrained(tmp_path / "ours.pt").paper_compat
    assert not load_pretrained(tmp_path / "ours.pt", paper_compat=False).paper_compat
    with pytest.raises(ValueError, match="records paper_compat=False, but paper_compat=True was asked for"):
        load_pretrained(tmp_path / "ours.pt", paper_compat=True)
    torch.save({"state_dict": ours.state_dict()}, tmp_path / "no_config.pt")
    with pytest.raises(ValueError, match="does not record paper_compat"):
        load_pretrained(tmp_path / "no_config.pt")
    assert load_pretrained(tmp_path / "no_config.pt", paper_compat=True).paper_compat
    # The authors' published format (no RBF buffer) is only correct in the original's arithmetic.
    authors = {f"module.{k}": v for k, v in ours.state_dict().items() if k != "radial_basis.rbf.offset"}
    torch.save(authors, tmp_path / "authors.pt")
    assert load_pretrained(tmp_path / "authors.pt").paper_compat


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    """Before: raw unpickling errors (KeyError, EOFError, zip errors) with no file name."""
    (tmp_path / "notes.pt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"state_dict": E3Relax(hidden_channels=8, num_layers=1).state_dict()}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with (tmp_path / "pickle.pt").open("wb") as fh:
        pickle.dump({"a": ValueError("a class weights_only refuses")}, fh, protocol=2)
    for name in ("notes.pt", "empty.pt", "truncated.pt", "pickle.pt"):
        with pytest.raises(ValueError, match=rf"{name}: not a PyTorch checkpoint that loads with weights_only=True"):
            load_pretrained(tmp_path / name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_pretrained("default", map_location="cuda")
