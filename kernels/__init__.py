"""Triton kernels of e3relax-fast (installed as ``e3relax_fast.kernels``).

Importing this package never fails for lack of Triton or a GPU: it registers backend ``"triton"``
for an op only when Triton imports and kernels can run here (a CUDA device, or the Triton CPU
interpreter selected with ``TRITON_INTERPRET=1`` before this import); otherwise it records why the
backend is missing, which :func:`e3relax_fast.backends.resolve` reports.
"""

from __future__ import annotations

import os

from .. import backends

MESSAGE_OP = "message_passing"
RADIUS_OP = "radius_graph"


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
    if not ok:
        backends.mark_missing(MESSAGE_OP, "triton", reason)
        backends.mark_missing(RADIUS_OP, "triton", reason)
        return
    try:
        from .message_passing import message_passing
    except Exception as exc:  # pragma: no cover - a broken Triton install must not break the package
        backends.mark_missing(MESSAGE_OP, "triton", f"kernel module failed to import: {exc!r}")
    else:
        backends.register(MESSAGE_OP, "triton", message_passing)
    try:
        from .radius_graph import radius_graph
    except Exception as exc:  # pragma: no cover - a broken Triton install must not break the package
        backends.mark_missing(RADIUS_OP, "triton", f"kernel module failed to import: {exc!r}")
    else:
        backends.register(RADIUS_OP, "triton", radius_graph)


_register()
