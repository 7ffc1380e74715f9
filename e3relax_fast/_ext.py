"""Compiled backends (``e3relax_fast._C``, csrc/) behind the backend registry: radius graph and
fused message passing.

Importing this module (``graph.py`` does) registers, for op ``"radius_graph"``:

* ``cpu`` — the C++ launcher (threads over centres, cell lists for large crystals) when ``_C``
  imports;
* ``cuda`` — the CUDA launcher (one warp per centre) when ``_C`` was built with CUDA, torch sees a
  GPU and the module's own CUDA runtime finds a device;

and records with :func:`backends.mark_missing` why a backend is absent otherwise (``_C`` not
built, built without nvcc, no driver, ...). Both functions have the reference's signature and
return exactly the reference's output (integers equal, distances equal to the bit).

For op ``"message_passing"`` it registers ``cuda`` (:func:`message_passing_cuda`, the fused kernel,
forward only) under the same conditions. Its CPU launcher :func:`message_passing_cpu` (the same
per-receiver logic) is a plain function for the tests, not a backend: the reference is the CPU
choice.

:func:`build_graph_fixed` is the fixed-capacity variant for CUDA graphs: caller-sized outputs, no
host synchronisation when ``check=False``, and an overflow status instead of silent truncation.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends

OP = "radius_graph"

IMPORT_ERROR: str | None = None
try:
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as exc:  # not built (no compiler, E3RELAX_NO_EXT=1) or built for another Python
    _C = None
    IMPORT_ERROR = f"e3relax_fast._C is not importable ({type(exc).__name__}: {exc})"

# Error bits of the launchers (csrc/radius_graph.h) and the overflow bit of the fixed variant.
ERR_SINGULAR_CELL = 1
ERR_COORD_RANGE = 2
ERR_BAD_PTR = 4
ERR_BAD_RESERVED = 8
ERR_OVERFLOW = 16

# Crystals with more atoms than this use the cell list in the CPU launcher's default path (the
# image box below); 128 on CPUs with AVX-512 (its cell list is the faster one from there), else 768.
CELL_LIST_THRESHOLD = int(getattr(_C, "DEFAULT_CELL_LIST_THRESHOLD", 768))


class GraphCapacityError(RuntimeError):
    """The fixed-capacity graph needs more edges than were allocated."""

    def __init__(self, required: int, capacity: int):
        super().__init__(
            f"radius_graph: the graph has {required} edges but the fixed capacity is {capacity}; "
            f"rebuild with capacity >= {required}"
        )
        self.required = required
        self.capacity = capacity


def error_message(bits: int) -> str:
    """Human-readable message for the launchers' error bits."""
    parts = []
    if bits & ERR_BAD_PTR:
        parts.append("ptr must be a CSR over the atoms (ptr[0] == 0, non-decreasing, ptr[-1] == N)")
    if bits & ERR_SINGULAR_CELL:
        parts.append("every cell must be finite and non-singular")
    if bits & ERR_COORD_RANGE:
        parts.append("positions must be finite with |p| <= 1e6 Å")
    if bits & ERR_BAD_RESERVED:
        parts.append("reserved must be >= 0")
    return "radius_graph: " + ("; ".join(parts) or f"error bits {bits}")


