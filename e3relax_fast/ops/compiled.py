"""The compiled extension ``e3relax_fast._C`` (csrc/): its loader and the Python wrappers of its ops.

* :func:`radius_graph_cpu` — the C++ radius graph (threads over centres; small crystals by a
  symmetric image box, large ones by a cell list; AVX-512 paths where the CPU has them);
* :func:`radius_graph_cuda` — the CUDA radius graph (one warp per centre), and its two phases
  :func:`cuda_select` / :func:`cuda_emit` for the fixed-capacity graph of :mod:`e3relax_fast.graph`;
* :func:`message_passing_cuda` — the fused message op, forward only; :func:`message_passing_cpu` —
  its per-receiver logic on CPU threads, for the tests;
* :func:`message_passing_fused_cpu`, :func:`lattice_message_fused_cpu` — backend ``cpu`` of the two
  gated message ops: fused per receiver / atom, the radial projection on a window of the basis
  (:func:`radial_window`), AVX-512 where the CPU has it; the atom–atom op with a fused backward
  (training), the lattice op forward only;
* :func:`frame_bookkeeping`, :func:`frame_map_back`, :func:`frame_p1_certificate` — backend ``cpu`` of
  the canonical frame's three host ops (NumPy arrays, one crystal per call).

Every wrapper has its reference twin's signature and returns exactly the reference's result (graph:
integers equal, distances equal to the bit). Whether a backend can run here is decided once, at
import: :data:`IMPORT_ERROR` and :func:`cuda_reason` say why not; :mod:`.table` reads them.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..reference.frame_bookkeeping import FrameError
from .registry import BackendUnavailableError

IMPORT_ERROR: str | None = None
try:
    _C = importlib.import_module("e3relax_fast._C")
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

#: Paths of the C++ radius graph (the integer the extension takes; see :func:`radius_graph_cpu`).
GRAPH_PATHS = {"auto": 0, "warp_emulation": 1, "brute_force": 2, "portable": 3}


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


def graph_inputs(positions: Tensor, cells: Tensor, ptr: Tensor, reserved: Tensor | None, device: torch.device):
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
    path: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reference's :func:`~e3relax_fast.reference.radius_graph.radius_graph`, in C++.

    Extra keyword arguments: ``num_threads`` (default ``torch.get_num_threads()``),
    ``cell_list_threshold`` (crystals with more atoms use the cell list; default: the measured
    crossover of the chosen path on this CPU, :data:`CELL_LIST_THRESHOLD` for ``"auto"``), ``path``:

    * ``"auto"``: the symmetric image box for small crystals and the cell list for large ones, with
      AVX-512 where the CPU has it;
    * ``"portable"``: the same without AVX-512 (what CPUs without it run);
    * ``"brute_force"``: exact per-pair image bounds (or the cell list above the threshold);
    * ``"warp_emulation"``: the CUDA kernel's warp algorithm emulated lane by lane on the CPU.

    All paths give the same result; the last three exist for the tests and benchmarks.
    Outputs are on ``positions.device``.
    """
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    device = positions.device
    cpu = torch.device("cpu")
    pos, cell, p, res = graph_inputs(positions, cells, ptr, reserved, cpu)
    out = _C.radius_graph_cpu(
        pos, cell, p, float(radius), int(max_neighbors), res,
        int(num_threads if num_threads is not None else torch.get_num_threads()),
        int(-1 if cell_list_threshold is None else cell_list_threshold),
        GRAPH_PATHS[path],
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


def cuda_select(pos: Tensor, cell: Tensor, p: Tensor, res: Tensor | None, radius: float, k: int):
    """Phase 1 of the CUDA graph on the current stream, no host sync: per centre the kept candidates
    ``kept`` / ``kept_count``, the candidate counts ``ncand``, the input-error bits ``status`` and ``rowptr``."""
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


def cuda_emit(pos, cell, p, k, kept, kept_count, rowptr, edge_index, offsets, dist):
    """Phase 2 of the CUDA graph: write the edges of :func:`cuda_select`'s result into caller buffers."""
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
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C was built without CUDA")
    device = positions.device
    if device.type != "cuda":
        raise ValueError("radius_graph_cuda: positions must be on a CUDA device")
    k = int(max_neighbors)
    with torch.cuda.device(device):
        pos, cell, p, res = graph_inputs(positions, cells, ptr, reserved, device)
        kept, kept_count, ncand, status, rowptr = cuda_select(pos, cell, p, res, radius, k)
        n_edges, err = (int(v) for v in torch.stack((rowptr[-1], status[0])).tolist())  # the one sync
        if err:
            raise ValueError(error_message(err))
        edge_index = torch.empty((2, n_edges), dtype=torch.int64, device=device)
        offsets = torch.empty((n_edges, 3), dtype=torch.int64, device=device)
        dist = torch.empty(n_edges, dtype=torch.float64, device=device)
        if n_edges:
            cuda_emit(pos, cell, p, k, kept, kept_count, rowptr, edge_index, offsets, dist)
    return edge_index, offsets, rowptr, dist, ncand


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
    optional ``(ds, dv)`` buffers to write (every element is written). Not a backend of the op
    table (backend ``cpu`` is :func:`message_passing_fused_cpu`); it exists to test the CUDA kernel's
    logic without a GPU.
    """
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    if x_proj.device.type != "cpu":
        raise ValueError("message_passing_cpu: tensors must be on the CPU")
    arrays, ds, dv = _mp_arrays(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph, edge_weight,
                                edge_bias, rbf_centres, rowptr, out, transpose_weight=False)
    _C.message_passing_cuda_emulated(*arrays, float(rbf_coeff), float(cutoff), ds, dv,
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
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C was built without CUDA")
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
# Backend ``cpu`` of the gated message ops (csrc/fused_cpu.h, message_passing_cpu*, lattice_message_cpu*)
# --------------------------------------------------------------------------------------------------
#: ``radial=`` of the fused CPU ops: ``"window"`` evaluates the radial projection on the window of
#: :func:`radial_window` where the basis has one (else on every centre), ``"exact"`` on every centre.
RADIAL_MODES = ("window", "exact")
#: ``path=`` of the fused CPU ops: AVX-512 where the CPU has it, or the portable C++ (for the tests).
FUSED_PATHS = {"auto": 0, "portable": 1}


def radial_window(rbf_centres: Tensor, rbf_coeff: float,
                  radial: str = "window") -> tuple[int, int, float, float, float]:
    """The window the fused CPU ops use for this basis: ``(halfwidth, size, first centre, spacing, tail)``
    (csrc/radial_window.h; halfwidth -1 and size R: every centre). It is the rule of
    :func:`e3relax_fast.reference.radial_window.radial_window`; tail bounds the dropped Gaussians."""
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    centres = rbf_centres.detach().to(device="cpu", dtype=torch.float64).contiguous()
    return tuple(_C.radial_window(centres, float(rbf_coeff), _radial_exact(radial)))


def _radial_exact(radial: str) -> bool:
    if radial not in RADIAL_MODES:
        raise ValueError(f"radial must be one of {RADIAL_MODES}, got {radial!r}")
    return radial == "exact"


def _forward_only(op: str, named: dict) -> None:
    """Refuse inputs that need a gradient the fused CPU op does not compute."""
    if torch.is_grad_enabled():
        needs = [name for name, t in named.items() if isinstance(t, Tensor) and t.requires_grad]
        if needs:
            raise RuntimeError(
                f"{op} backend 'cpu' is forward only (inference) but gradients are required for {', '.join(needs)}; "
                f"run under torch.no_grad()/torch.inference_mode(), or use a differentiable backend ('reference')")


def _check_cpu(op: str, *tensors: Tensor) -> None:
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{op}: backend 'cpu' takes CPU tensors")


def message_passing_fused_cpu(
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
    radial: str = "window",
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Backend ``cpu`` of op ``message_passing``: fused per receiver, with a fused backward.

    Same arguments and results as :func:`e3relax_fast.reference.message_passing.message_passing`:
    per receiver over its CSR edges, the geometry, the radial projection on its window, the gather
    of the source projection, the gate and the sums stay in registers and L1 (no E x H tensor).
    With ``rowptr`` the edges must be receiver-sorted and ``rowptr`` their receiver CSR; without it
    they are sorted here. Keywords: ``num_threads`` (default ``torch.get_num_threads()``; the forward's
    threads), ``out`` (``(ds, dv)`` buffers to write, every element; not with gradients), ``radial``
    (:data:`RADIAL_MODES`), ``path`` (:data:`FUSED_PATHS`).

    Gradients (grad mode on and a float input that requires grad) flow to ``x_proj``, ``vec``,
    ``positions``, ``cells``, ``edge_weight`` and ``edge_bias`` through the fused backward
    (csrc/message_passing_backward_cpu.cpp: one thread, each edge's geometry, window and gate computed
    again, so nothing E-sized is kept between forward and backward); not to ``rbf_centres``.

    Raises:
        RuntimeError: ``rbf_centres`` requires grad; ValueError: invalid edges, shapes, a non-CPU
        tensor, or ``out`` with gradients.
    """
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    _forward_only("message_passing", {"rbf_centres": rbf_centres})
    _check_cpu("message_passing", x_proj, vec, positions, cells, edge_index, edge_weight)
    floats = (x_proj, vec, positions, cells, edge_weight, edge_bias)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in floats)
    if grad and out is not None:
        raise ValueError("message_passing: out= buffers cannot carry gradients; call without out")
    arrays, ds, dv = _mp_arrays(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph, edge_weight,
                                edge_bias, rbf_centres, rowptr, out, transpose_weight=False)
    options = (float(rbf_coeff), float(cutoff), int(num_threads if num_threads is not None else
                                                    torch.get_num_threads()), _radial_exact(radial), FUSED_PATHS[path])
    if grad:
        return _FusedMessagePassing.apply(options, arrays, *floats)
    _C.message_passing_fused_cpu(*arrays, *options[:2], ds, dv, *options[2:])
    return ds, dv


