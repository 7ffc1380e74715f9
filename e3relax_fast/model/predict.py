"""The one loop that runs a model over many crystals: ``relax_batch``, evaluation and the training
loop's validation all predict through :func:`predict_batches`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..batch import Batch
from ..geometry import MAX_NEIGHBORS, RADIUS

PRECISIONS = ("default", "tf32", "bf16")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming it when it is not a device name or names
    an accelerator this torch cannot use (checked before any work, instead of failing mid-run)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available here (torch.cuda.is_available() is False;"
                             f" torch {torch.__version__}); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


@contextlib.contextmanager
def inference_precision(precision: str, device: torch.device):
    """Matmul arithmetic for a forward pass: ``"default"`` (the model dtype's own; torch's global TF32
    switches left as they are), ``"tf32"`` (TF32 tensor-core matmuls on CUDA) or ``"bf16"`` (autocast);
    restores the global TF32 switches afterwards."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


@dataclass
class Prediction:
    """The last layer's prediction for one batch.

    batch: the input batch as the model saw it (on the model's device, graph included).
    positions: ``(N, 3)`` Å and cells ``(G, 3, 3)`` Å (rows = lattice vectors), in the model's dtype
        and on its device.
    """

    batch: Batch
    positions: Tensor
    cells: Tensor

    def finite(self) -> np.ndarray:
        """``(G,)`` bool: the crystal's predicted positions and cell are all finite."""
        bad_atoms = (~torch.isfinite(self.positions).all(dim=1)).to(torch.int64)
        bad_per_graph = torch.zeros(self.batch.num_graphs, dtype=torch.int64, device=self.positions.device)
        bad_per_graph.index_add_(0, self.batch.graph_index(), bad_atoms)
        return (torch.isfinite(self.cells).flatten(1).all(dim=1) & (bad_per_graph == 0)).cpu().numpy()

    def per_structure(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(positions (n, 3), cell (3, 3))]`` per crystal, float64 NumPy arrays in Å."""
        positions = self.positions.to(torch.float64).cpu().numpy()
        cells = self.cells.to(torch.float64).cpu().numpy()
        splits = self.batch.ptr[1:-1].cpu().numpy()
        return list(zip(np.split(positions, splits), cells, strict=True))


def predict_batches(model: nn.Module, batches: Iterable[Batch], device: str | torch.device | None = None,
                    precision: str = "default", graph_backend: str = "auto", radius: float | None = None,
                    max_neighbors: int | None = None) -> Iterator[Prediction]:
    """Run ``model`` on each batch (inference mode, eval mode restored afterwards).

    A batch without a graph gets one on ``device`` from its float64 inputs — the same graph whatever
    the model's dtype — with ``radius`` (Å) / ``max_neighbors`` (default: the model's) and
    ``graph_backend``; the batch is then cast to the model's dtype.

    Args:
        model: an :class:`~e3relax_fast.model.E3Relax` (or any module with its interface; batches are
            cast to the dtype of its parameters, if it has any).
        batches: :class:`~e3relax_fast.batch.Batch` objects, consumed lazily.
        device: where to run; ``None``: the model's device.
        precision: matmul arithmetic (:func:`inference_precision`).
    """
    param = next(model.parameters(), None)  # None for a parameter-free model (e.g. a baseline)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    radius = getattr(model, "radius", RADIUS) if radius is None else radius
    max_neighbors = getattr(model, "max_neighbors", MAX_NEIGHBORS) if max_neighbors is None else max_neighbors
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.inference_mode():
                batch = batch.to(device)
                if not batch.has_graph:
                    batch = batch.to(dtype=torch.float64).with_graph(radius, max_neighbors, backend=graph_backend)
                if param is not None:
                    batch = batch.to(dtype=param.dtype)
                with inference_precision(precision, device):
                    out = model(batch)
            yield Prediction(batch, out.positions[-1], out.cells[-1])
    finally:
        model.train(was_training)
