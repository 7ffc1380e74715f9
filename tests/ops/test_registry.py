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
    tensor_ops = {"radius_graph", "message_passing", "lattice_message", "lattice_pool"}
    # NumPy arrays: "cpu" whatever the model's device
    host_ops = {"frame_bookkeeping", "frame_map_back", "frame_p1_certificate"}
    assert set(ops.OPS) == tensor_ops | host_ops
    for name in ops.OPS:
        assert "reference" in ops.available(name)
        for device in ("cpu", "cuda") if name in tensor_ops else ("cpu",):
            assert ops.resolve(name, "reference", device)[0] == "reference"
    for name in host_ops:
        with pytest.raises(BackendUnavailableError, match="takes \\['cpu'\\] tensors"):
            ops.resolve(name, "reference", "cuda")
    # The atom-lattice ops have no CUDA or cuEquivariance kernels: a model run on those takes the reference.
    assert ops.resolve("lattice_pool", "cuda", "cuda")[0] == "reference"
    with pytest.raises(ValueError, match="unknown op"):
        ops.resolve("no_such_op", "auto", "cpu")


# --- the GPU path selected without the interpreter, simulated on CPU ---------------------------------------
def test_named_gpu_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    """Without Triton's interpreter, naming ``triton`` (or ``cuda``) for CPU tensors raises a clear
    BackendUnavailableError from the registry instead of reaching Triton's launcher with CPU pointers."""
    from e3relax_fast.ops import table

    monkeypatch.setattr(table, "_triton_interpreted", lambda: False)
    op = Op("test_op_gpu", {"reference": _impl("reference"),
                            "triton": Impl("triton", lambda: (lambda: "triton"), table._triton_devices, True,
                                           table._triton_refusal),
                            "cuda": _impl("cuda", devices=("cuda",))},
            auto={"cpu": ("reference",), "cuda": ("triton", "cuda", "reference")})
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1") as err:
        op.resolve("triton", "cpu")
    assert "takes ['cuda'] tensors, not 'cpu' ones" in str(err.value) and "backend='auto'" in str(err.value)
    with pytest.raises(BackendUnavailableError, match="takes \\['cuda'\\] tensors, not 'cpu'"):
        op.resolve("cuda", "cpu")
    assert op.resolve("triton", "cuda")[0] == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op.resolve("auto", "cpu")[0] == "reference"
    # the interpreter on: the same named backend takes CPU tensors (checked at every call, not cached)
    monkeypatch.setattr(table, "_triton_interpreted", lambda: True)
    assert op.resolve("triton", "cpu")[0] == "triton"


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_real_table_refuses_or_falls_back_for_cpu_tensors(monkeypatch, name):
    """The op table with the interpreter flag off: every op's named GPU-only backends refuse CPU tensors
    (when they load at all, else they are unavailable: an error either way), and auto picks a backend
    that takes CPU tensors."""
    from e3relax_fast.ops import table

    monkeypatch.setattr(table, "_triton_interpreted", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    op = ops.OPS[name]
    for backend in ("triton", "cuda"):
        if backend not in op.impls:
            continue
        with pytest.raises(BackendUnavailableError, match="not 'cpu' ones|not available"):
            ops.resolve(name, backend, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing compiled cpu backend warns once; tested above
        chosen, _ = ops.resolve(name, "auto", "cpu")
    assert chosen not in ("triton", "cuda") and "cpu" in op.impls[chosen].devices()


def test_auto_falls_back_once_when_its_cpu_choice_is_missing():
    """On CPU, auto's first choice missing (an extension not built): one warning, then the reference."""
    op = Op("test_op_cpu", {"reference": _impl("reference"), "cpu": _impl("cpu", missing="not built here",
                                                                           devices=("cpu",)),
                            "triton": _impl("triton", devices=("cuda",))},
            auto={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")})
    with pytest.warns(UserWarning, match="no 'cpu' backend \\(not built here\\); using 'reference'"):
        assert op.resolve("auto", "cpu")[0] == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op.resolve("auto", "cpu")[0] == "reference"


def test_interpreter_state_follows_the_imported_kernels(monkeypatch):
    """Triton fixes interpreter or GPU when a kernel module is imported: once one is, its kernels say
    which, whatever TRITON_INTERPRET says now; before, the variable does."""
    import sys
    import types

    from e3relax_fast.ops import table

    class JITFunction:  # stand-ins with Triton's class names
        pass

    class InterpretedFunction:
        pass

    for key in [k for k in sys.modules if k.startswith("e3relax_fast.kernels.")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert table._triton_interpreted() and "cpu" in table._triton_devices()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not table._triton_interpreted() and table._triton_devices() == frozenset({"cuda"})

    gpu = types.ModuleType("e3relax_fast.kernels.fake_gpu")
    gpu.helper, gpu._kernel = 3, JITFunction()
    monkeypatch.setitem(sys.modules, gpu.__name__, gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set too late: the kernels are GPU kernels
    assert not table._triton_interpreted() and table._triton_devices() == frozenset({"cuda"})
    monkeypatch.delitem(sys.modules, gpu.__name__)

    cpu = types.ModuleType("e3relax_fast.kernels.fake_cpu")
    cpu._kernel = InterpretedFunction()
    monkeypatch.setitem(sys.modules, cpu.__name__, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert table._triton_interpreted() and "cpu" in table._triton_devices()
    assert table._module_interpreted(types.ModuleType("empty")) is None