class _FusedMessagePassing(torch.autograd.Function):
    """:func:`message_passing_fused_cpu` as an autograd node: the fused forward, and the fused
    backward on the same launcher arrays (``arrays``; ``floats`` are the caller's six float inputs,
    passed only so that autograd routes their gradients)."""

    @staticmethod
    def forward(ctx, options, arrays, *floats):
        coeff, cutoff, threads, exact, path = options
        x = arrays[0]
        ds = x.new_empty((x.shape[0], arrays[1].shape[2]))
        dv = x.new_empty(arrays[1].shape)
        _C.message_passing_fused_cpu(*arrays, coeff, cutoff, ds, dv, threads, exact, path)
        # Saved as tensors: an in-place change of an input before the backward is then an error.
        ctx.save_for_backward(*arrays)
        ctx.coeff, ctx.cutoff, ctx.exact, ctx.path = coeff, cutoff, exact, path
        ctx.dtypes = [t.dtype for t in floats]
        return ds, dv

    @staticmethod
    def backward(ctx, gds, gdv):
        arrays = ctx.saved_tensors
        # The launcher's float inputs in the order of floats: x_proj, vec, positions, cells, W, b.
        grads = [torch.zeros_like(arrays[k]) for k in (0, 1, 2, 3, 8, 9)]
        dtype = arrays[0].dtype
        _C.message_passing_backward_cpu(*arrays, ctx.coeff, ctx.cutoff, gds.to(dtype).contiguous(),
                                        gdv.to(dtype).contiguous(), *grads, ctx.exact, ctx.path)
        return (None, None, *(g.to(t) if need else None for g, t, need in
                              zip(grads, ctx.dtypes, ctx.needs_input_grad[2:], strict=True)))


