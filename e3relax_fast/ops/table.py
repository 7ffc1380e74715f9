"""THE op table: every accelerated op of e3relax-fast, its backends, the order ``auto`` tries them
on each device type, and what each backend can do. This is the only place that knows backends.

| op | reference | cpu (C++) | cuda (C++/CUDA) | triton | cueq |
|---|---|---|---|---|---|
| radius_graph | ✓ | ✓ auto on CPU | ✓ auto on CUDA | ✓ | — |
| message_passing | ✓ | ✓ auto on CPU (fused backward) | forward only | ✓ auto on CUDA | ✓ |
| lattice_message | ✓ auto on CPU with grad | forward only, auto on CPU | (reference) | ✓ auto on CUDA | (reference) |
| lattice_pool | ✓ auto on CPU | (reference) | (reference) | ✓ auto on CUDA | (reference) |
| frame_bookkeeping | ✓ (NumPy) | ✓ auto | — | — | — |
| frame_map_back | ✓ (NumPy) | ✓ auto | — | — | — |
| frame_p1_certificate | ✓ (NumPy) | ✓ auto | — | — | — |

"(reference)": a model run with ``backend="cpu"``, ``"cuda"`` or ``"cueq"`` takes that op from the
reference, since those backends do not implement it.

The ``cpu`` backend of the two gated message ops (``csrc/fused_cpu.h``) is fused per receiver, with
the radial projection evaluated on the 15 centres of the basis nearest each distance
(``reference/radial_window.py``: the other 113 add at most 6.1e-13 of the largest weight of each
channel). The atom–atom op has a fused backward as well (``csrc/message_passing_backward_cpu.cpp``,
one thread), so ``auto`` takes it on CPU for training too (a training step 1.7 times as fast as
with the reference's autograd: ``bench/bench_train_step.py``); the lattice op's is forward only,
and ``auto`` takes the reference for it under autograd.

The three frame ops (:mod:`e3relax_fast.frame`: the canonical frame's bookkeeping after moyopy's
symmetry search, a prediction's way back to the user's description, and the certificate that lets
a P1 crystal skip the search) work on NumPy arrays on the host, one crystal per call; their C++
backend (``csrc/frame_cpu.h``) removes the per-call cost of many small NumPy operations, which
dominates there.

Each backend's implementation has its reference twin's signature (``e3relax_fast/reference/``).
Compiled and Triton backends are imported on first use; a missing one says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from ..reference.frame_bookkeeping import frame_bookkeeping as _reference_frame_bookkeeping
from ..reference.frame_map_back import frame_map_back as _reference_frame_map_back
from ..reference.frame_p1_certificate import frame_p1_certificate as _reference_frame_p1_certificate
from ..reference.lattice_message import lattice_message as _reference_lattice_message
from ..reference.lattice_pool import lattice_pool as _reference_lattice_pool
from ..reference.message_passing import message_passing as _reference_message_passing
from ..reference.radius_graph import radius_graph as _reference_radius_graph
from .registry import BackendUnavailableError, Impl, Op

RADIUS_GRAPH = "radius_graph"
MESSAGE_PASSING = "message_passing"
LATTICE_MESSAGE = "lattice_message"
LATTICE_POOL = "lattice_pool"
FRAME_BOOKKEEPING = "frame_bookkeeping"
FRAME_MAP_BACK = "frame_map_back"
FRAME_P1_CERTIFICATE = "frame_p1_certificate"

ANY_DEVICE = frozenset({"cpu", "cuda"})
CUDA_ONLY = frozenset({"cuda"})
CPU_ONLY = frozenset({"cpu"})


def _any_device() -> frozenset[str]:
    return ANY_DEVICE


def _cuda_only() -> frozenset[str]:
    return CUDA_ONLY


def _cpu_only() -> frozenset[str]:
    return CPU_ONLY


def _reference(fn):
    return Impl("reference", lambda: fn, _any_device, differentiable=True)


# --- compiled (csrc/) ------------------------------------------------------------------------------
def _compiled(name: str, need_cuda: bool, binding: str | None = None):
    """Loader of ``compiled.<name>``; ``binding``: the ``_C`` function it calls, absent from an
    extension built from older sources (then the backend is unavailable, not broken)."""
    def load():
        from . import compiled

        reason = compiled.IMPORT_ERROR if not need_cuda else compiled.CUDA_UNAVAILABLE_REASON
        if reason is not None or compiled._C is None:
            raise BackendUnavailableError(reason or "e3relax_fast._C is not built")
        if binding is not None and not hasattr(compiled._C, binding):
            raise BackendUnavailableError(f"e3relax_fast._C has no {binding} (built from older sources: reinstall)")
        return getattr(compiled, name)

    return load


# --- Triton (kernels/) -----------------------------------------------------------------------------
def _module_interpreted(module) -> bool | None:
    """Whether the ``@triton.jit`` kernels of an imported module were decorated for Triton's CPU
    interpreter (True) or for the GPU (False); None when it holds no kernel."""
    for value in vars(module).values():
        kind = type(value).__name__
        if kind == "InterpretedFunction":
            return True
        if kind == "JITFunction":
            return False
    return None


def _triton_interpreted() -> bool:
    """Whether the Triton kernels run on the CPU interpreter. Triton decides when a kernel is
    decorated (its module imported), so an imported kernel module answers for all of them; before
    any is imported, ``TRITON_INTERPRET=1`` does. (Setting the variable after the import changes
    nothing: the kernels stay GPU kernels, whose launcher rejects CPU tensors.)"""
    for name, module in list(sys.modules.items()):
        if name.startswith("e3relax_fast.kernels.") and module is not None:
            found = _module_interpreted(module)
            if found is not None:
                return found
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_devices() -> frozenset[str]:
    """Triton kernels take CUDA tensors; on the CPU interpreter they take CPU tensors too."""
    return ANY_DEVICE if _triton_interpreted() else CUDA_ONLY


def _triton_refusal(device_type: str) -> str:
    if device_type == "cpu":
        return ("Triton kernels run on CPU tensors only on Triton's CPU interpreter, which is off: set "
                "TRITON_INTERPRET=1 before e3relax_fast's Triton kernels are imported")
    return f"Triton kernels take no {device_type!r} tensors"


def _kernel_module(module: str):
    """``e3relax_fast.kernels.<module>``. Installed, pyproject maps the package to the top-level
    kernels/ folder; in a source checkout used without installing, that folder is loaded as
    ``e3relax_fast.kernels`` here (only it: no other top-level file becomes a submodule)."""
    package = "e3relax_fast.kernels"
    if package not in sys.modules and importlib.util.find_spec(package) is None:
        folder = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(package, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        if spec is None:
            raise BackendUnavailableError(f"the Triton kernels are not installed (no {folder})")
        sys.modules[package] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[package])
    return importlib.import_module(f"{package}.{module}")


def _triton(module: str, name: str):
    def load():
        # Checked before importing triton (slow to import), so CPU-only machines skip it entirely.
        if not _triton_interpreted() and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "no CUDA device (set TRITON_INTERPRET=1 before importing e3relax_fast to run the kernels on CPU)")
        if importlib.util.find_spec("triton") is None:
            raise BackendUnavailableError("triton is not installed; pip install 'e3relax-fast[triton]'")
        try:
            return getattr(_kernel_module(module), name)
        except ImportError as exc:  # a broken Triton install must not break the package
            raise BackendUnavailableError(f"kernel module failed to import: {exc!r}") from exc

    return load


# --- cuEquivariance ----------------------------------------------------------------------------------
def _cueq_load():
    from . import cueq

    if not cueq.FOUND:
        raise BackendUnavailableError("cuequivariance-torch is not installed; pip install 'e3relax-fast[cueq]'")
    return cueq.message_passing


# --- the table -----------------------------------------------------------------------------------------
_LATTICE_SUBSTITUTES = {"cuda": "reference", "cueq": "reference"}
_POOL_SUBSTITUTES = {"cpu": "reference", **_LATTICE_SUBSTITUTES}

OPS: dict[str, Op] = {
    RADIUS_GRAPH: Op(
        RADIUS_GRAPH,
        {
            "reference": _reference(_reference_radius_graph),
            # The C++ builder copies CUDA inputs to the host and its outputs back.
            "cpu": Impl("cpu", _compiled("radius_graph_cpu", need_cuda=False), _any_device, differentiable=True),
            "cuda": Impl("cuda", _compiled("radius_graph_cuda", need_cuda=True), _cuda_only, differentiable=True),
            "triton": Impl("triton", _triton("radius_graph", "radius_graph"), _triton_devices, True, _triton_refusal),
        },
        auto={"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")},
    ),
    MESSAGE_PASSING: Op(
        MESSAGE_PASSING,
        {
            "reference": _reference(_reference_message_passing),
            "cpu": Impl("cpu", _compiled("message_passing_fused_cpu", False, "message_passing_backward_cpu"),
                        _cpu_only, differentiable=True),
            "cuda": Impl("cuda", _compiled("message_passing_cuda", need_cuda=True), _cuda_only,
                         differentiable=False),
            "triton": Impl("triton", _triton("message_passing", "message_passing"), _triton_devices, True,
                           _triton_refusal),
            "cueq": Impl("cueq", _cueq_load, _any_device, differentiable=True),
        },
        auto={"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "cueq", "reference")},
    ),
    LATTICE_MESSAGE: Op(
        LATTICE_MESSAGE,
        {
            "reference": _reference(_reference_lattice_message),
            "cpu": Impl("cpu", _compiled("lattice_message_fused_cpu", False, "lattice_message_fused_cpu"), _cpu_only,
                        differentiable=False),
            "triton": Impl("triton", _triton("lattice_message", "lattice_message"), _triton_devices, True,
                           _triton_refusal),
        },
        auto={"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")},
        substitutes=_LATTICE_SUBSTITUTES,
    ),
    LATTICE_POOL: Op(
        LATTICE_POOL,
        {
            "reference": _reference(_reference_lattice_pool),
            "triton": Impl("triton", _triton("lattice_pool", "lattice_pool"), _triton_devices, True, _triton_refusal),
        },
        auto={"cpu": ("reference",), "cuda": ("triton", "reference")},
        substitutes=_POOL_SUBSTITUTES,
    ),
    # NumPy arrays on the host: "cpu" is their device whatever the model's.
    FRAME_BOOKKEEPING: Op(
        FRAME_BOOKKEEPING,
        {
            "reference": Impl("reference", lambda: _reference_frame_bookkeeping, _cpu_only, differentiable=False),
            "cpu": Impl("cpu", _compiled("frame_bookkeeping", False, "frame_bookkeeping"), _cpu_only,
                        differentiable=False),
        },
        auto={"cpu": ("cpu", "reference")},
    ),
    FRAME_MAP_BACK: Op(
        FRAME_MAP_BACK,
        {
            "reference": Impl("reference", lambda: _reference_frame_map_back, _cpu_only, differentiable=False),
            "cpu": Impl("cpu", _compiled("frame_map_back", False, "frame_map_back"), _cpu_only, differentiable=False),
        },
        auto={"cpu": ("cpu", "reference")},
    ),
    FRAME_P1_CERTIFICATE: Op(
        FRAME_P1_CERTIFICATE,
        {
            "reference": Impl("reference", lambda: _reference_frame_p1_certificate, _cpu_only, differentiable=False),
            "cpu": Impl("cpu", _compiled("frame_p1_certificate", False, "frame_p1_certificate"), _cpu_only,
                        differentiable=False),
        },
        auto={"cpu": ("cpu", "reference")},
    ),
}
