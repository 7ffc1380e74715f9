"""The op table's backend choice: auto falls back with one warning, a named missing backend raises,
forward-only backends are skipped while gradients are needed, a backend refuses tensors of a
device it cannot take."""

from __future__ import annotations

import warnings

import pytest

from e3relax_fast import ops
from e3relax_fast.ops.registry import BackendUnavailableError, Impl, Op


def _impl(name: str, result=None, missing: str | None = None, devices=("cpu", "cuda"), differentiable=True) -> Impl:
    def load():
        if missing is not None:
            raise BackendUnavailableError(missing)
        return lambda: result or name

    return Impl(name, load, lambda: frozenset(devices), differentiable)


def test_auto_falls_back_with_one_warning_and_named_missing_raises():
    op = Op("test_op_a", {"reference": _impl("reference"), "cuda": _impl("cuda", missing="no GPU in this test")},
            auto={"cuda": ("cuda", "reference")})
    with pytest.warns(UserWarning, match="no 'cuda' backend \\(no GPU in this test\\)"):
        assert op.resolve("auto", "cuda")[0] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        assert op.resolve("auto", "cuda")[0] == "reference"
    with pytest.raises(BackendUnavailableError, match="no GPU in this test"):
        op.resolve("cuda", "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        op.resolve("fastest", "cpu")
    with pytest.raises(BackendUnavailableError, match="has no 'cueq' backend"):
        op.resolve("cueq", "cpu")
    assert op.available() == ["reference"]


def test_auto_skips_forward_only_backends_under_autograd_but_named_ones_are_honoured():
    op = Op("test_op_b", {"reference": _impl("reference"), "cuda": _impl("cuda", differentiable=False)},
            auto={"cuda": ("cuda", "reference")})
    assert op.resolve("auto", "cuda")[0] == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # skipping a forward-only backend is not a fallback
        assert op.resolve("auto", "cuda", needs_grad=True)[0] == "reference"
    assert op.resolve("cuda", "cuda", needs_grad=True)[0] == "cuda"


def test_devices_and_substitutes():
    op = Op("test_op_c", {"reference": _impl("reference"), "triton": _impl("triton", devices=("cuda",))},
            auto={"cpu": ("triton", "reference"), "cuda": ("triton", "reference")}, substitutes={"cueq": "reference"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a backend that cannot take CPU tensors is not a fallback either
        assert op.resolve("auto", "cpu")[0] == "reference"
    assert op.resolve("auto", "cuda")[0] == "triton"
    with pytest.raises(BackendUnavailableError, match="takes \\['cuda'\\] tensors, not 'cpu'"):
        op.resolve("triton", "cpu")
    assert op.resolve("cueq", "cuda")[0] == "reference"


def test_table_ops_and_reference_everywhere():
    assert set(ops.OPS) == {"radius_graph", "message_passing", "lattice_message", "lattice_pool"}
    for name in ops.OPS:
        assert "reference" in ops.available(name)
        for device in ("cpu", "cuda"):
            assert ops.resolve(name, "reference", device)[0] == "reference"
    # The atom-lattice ops have no CUDA or cuEquivariance kernels: a model run on those takes the reference.
    assert ops.resolve("lattice_pool", "cuda", "cuda")[0] == "reference"
    with pytest.raises(ValueError, match="unknown op"):
        ops.resolve("no_such_op", "auto", "cpu")
