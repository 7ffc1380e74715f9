"""Parity of the reference model with the original implementation's golden run (spec §13, 3–6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DATA, golden_batch, golden_model_instance

from e3relax_fast.reference.rbf import rbf_centres, rbf_coefficient
from e3relax_fast.training.loss import layerwise_loss, unwrap_targets

LAYERS = range(4)


def _run(golden, dtype=torch.float64, paper_compat=True, trace=None):
    model = golden_model_instance(golden, paper_compat=paper_compat, dtype=dtype)
    batch = golden_batch(golden, dtype)
    return model, batch, model(batch, trace=trace)


def _targets(golden, dtype=torch.float64):
    return torch.from_numpy(golden["in/pos_r"]).to(dtype), torch.from_numpy(golden["in/cell_r"]).to(dtype)


def test_rbf_centres_bit_identical(golden_model):
    centres = rbf_centres(128).numpy()
    expected = golden_model["param/radial_basis.rbf.offset"].astype(np.float32)
    assert centres.dtype == np.float32
    np.testing.assert_array_equal(centres.view(np.uint32), expected.view(np.uint32))
    assert rbf_coefficient(torch.from_numpy(centres)) == -8064.500060085207


def test_forward_paper_float64_outputs_and_intermediates(golden_model):
    trace = {}
    _, _, out = _run(golden_model, trace=trace)
    for n in LAYERS:
        np.testing.assert_allclose(out.positions[n].detach().numpy(), golden_model[f"out/pos_L{n}"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out.cells[n].detach().numpy(), golden_model[f"out/cell_L{n}"], rtol=0, atol=1e-12)
    dbg = [k for k in golden_model if k.startswith("dbg/")]
    assert len(dbg) == 96  # 24 intermediates per layer
    for key in dbg:
        name = key.removeprefix("dbg/")
        assert name in trace, f"model does not trace {name}"
        np.testing.assert_allclose(trace[name].detach().numpy(), golden_model[key], rtol=0, atol=1e-12, err_msg=name)


def test_loss_and_gradients_paper_float64(golden_model):
    model = golden_model_instance(golden_model, paper_compat=True)
    batch = golden_batch(golden_model)
    batch.positions.requires_grad_(True)
    batch.cells.requires_grad_(True)
    loss = layerwise_loss(model(batch), *_targets(golden_model))
    for n in LAYERS:
        assert abs(loss.positions[n].item() - golden_model[f"loss/pos_term_L{n}"]) < 1e-12
        assert abs(loss.cells[n].item() - golden_model[f"loss/cell_term_L{n}"]) < 1e-12
    assert abs(loss.total.item() - golden_model["loss/total"]) < 1e-12
    assert abs(loss.total.item() - 0.9417628583549037) < 1e-12
    loss.total.backward()

    params = dict(model.named_parameters())
    names = [k.removeprefix("grad/") for k in golden_model
             if k.startswith("grad/") and k.removeprefix("grad/") in params]
    assert len(names) == 4
    for name in names:
        expected = golden_model[f"grad/{name}"]
        got = params[name].grad.numpy()
        assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max(), name
    for name, tensor in (("pos_u", batch.positions), ("cell_u", batch.cells)):
        expected = golden_model[f"grad/{name}"]
        assert np.abs(tensor.grad.numpy() - expected).max() <= 1e-10 * np.abs(expected).max(), name
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()
    expected_norm = float(golden_model["grad/total_norm_all_params"])
    assert abs(norm - expected_norm) <= 1e-10 * expected_norm
    assert abs(expected_norm - 0.11776936314603305) < 1e-15


def test_forward_paper_float32_against_float64(golden_model):
    model = golden_model_instance(golden_model, paper_compat=True, dtype=torch.float32)
    batch = golden_batch(golden_model, torch.float32)
    out = model(batch)
    assert out.positions[-1].dtype == torch.float32
    for n in LAYERS:
        np.testing.assert_allclose(out.positions[n].detach().numpy(), golden_model[f"out/pos_L{n}"], rtol=0, atol=5e-6)
        np.testing.assert_allclose(out.cells[n].detach().numpy(), golden_model[f"out/cell_L{n}"], rtol=0, atol=5e-6)
    loss = layerwise_loss(out, *_targets(golden_model, torch.float32))
    assert abs(loss.total.item() - golden_model["loss/total"]) < 1e-6


def test_unwrap_reproduces_original(golden_model):
    ptr = golden_batch(golden_model).ptr
    unwrapped, image = unwrap_targets(
        torch.from_numpy(golden_model["in/pos_u"]),
        torch.from_numpy(golden_model["in/pos_r_before_unwrap"]),
        torch.from_numpy(golden_model["in/cell_r_before_unwrap"]),
        ptr,
    )
    np.testing.assert_array_equal(image.numpy(), golden_model["in/unwrap_image"])
    np.testing.assert_allclose(unwrapped.numpy(), golden_model["in/pos_r"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["rot", "trans"])
def test_paper_mode_reproduces_original_on_transformed_inputs(golden_model, kind):
    """The original's (non-equivariant) outputs on rotated / translated inputs are reproduced too."""
    model = golden_model_instance(golden_model)
    batch = golden_batch(golden_model)
    if kind == "rot":
        rot = torch.from_numpy(golden_model["equiv/rotation_R"])
        batch.positions, batch.cells = batch.positions @ rot.T, batch.cells @ rot.T
    else:
        batch.positions = batch.positions + torch.tensor([0.37, -1.21, 0.83], dtype=torch.float64)
    out = model(batch)
    for n in LAYERS:
        np.testing.assert_allclose(out.positions[n].detach().numpy(), golden_model[f"equiv/{kind}_pos_L{n}"],
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(out.cells[n].detach().numpy(), golden_model[f"equiv/{kind}_cell_L{n}"],
                                   rtol=0, atol=1e-12)


def test_load_published_format(golden_model):
    """Authors' checkpoints: EMA dict, maybe ``module.``-prefixed, without the RBF buffer."""
    reference = golden_model_instance(golden_model)
    state = {f"module.{k.removeprefix('param/')}": torch.from_numpy(v).float()
             for k, v in golden_model.items() if k.startswith("param/") and "rbf.offset" not in k}
    from e3relax_fast.model import E3Relax

    model = E3Relax(hidden_channels=32, paper_compat=True)
    model.load_state_dict(state)
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.double().state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_state_dict_names_and_shapes_match_original():
    import json

    from e3relax_fast.model import E3Relax

    meta = json.loads((DATA / "model_h32_l4.json").read_text())
    for model, expected in (
        (E3Relax(hidden_channels=32), meta["parameter_names_and_shapes_h32"]),
        (E3Relax(hidden_channels=512), meta["paper_config"]["state_dict_names_and_shapes"]),
    ):
        got = [[name, list(t.shape)] for name, t in model.state_dict().items()]
        assert got == expected