def lattice_message_fused_cpu(
    x_proj: Tensor,
    vec: Tensor,
    positions: Tensor,
    cells: Tensor,
    graph_index: Tensor,
    centres: Tensor | None,
    k: int,
    edge_weight: Tensor,
    edge_bias: Tensor,
    rbf_centres: Tensor,
    rbf_coeff: float,
    cutoff: float,
    *,
    num_threads: int | None = None,
    out: tuple[Tensor, Tensor] | None = None,
    radial: str = "window",
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Backend ``cpu`` of op ``lattice_message``: fused per atom, forward only (inference).

    Same arguments and results as :func:`e3relax_fast.reference.lattice_message.lattice_message`
    (``(ds, v_out)``); keywords as :func:`message_passing_fused_cpu`.
    """
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    floats = dict(x_proj=x_proj, vec=vec, positions=positions, cells=cells, centres=centres, edge_weight=edge_weight,
                  edge_bias=edge_bias)
    _forward_only("lattice_message", floats)
    _check_cpu("lattice_message", x_proj, vec, positions, cells, graph_index, edge_weight)
    dtype = x_proj.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"lattice_message: x_proj must be float32 or float64, got {dtype}")

    def fl(t: Tensor) -> Tensor:
        return t.detach().to(dtype).contiguous()

    n, h = vec.shape[0], vec.shape[-1]
    if out is None:
        out = (torch.empty((n, h), dtype=dtype), torch.empty((n, 3, h), dtype=dtype))
    ds, v_out = out
    _C.lattice_message_fused_cpu(fl(x_proj), fl(vec), fl(positions), fl(cells),
                                 graph_index.detach().to(torch.int64).contiguous(),
                                 None if centres is None else fl(centres), int(k), edge_weight.detach().to(dtype),
                                 fl(edge_bias), fl(rbf_centres), float(rbf_coeff), float(cutoff), ds, v_out,
                                 int(num_threads if num_threads is not None else torch.get_num_threads()),
                                 _radial_exact(radial), FUSED_PATHS[path])
    return ds, v_out


def cuda_reason() -> str | None:
    """None when the CUDA kernels can run here, else why not."""
    if _C is None:
        return IMPORT_ERROR
    if not getattr(_C, "WITH_CUDA", False):
        return "e3relax_fast._C was built without CUDA (nvcc not found at install time, or E3RELAX_NO_CUDA=1)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not _C.cuda_available():
        return _C.cuda_status()
    return None


CUDA_UNAVAILABLE_REASON = cuda_reason()


# --- the canonical frame's host ops (csrc/frame_cpu.h) -----------------------------------------------


def frame_bookkeeping(basis, numbers, x_std, normalizer_linear, normalizer_shift, polar, rotations, translations,
                      moving, mapping, rotation, lattice, positions, symprec):
    """Backend ``cpu`` of op ``frame_bookkeeping``: same arguments and results as
    :func:`e3relax_fast.reference.frame_bookkeeping.frame_bookkeeping` (NumPy arrays, one crystal).

    Raises:
        FrameError: as the reference, with its messages.
    """
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    # nanobind converts arrays of another dtype or layout (a copy); the frame's own are passed as they are.
    message, arrays = _C.frame_bookkeeping(basis, numbers, x_std, normalizer_linear, normalizer_shift, polar,
                                           rotations, translations, moving, mapping, rotation, lattice, positions,
                                           float(symprec))
    if message:
        raise FrameError(message)
    return arrays


def frame_map_back(positions, cell, frame_positions, frame_cell, rotations, permutations, choice_linear, choice_shift,
                   choice_images, atom_map, images, offset, user_cell, rotation, symmetrize: bool):
    """Backend ``cpu`` of op ``frame_map_back``: same arguments and results as
    :func:`e3relax_fast.reference.frame_map_back.frame_map_back` (NumPy arrays, one crystal)."""
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    return _C.frame_map_back(positions, cell, frame_positions, frame_cell, rotations, permutations, choice_linear,
                             choice_shift, choice_images, atom_map, images, offset, user_cell, rotation,
                             bool(symmetrize))


def frame_p1_certificate(numbers, x, basis, tolerance) -> bool:
    """Backend ``cpu`` of op ``frame_p1_certificate``: same arguments and result as
    :func:`e3relax_fast.reference.frame_p1_certificate.frame_p1_certificate` (NumPy arrays, one crystal)."""
    if _C is None:
        raise BackendUnavailableError(IMPORT_ERROR or "e3relax_fast._C missing")
    return _C.frame_p1_certificate(numbers, x, basis, float(tolerance))
