"""Backend registry: every accelerated op is selected by name.

``backend="auto"`` picks the fastest implementation available for the tensors' device and,
when that preferred implementation is missing, falls back to the pure-PyTorch reference with a
single warning per (op, backend). Naming a backend that is not available raises
:class:`BackendUnavailableError`, never falls back silently.

Implementations register themselves with :func:`register`; a compiled or Triton backend that
fails to import simply never registers, so nothing compiled is needed for correct answers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton", "cueq")

# Per op and device type, the preference order of ``auto`` (declared by the op's module).
_AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}

_REGISTRY: dict[str, dict[str, Callable]] = {}
_WHY_MISSING: dict[tuple[str, str], str] = {}
_WARNED: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here."""


def declare(op: str, auto_order: dict[str, tuple[str, ...]]) -> None:
    """Declare ``op`` and the order in which ``auto`` tries its backends on each device type."""
    _AUTO_ORDER[op] = auto_order
    _REGISTRY.setdefault(op, {})


def register(op: str, backend: str, fn: Callable) -> None:
    """Make ``fn`` the implementation of ``op`` for ``backend``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend name {backend!r}; expected one of {BACKENDS[1:]}")
    _REGISTRY.setdefault(op, {})[backend] = fn


def mark_missing(op: str, backend: str, reason: str) -> None:
    """Record why ``backend`` is unavailable for ``op`` (shown in errors and the auto warning)."""
    _WHY_MISSING[(op, backend)] = reason


def available(op: str) -> list[str]:
    """Names of the backends registered for ``op``."""
    return sorted(_REGISTRY.get(op, {}))


def resolve(op: str, backend: str, device_type: str, skip: tuple[str, ...] = ()) -> tuple[str, Callable]:
    """Return ``(name, implementation)`` of ``op`` for the requested backend on ``device_type``.

    ``skip`` lists backends ``auto`` must not pick here (e.g. forward-only ones while gradients
    are needed); a backend named explicitly is returned regardless.
    """
    impls = _REGISTRY.get(op, {})
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for {op}; expected one of {BACKENDS}")
    if backend != "auto":
        if backend not in impls:
            reason = _WHY_MISSING.get((op, backend), "not built or not installed")
            raise BackendUnavailableError(
                f"backend {backend!r} is not available for {op}: {reason}. "
                f"Available: {available(op)}; use backend='auto' to fall back."
            )
        return backend, impls[backend]
    order = [name for name in _AUTO_ORDER.get(op, {}).get(device_type, ("reference",)) if name not in skip]
    preferred = order[0]
    for name in order:
        if name in impls:
            if name != preferred and (op, preferred) not in _WARNED:
                _WARNED.add((op, preferred))
                reason = _WHY_MISSING.get((op, preferred), "not built or not installed")
                warnings.warn(
                    f"e3relax_fast: {op} has no {preferred!r} backend ({reason}); "
                    f"using {name!r} instead.",
                    stacklevel=3,
                )
            return name, impls[name]
    raise BackendUnavailableError(f"no implementation of {op} is registered")
