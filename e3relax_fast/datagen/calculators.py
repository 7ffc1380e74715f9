"""Batched calculators for :class:`~e3relax_fast.datagen.fire.BatchedFIRE`: adapters for any ASE
calculator and for CHGNet, and :func:`make_calculator` by name.

A batched calculator is any callable ``calc(list_of_atoms) -> (energies (B,) eV, forces, stresses)``
(see :mod:`e3relax_fast.datagen.fire` for the contract and units).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np

from ..io.structures import to_pymatgen

BatchCalculator = Callable[[list], tuple]

#: eV/Å³ per GPa.
GPA = 1.0 / 160.21766208


class ASEBatchCalculator:
    """Batched-calculator adapter for any ASE calculator: evaluates the structures one by one.

    A structure whose evaluation raises gets NaN results (reported as an error by the optimiser)
    instead of stopping the batch; ``KeyboardInterrupt`` still propagates.
    """

    def __init__(self, calculator) -> None:
        self.calculator = calculator

    def __call__(self, atoms_list: Sequence) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        energies = np.full(len(atoms_list), np.nan)
        forces = [np.full((len(a), 3), np.nan) for a in atoms_list]
        stresses = np.full((len(atoms_list), 3, 3), np.nan)
        for k, atoms in enumerate(atoms_list):
            atoms.calc = self.calculator
            try:
                energies[k] = atoms.get_potential_energy()
                forces[k] = np.asarray(atoms.get_forces(), dtype=np.float64)
                stresses[k] = atoms.get_stress(voigt=False)
            except Exception:  # any failure of a third-party calculator marks this structure only
                energies[k] = np.nan
            finally:
                atoms.calc = None
        return energies, forces, stresses


@contextlib.contextmanager
def _first_order_autograd():
    """Make ``torch.autograd.grad`` skip ``create_graph`` while active.

    CHGNet's forward asks for ``create_graph=True`` (needed for training on forces); for
    inference that builds a double-backward graph that costs time and memory and grows with the
    batch. Gradients are unchanged (float32 noise). Not thread-safe: patches a module attribute.
    """
    import torch

    original = torch.autograd.grad

    def grad(*args, **kwargs):
        kwargs["create_graph"] = False
        return original(*args, **kwargs)

    torch.autograd.grad = grad
    try:
        yield
    finally:
        torch.autograd.grad = original


def flushing_subnormals() -> bool:
    """Whether this thread's CPU arithmetic flushes subnormal numbers (x86 FTZ/DAZ), read back: under
    that mode a subnormal input or product is 0."""
    import torch

    return float(torch.tensor([1e-39], dtype=torch.float32).mul(2.0)) == 0.0


@contextlib.contextmanager
def _subnormals_flushed():
    """CPU arithmetic on this thread with subnormal numbers flushed to zero (``torch.set_flush_denormal``:
    x86 FTZ/DAZ) while active; the previous mode is restored after.

    CHGNet's float32 evaluation meets subnormal numbers, which x86 CPUs compute with many times
    slower than normal ones: batched relaxation made 2,891 pairs/h with them flushed against 1,819
    (``bench/bench_datagen.py``, bench/RESULTS.md), to the same final energies. Torch's other
    intra-op threads keep their own mode (pair generation runs one thread per process)."""
    import torch

    was_on = flushing_subnormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


class CHGNetBatchCalculator:
    """Batched-calculator adapter for CHGNet (``chgnet`` package): graphs are built per structure,
    the model runs on up to ``batch_size`` structures per forward call
    (``CHGNet.predict_graph``). Energies are converted from eV/atom to eV, stress from GPa to eV/Å³.

    Args:
        model: a ``chgnet.model.CHGNet``; ``None`` loads the pretrained one shipped in the wheel
            (``model_name``, default "0.3.0").
        batch_size: structures per forward call.
        device: torch device for a model loaded here.
        first_order: skip CHGNet's ``create_graph=True`` (see :func:`_first_order_autograd`);
            same results, faster.
        flush_subnormals: evaluate with subnormal numbers flushed to zero on the calling thread (see
            :func:`_subnormals_flushed`); same minima, faster on CPU.
    """

    def __init__(self, model=None, batch_size: int = 32, device: str = "cpu", first_order: bool = True,
                 model_name: str = "0.3.0", flush_subnormals: bool = True) -> None:
        from chgnet.model import CHGNet

        self.model = model if model is not None else CHGNet.load(model_name=model_name, verbose=False,
                                                                 use_device=device)
        self.batch_size = batch_size
        self.first_order = first_order
        self.flush_subnormals = flush_subnormals
        # A structure with an atom that has no neighbour within the cutoff fails (NaN results).
        self.model.graph_converter.set_isolated_atom_response("error")

    def __call__(self, atoms_list: Sequence) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        energies = np.full(len(atoms_list), np.nan)
        forces = [np.full((len(a), 3), np.nan) for a in atoms_list]
        stresses = np.full((len(atoms_list), 3, 3), np.nan)
        graphs, where = [], []
        for k, atoms in enumerate(atoms_list):
            try:
                structure = to_pymatgen(atoms.numbers, atoms.positions, atoms.cell.array)
                graphs.append(self.model.graph_converter(structure))
                where.append(k)
            except (ValueError, RuntimeError):  # e.g. an isolated atom: this structure fails, the batch goes on
                continue
        if not graphs:
            return energies, forces, stresses
        with contextlib.ExitStack() as stack:
            if self.first_order:
                stack.enter_context(_first_order_autograd())
            if self.flush_subnormals:
                stack.enter_context(_subnormals_flushed())
            predictions = self.model.predict_graph(graphs, task="efs", batch_size=self.batch_size)
        if isinstance(predictions, dict):
            predictions = [predictions]
        for k, p in zip(where, predictions, strict=True):
            n = len(atoms_list[k])
            energies[k] = float(p["e"]) * (n if self.model.is_intensive else 1)
            forces[k] = np.asarray(p["f"], dtype=np.float64)
            stresses[k] = np.asarray(p["s"], dtype=np.float64) * GPA
        return energies, forces, stresses


def as_batch_calculator(calculator) -> BatchCalculator:
    """An ASE calculator (has ``get_potential_energy``/``calculate``) wrapped in
    :class:`ASEBatchCalculator`; any other callable is returned unchanged."""
    if hasattr(calculator, "calculate") and hasattr(calculator, "get_property"):
        return ASEBatchCalculator(calculator)
    if not callable(calculator):
        raise TypeError(f"not a calculator: {calculator!r}")
    return calculator




def make_calculator(name: str, batched: bool, batch_size: int = 32, device: str = "cpu"):
    """``"chgnet"`` (pretrained CHGNet 0.3.0), ``"emt"`` (ASE's EMT) or ``"module:factory"`` (an
    ASE calculator class or factory). With ``batched`` the result is a batched calculator for
    :class:`~e3relax_fast.fire.BatchedFIRE`, else an ASE calculator."""
    if name == "chgnet":
        if batched:
            return CHGNetBatchCalculator(batch_size=batch_size, device=device)
        from chgnet.model import CHGNetCalculator

        # An isolated atom fails the structure, as in the batched adapter.
        return CHGNetCalculator(use_device=device, on_isolated_atoms="error")
    if name == "emt":
        from ase.calculators.emt import EMT

        calc = EMT()
    elif ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        calc = getattr(importlib.import_module(module), attr)()
    else:
        raise ValueError(f"unknown calculator {name!r}: use chgnet, emt or module:factory")
    return ASEBatchCalculator(calc) if batched else calc