def _inputs(positions: Tensor, cells: Tensor, ptr: Tensor, reserved: Tensor | None, device: torch.device):
    """float64/int64 C-contiguous copies (views when already so) on ``device``."""
    pos = positions.detach().to(device=device, dtype=torch.float64).contiguous()
    cell = cells.detach().to(device=device, dtype=torch.float64).contiguous()
    if cell.dim() != 3 or cell.shape[1:] != (3, 3):
        raise ValueError("radius_graph: cells must have shape (G, 3, 3)")
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError("radius_graph: positions must have shape (N, 3)")
    p = ptr.detach().to(device=device, dtype=torch.int64).contiguous()
    res = None if reserved is None else reserved.detach().to(device=device, dtype=torch.int64).contiguous()
    return pos, cell, p, res


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------
def radius_graph_cpu(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    radius: float = 6.0,
    max_neighbors: int = 50,
    reserved: Tensor | None = None,
    *,
    num_threads: int | None = None,
    cell_list_threshold: int | None = None,
    algo: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reference's :func:`~e3relax_fast.reference.radius_graph.radius_graph`, in C++.

    Extra keyword arguments: ``num_threads`` (default ``torch.get_num_threads()``),
    ``cell_list_threshold`` (crystals with more atoms use the cell list; default: that of ``algo``
    on this CPU, :data:`CELL_LIST_THRESHOLD` for algo 0), ``algo`` (0: default, the symmetric
    image-box enumeration for small crystals and the cell list for large ones, with AVX-512 where
    the CPU has it; 1: the CUDA kernel's warp algorithm emulated on the CPU; 2: brute force with
    exact per-pair image bounds; 3: algo 0 without AVX-512; 1 to 3 exist for the tests).
    Outputs are on ``positions.device``.
    """
    if _C is None:
        raise backends.BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    device = positions.device
    cpu = torch.device("cpu")
    pos, cell, p, res = _inputs(positions, cells, ptr, reserved, cpu)
    out = _C.radius_graph_cpu(
        pos, cell, p, float(radius), int(max_neighbors), res,
        int(num_threads if num_threads is not None else torch.get_num_threads()),
        int(-1 if cell_list_threshold is None else cell_list_threshold),
        int(algo),
    )
    tensors = tuple(torch.from_numpy(a) for a in out)
    if device.type != "cpu":
        tensors = tuple(t.to(device) for t in tensors)
    return tensors  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------
def _stream_handles(device: torch.device) -> tuple[int, int]:
    """(cudaStream_t of the current stream, the DLPack ``stream`` argument naming it)."""
    handle = torch.cuda.current_stream(device).cuda_stream
    return handle, (handle if handle != 0 else 1)  # DLPack: 1 = legacy default stream


def _dl(t: Tensor | None, dl_stream: int):
    """A DLPack capsule of a CUDA tensor for consumption on ``dl_stream`` (the current stream):
    torch then inserts no cross-stream wait, which keeps the calls CUDA-graph capturable."""
    return None if t is None else t.__dlpack__(stream=dl_stream)


def _cuda_select(pos: Tensor, cell: Tensor, p: Tensor, res: Tensor | None, radius: float, k: int):
    """Phase 1 on the current stream: (kept, kept_count, ncand, status, rowptr); no host sync."""
    dev = pos.device
    n = pos.shape[0]
    wfrac = torch.empty((n, 3), dtype=torch.float64, device=dev)
    shift = torch.empty((n, 3), dtype=torch.int32, device=dev)
    kept = torch.empty((max(n * k, 1), 4), dtype=torch.int32, device=dev)
    kept_count = torch.empty(n, dtype=torch.int64, device=dev)
    ncand = torch.empty(n, dtype=torch.int64, device=dev)
    status = torch.zeros(1, dtype=torch.int64, device=dev)
    handle, s = _stream_handles(dev)
    _C.radius_graph_cuda_select(_dl(pos, s), _dl(cell, s), _dl(p, s), float(radius), k, _dl(res, s), _dl(wfrac, s),
                                _dl(shift, s), _dl(kept, s), _dl(kept_count, s), _dl(ncand, s), _dl(status, s), handle)
    rowptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    torch.cumsum(kept_count + 6, 0, out=rowptr[1:])
    return kept, kept_count, ncand, status, rowptr


def _cuda_emit(pos, cell, p, k, kept, kept_count, rowptr, edge_index, offsets, dist):
    handle, s = _stream_handles(pos.device)
    _C.radius_graph_cuda_emit(_dl(pos, s), _dl(cell, s), _dl(p, s), k, _dl(kept, s), _dl(kept_count, s),
                              _dl(rowptr, s), _dl(edge_index, s), _dl(offsets, s), _dl(dist, s), handle)


def radius_graph_cuda(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    radius: float = 6.0,
    max_neighbors: int = 50,
    reserved: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reference's radius graph on a CUDA device (one warp per centre, no global sort).

    One host synchronisation: reading the edge count (with the input-error bits) to allocate the
    outputs. For CUDA graphs use :func:`build_graph_fixed`.
    """
    if _C is None or not getattr(_C, "WITH_CUDA", False):
        raise backends.BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C was built without CUDA")
    device = positions.device
    if device.type != "cuda":
        raise ValueError("radius_graph_cuda: positions must be on a CUDA device")
    k = int(max_neighbors)
    with torch.cuda.device(device):
        pos, cell, p, res = _inputs(positions, cells, ptr, reserved, device)
        kept, kept_count, ncand, status, rowptr = _cuda_select(pos, cell, p, res, radius, k)
        n_edges, err = (int(v) for v in torch.stack((rowptr[-1], status[0])).tolist())  # the one sync
        if err:
            raise ValueError(error_message(err))
        edge_index = torch.empty((2, n_edges), dtype=torch.int64, device=device)
        offsets = torch.empty((n_edges, 3), dtype=torch.int64, device=device)
        dist = torch.empty(n_edges, dtype=torch.float64, device=device)
        if n_edges:
            _cuda_emit(pos, cell, p, k, kept, kept_count, rowptr, edge_index, offsets, dist)
    return edge_index, offsets, rowptr, dist, ncand


# --------------------------------------------------------------------------------------------------
# Fixed capacity (CUDA-graph safe)
# --------------------------------------------------------------------------------------------------
class FixedGraph(NamedTuple):
    """A graph in caller-sized buffers. Edges ``[num_edges, capacity)`` are padding
    (``edge_index == pad_index``, zero offsets and distances); everything else is exactly
    :class:`~e3relax_fast.graph.Graph`'s content (``rowptr`` always describes the full graph).

    num_edges: 0-d int64 tensor, edges of the full graph (may exceed the capacity).
    status: 0-d int64 tensor, 0 when the graph is complete and valid; otherwise error bits
        (:data:`ERR_OVERFLOW` = capacity too small, the others = invalid input).
    """

    edge_index: Tensor
    cell_offsets: Tensor
    rowptr: Tensor
    distances: Tensor
    num_candidates: Tensor
    num_edges: Tensor
    status: Tensor


def check_fixed(graph: FixedGraph) -> None:
    """Raise if ``graph`` is incomplete or its input was invalid (synchronises with the device)."""
    status, n_edges = (int(v) for v in torch.stack((graph.status, graph.num_edges)).tolist())
    if status & ERR_OVERFLOW:
        raise GraphCapacityError(n_edges, graph.distances.shape[0])
    if status:
        raise ValueError(error_message(status))


def build_graph_fixed(
    positions: Tensor,
    cells: Tensor,
    ptr: Tensor,
    capacity: int,
    radius: float = 6.0,
    max_neighbors: int = 50,
    reserved: Tensor | None = None,
    *,
    check: bool = True,
    pad_index: int = -1,
) -> FixedGraph:
    """The radius graph written into buffers of ``capacity`` edges, never silently truncated.

    On CUDA (``_C`` with CUDA) nothing here synchronises with the host except the final check,
    so with ``check=False`` the call can be captured in a CUDA graph: inspect ``status`` (or call
    :func:`check_fixed`) after replay. With ``check=True`` (default) a graph that does not fit
    raises :class:`GraphCapacityError` and invalid input raises ``ValueError``. An upper bound
    that always fits is ``N * (max_neighbors + 6)``.

    Elsewhere (CPU tensors, or CUDA tensors without the ``cuda`` backend) the same contract is
    provided on top of the ``cpu`` backend (or the reference); that path synchronises.
    """
    capacity = int(capacity)
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    device = positions.device
    k = int(max_neighbors)
    if device.type == "cuda" and CUDA_UNAVAILABLE_REASON is None:
        with torch.cuda.device(device):
            pos, cell, p, res = _inputs(positions, cells, ptr, reserved, device)
            kept, kept_count, ncand, status, rowptr = _cuda_select(pos, cell, p, res, radius, k)
            edge_index = torch.full((2, capacity), pad_index, dtype=torch.int64, device=device)
            offsets = torch.zeros((capacity, 3), dtype=torch.int64, device=device)
            dist = torch.zeros(capacity, dtype=torch.float64, device=device)
            if capacity and pos.shape[0]:
                _cuda_emit(pos, cell, p, k, kept, kept_count, rowptr, edge_index, offsets, dist)
            n_edges = rowptr[-1].clone()
            st = status[0] | torch.where(n_edges > capacity, ERR_OVERFLOW, 0)
    else:
        fn = radius_graph_cpu if _C is not None else None
        if fn is None:
            from .reference.radius_graph import radius_graph as fn
        ei, off, rowptr, d, ncand = fn(positions, cells, ptr, radius, k, reserved)
        e = d.shape[0]
        m = min(e, capacity)
        edge_index = torch.full((2, capacity), pad_index, dtype=torch.int64, device=device)
        offsets = torch.zeros((capacity, 3), dtype=torch.int64, device=device)
        dist = torch.zeros(capacity, dtype=torch.float64, device=device)
        edge_index[:, :m] = ei[:, :m]
        offsets[:m] = off[:m]
        dist[:m] = d[:m]
        n_edges = torch.tensor(e, dtype=torch.int64, device=device)
        st = torch.tensor(ERR_OVERFLOW if e > capacity else 0, dtype=torch.int64, device=device)
    graph = FixedGraph(edge_index, offsets, rowptr, dist, ncand, n_edges, st)
    if check:
        check_fixed(graph)
    return graph


# --------------------------------------------------------------------------------------------------
# Fused message passing (csrc/message_passing*.{h,cpp,cu}), forward only
# --------------------------------------------------------------------------------------------------
MP_OP = "message_passing"
_MP_FLOAT_INPUTS = ("x_proj", "vec", "positions", "cells", "edge_weight", "edge_bias")


def _mp_arrays(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph, edge_weight, edge_bias,
               rbf_centres, rowptr, out, *, transpose_weight: bool):
    """The launchers' arrays: floats in ``x_proj``'s dtype, int64 indices, C-contiguous (``edge_weight``
    transposed in memory when asked), receiver-sorted edges with their CSR, and the outputs."""
    dtype, device = x_proj.dtype, x_proj.device
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"message_passing: x_proj must be float32 or float64, got {dtype}")

    def fl(t: Tensor) -> Tensor:
        return t.detach().to(device=device, dtype=dtype).contiguous()

    def i64(t: Tensor) -> Tensor:
        return t.detach().to(device=device, dtype=torch.int64).contiguous()

    n = vec.shape[0]
    ei, off, eg = i64(edge_index), i64(cell_offsets), i64(edge_graph)
    if rowptr is None:  # receiver-sort here (the model always passes sorted edges and their CSR)
        order = torch.argsort(ei[1], stable=True)
        ei, off, eg = ei[:, order].contiguous(), off[order].contiguous(), eg[order].contiguous()
        rowptr = torch.searchsorted(ei[1], torch.arange(n + 1, device=device))
    w = edge_weight.detach().to(device=device, dtype=dtype)
    w = w.t().contiguous().t() if transpose_weight else w.contiguous()
    h = vec.shape[2]
    if out is None:
        ds = torch.empty((n, h), dtype=dtype, device=device)
        dv = torch.empty((n, 3, h), dtype=dtype, device=device)
    else:
        ds, dv = out
        if (ds.shape != (n, h) or dv.shape != (n, 3, h) or ds.dtype != dtype or dv.dtype != dtype
                or ds.device != device or dv.device != device or not ds.is_contiguous() or not dv.is_contiguous()):
            raise ValueError("message_passing: out must be contiguous (N, H) and (N, 3, H) tensors in x_proj's "
                             "dtype on its device")
    arrays = (fl(x_proj), fl(vec), fl(positions), fl(cells), ei, off, eg, i64(rowptr), w, fl(edge_bias),
              fl(rbf_centres))
    return arrays, ds, dv


