"""How an op's backend is chosen: the mechanism behind the op table (:mod:`.table`).

A backend is named, never guessed: ``backend="auto"`` takes the first usable implementation in the
op's preference order for the tensors' device and, when the preferred one is missing, says so once
with a warning; naming a backend that cannot run here raises :class:`BackendUnavailableError`.
Implementations are loaded lazily (a compiled or Triton backend is imported on first use), so
nothing compiled is needed to import the package or to get correct answers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton", "cueq")


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here."""


@dataclass(frozen=True)
class Impl:
    """One backend of an op.

    load: returns the implementation, or raises :class:`BackendUnavailableError` saying why it
        cannot run on this machine (not built, not installed, no device). Called once, lazily.
    devices: device types whose tensors it accepts (``"cpu"``, ``"cuda"``); a function of the
        environment for backends such as Triton, whose CPU interpreter is opt-in.
    differentiable: it supports autograd; ``auto`` skips it while gradients are needed.
    refusal: optional ``device_type -> sentence`` saying why tensors of that device are refused and
        what to do (e.g. Triton's CPU interpreter being off), appended to the error.
    """

    backend: str
    load: Callable[[], Callable]
    devices: Callable[[], frozenset[str]]
    differentiable: bool
    refusal: Callable[[str], str] | None = None


@dataclass
class Op:
    """An op of the table: its backends, the order ``auto`` tries them per device type, and which
    of its own backends stands in when a caller names a backend this op does not have (a model run
    with ``backend="cuda"`` still needs the atom–lattice ops, which have no CUDA kernel)."""

    name: str
    impls: dict[str, Impl]
    auto: dict[str, tuple[str, ...]]
    substitutes: dict[str, str] = field(default_factory=dict)
    _loaded: dict[str, Callable | BackendUnavailableError] = field(default_factory=dict, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def _try_load(self, backend: str) -> Callable | BackendUnavailableError:
        """The implementation of ``backend`` or the reason it cannot run here (loaded once)."""
        if backend not in self._loaded:
            try:
                self._loaded[backend] = self.impls[backend].load()
            except BackendUnavailableError as err:
                self._loaded[backend] = err
        return self._loaded[backend]

    def load(self, backend: str) -> Callable:
        """The implementation of ``backend``, or raise why it cannot run here."""
        found = self._try_load(backend)
        if isinstance(found, BackendUnavailableError):
            raise BackendUnavailableError(
                f"backend {backend!r} is not available for {self.name}: {found}. "
                f"Available here: {self.available()}; use backend='auto' to fall back."
            )
        return found

    def available(self) -> list[str]:
        """Names of the backends that load on this machine (whatever the device)."""
        return [name for name in self.impls if not isinstance(self._try_load(name), BackendUnavailableError)]

    def resolve(self, backend: str, device_type: str, needs_grad: bool = False) -> tuple[str, Callable]:
        """``(name, implementation)`` for the requested backend and the tensors' device type.

        ``auto`` skips backends that cannot take ``device_type`` tensors and, when ``needs_grad``,
        forward-only ones. A backend named explicitly must load and accept the device, else
        :class:`BackendUnavailableError` (so a GPU-only backend is refused for CPU tensors here,
        not by its launcher); it is returned even when gradients are needed (a forward-only
        implementation raises its own clear error then). The device check is made at every call:
        whether a backend takes a device may change at run time (Triton's interpreter).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for {self.name}; expected one of {BACKENDS}")
        if backend != "auto":
            name = backend if backend in self.impls else self.substitutes.get(backend)
            if name is None:
                raise BackendUnavailableError(
                    f"{self.name} has no {backend!r} backend; its backends are {sorted(self.impls)}")
            fn = self.load(name)
            impl = self.impls[name]
            devices = impl.devices()
            if device_type not in devices:
                why = f" ({impl.refusal(device_type)})" if impl.refusal is not None else ""
                raise BackendUnavailableError(
                    f"backend {name!r} of {self.name} takes {sorted(devices)} tensors, not {device_type!r} ones{why}; "
                    "move the tensors or use backend='auto'")
            return name, fn
        order = [name for name in self.auto.get(device_type, ("reference",))
                 if device_type in self.impls[name].devices()
                 and not (needs_grad and not self.impls[name].differentiable)]
        for name in order:
            fn = self._try_load(name)
            if isinstance(fn, BackendUnavailableError):
                continue
            if name != order[0] and order[0] not in self._warned:
                self._warned.add(order[0])
                warnings.warn(f"e3relax_fast: {self.name} has no {order[0]!r} backend ({self._loaded[order[0]]}); "
                              f"using {name!r} instead.", stacklevel=3)
            return name, fn
        raise BackendUnavailableError(f"no backend of {self.name} runs on {device_type!r} tensors here")
