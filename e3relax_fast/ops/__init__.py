"""The ops of e3relax-fast and their backends, chosen by name.

``backend="auto" | "reference" | "cpu" | "cuda" | "triton" | "cueq"``: ``auto`` takes the fastest
backend usable for the tensors' device (falling back with one warning); naming a backend that cannot
run here raises :class:`BackendUnavailableError`. :mod:`.table` lists every op and backend;
:func:`resolve` picks one; :mod:`.compiled` wraps the C++/CUDA extension and :mod:`.cueq` the
cuEquivariance backend; the Triton kernels live in the top-level ``kernels/`` folder.
"""

from __future__ import annotations

from collections.abc import Callable

from .registry import BACKENDS, BackendUnavailableError
from .table import (
    FRAME_BOOKKEEPING,
    FRAME_MAP_BACK,
    FRAME_P1_CERTIFICATE,
    LATTICE_MESSAGE,
    LATTICE_POOL,
    MESSAGE_PASSING,
    OPS,
    RADIUS_GRAPH,
)


def resolve(op: str, backend: str, device_type: str, needs_grad: bool = False) -> tuple[str, Callable]:
    """``(backend name, implementation)`` of ``op`` for ``backend`` and tensors on ``device_type``.

    ``needs_grad``: gradients will flow through the call, so ``auto`` skips forward-only backends.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; the ops are {sorted(OPS)}")
    return OPS[op].resolve(backend, device_type, needs_grad)


def available(op: str) -> list[str]:
    """Names of the backends of ``op`` that can run on this machine."""
    return OPS[op].available()


__all__ = ["BACKENDS", "FRAME_BOOKKEEPING", "FRAME_MAP_BACK", "FRAME_P1_CERTIFICATE", "LATTICE_MESSAGE", "LATTICE_POOL",
           "MESSAGE_PASSING", "OPS", "RADIUS_GRAPH", "BackendUnavailableError", "available", "resolve"]