def message_passing_cpu(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    edge_index: Tensor,
    cell_offsets: Tensor,
    edge_graph: Tensor,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
    rowptr: Tensor | None = None,
    *,
    num_threads: int | None = None,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The C++ CPU launcher of the fused message op (the CUDA kernel's per-receiver logic, on threads).

    Same arguments and results as :func:`e3relax_fast.reference.message_passing.message_passing`
    (no autograd: outputs are detached), CPU tensors only. With ``rowptr`` the edges must be
    receiver-sorted and ``rowptr`` their receiver CSR; without it they are sorted here. ``out``:
    optional ``(ds, dv)`` buffers to write (every element is written). Not a registered backend (the
    reference is the CPU choice); it exists to test the kernel logic without a GPU.
    """
    if _C is None:
        raise backends.BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    if x_proj.device.type != "cpu":
        raise ValueError("message_passing_cpu: tensors must be on the CPU")
    arrays, ds, dv = _mp_arrays(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph, edge_weight,
                                edge_bias, rbf_centres, rowptr, out, transpose_weight=False)
    _C.message_passing_cpu(*arrays, float(rbf_coeff), float(cutoff), ds, dv,
                           int(num_threads if num_threads is not None else torch.get_num_threads()))
    return ds, dv


def message_passing_cuda(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    edge_index: Tensor,
    cell_offsets: Tensor,
    edge_graph: Tensor,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
    rowptr: Tensor | None = None,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Backend ``cuda`` of op ``message_passing``: the fused CUDA kernel, forward only (inference).

    Same arguments and results as :func:`e3relax_fast.reference.message_passing.message_passing`.
    One block per receiver, threads over channels, no atomics (deterministic), no host
    synchronisation (CUDA-graph capturable when ``rowptr`` is given). With ``rowptr`` the edges must
    be receiver-sorted and ``rowptr`` their receiver CSR (a receiver whose range holds another
    receiver's edge or out-of-range indices gets NaN outputs); without it they are sorted here.

    Raises:
        RuntimeError: gradients are required (grad mode on and an input requires grad); use
            ``torch.no_grad()`` / ``torch.inference_mode()`` or a differentiable backend.
    """
    if _C is None or not getattr(_C, "WITH_CUDA", False):
        raise backends.BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C was built without CUDA")
    if torch.is_grad_enabled():
        tensors = (x_proj, vec, positions, cells, edge_weight, edge_bias, rbf_centres)
        needs = [name for name, t in zip(_MP_FLOAT_INPUTS + ("rbf_centres",), tensors, strict=True) if t.requires_grad]
        if needs:
            raise RuntimeError(
                f"message_passing backend 'cuda' is forward only (inference) but gradients are required for "
                f"{', '.join(needs)}; run under torch.no_grad()/torch.inference_mode(), or use a differentiable "
                f"backend ('triton', 'cueq' or 'reference')"
            )
    device = x_proj.device
    if device.type != "cuda":
        raise ValueError("message_passing_cuda: tensors must be on a CUDA device")
    with torch.cuda.device(device):
        arrays, ds, dv = _mp_arrays(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph,
                                    edge_weight, edge_bias, rbf_centres, rowptr, out, transpose_weight=True)
        handle, s = _stream_handles(device)
        fn = _C.message_passing_cuda_f64 if ds.dtype == torch.float64 else _C.message_passing_cuda_f32
        fn(*(_dl(a, s) for a in arrays), float(rbf_coeff), float(cutoff), _dl(ds, s), _dl(dv, s), handle)
    return ds, dv


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------
def _cuda_reason() -> str | None:
    """None when the cuda backend can run here, else why not."""
    if _C is None:
        return IMPORT_ERROR
    if not getattr(_C, "WITH_CUDA", False):
        return "e3relax_fast._C was built without CUDA (nvcc not found at install time, or E3RELAX_NO_CUDA=1)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not _C.cuda_available():
        return _C.cuda_status()
    return None


if _C is not None:
    backends.register(OP, "cpu", radius_graph_cpu)
else:
    backends.mark_missing(OP, "cpu", IMPORT_ERROR or "e3relax_fast._C missing")
CUDA_UNAVAILABLE_REASON = _cuda_reason()
if CUDA_UNAVAILABLE_REASON is None:
    backends.register(OP, "cuda", radius_graph_cuda)
else:
    backends.mark_missing(OP, "cuda", CUDA_UNAVAILABLE_REASON)
if CUDA_UNAVAILABLE_REASON is None:
    backends.register(MP_OP, "cuda", message_passing_cuda)
else:
    backends.mark_missing(MP_OP, "cuda", CUDA_UNAVAILABLE_REASON)
