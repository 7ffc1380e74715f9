"""Triton kernels of e3relax-fast (installed as ``e3relax_fast.kernels``).

Importing this package never fails for lack of Triton or a GPU: it registers backend ``"triton"``
for an op only when Triton imports and kernels can run here (a CUDA device, or the Triton CPU
interpreter selected with ``TRITON_INTERPRET=1`` before this import); otherwise it records why the
backend is missing, which :func:`e3relax_fast.backends.resolve` reports.
"""

from __future__ import annotations

import importlib
import os

from .. import backends

MESSAGE_OP = "message_passing"
RADIUS_OP = "radius_graph"
LATTICE_MESSAGE_OP = "lattice_message"
LATTICE_POOL_OP = "lattice_pool"
# (op, kernel module, function) of every Triton backend this package provides.
_OPS = (
    (MESSAGE_OP, "message_passing", "message_passing"),
    (RADIUS_OP, "radius_graph", "radius_graph"),
    (LATTICE_MESSAGE_OP, "lattice_message", "lattice_message"),
    (LATTICE_POOL_OP, "lattice_pool", "segment_mean"),
)


def _usable() -> tuple[bool, str]:
    import torch

    # Checked before importing triton (slow to import) so CPU-only machines skip it entirely.
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing e3relax_fast to run the kernels on CPU)"
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return False, f"triton is not installed ({exc}); pip install 'e3relax-fast[triton]'"
    return True, ""


def _register() -> None:
    ok, reason = _usable()
    for op, module, name in _OPS:
        if not ok:
            backends.mark_missing(op, "triton", reason)
            continue
        try:
            fn = getattr(importlib.import_module(f".{module}", __name__), name)
        except Exception as exc:  # pragma: no cover - a broken Triton install must not break the package
            backends.mark_missing(op, "triton", f"kernel module failed to import: {exc!r}")
        else:
            backends.register(op, "triton", fn)


_register()
