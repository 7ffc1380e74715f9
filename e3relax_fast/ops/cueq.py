"""cuEquivariance backend of the atom–atom message op (spec §6 Step B): backend ``"cueq"``.

Twin of :func:`e3relax_fast.reference.message_passing.message_passing`, same signature. The
geometry, the radial basis and the edge projection ``W f(d) + b`` are computed in PyTorch with the
reference helpers; the per-edge scalar–vector product, the gathers of the source features and the
sum over each receiver's incoming edges run as one cuequivariance segmented polynomial
(:func:`message_descriptor`), executed by ``cuequivariance_torch.SegmentedPolynomial``:

* CUDA tensors and ``cuequivariance_ops_torch`` installed (``pip install 'e3relax-fast[cueq-gpu]'``
  for a CUDA 12 torch, ``[cueq-gpu-cu13]`` for CUDA 13): method ``"uniform_1d"`` (cuequivariance's
  CUDA kernel; gathers and scatter inside the kernel).
* otherwise method ``"naive"`` (cuequivariance's PyTorch einsum path; the scatter is a
  ``scatter_add_``). On CPU this is the only method and is used silently; on a CUDA device it is
  reported once with a warning. Its "opt_einsum_fx not available" log line is silenced.

The polynomial, with H channels (uniform multiplicity; O(3) irreps, ``ir_mul`` layout):

======  =================================  ===============  ===========================
buffer  irreps                             per              tensor passed
======  =================================  ===============  ===========================
a       ``Hx0e + Hx0e + Hx0e`` (3 seg.)    edge             gate ``W f(d_e) + b``, (E, 3H)
b       ``Hx0e + Hx0e + Hx0e`` (3 seg.)    node, gathered   ``x_proj`` (N, 3H), index j
c       ``Hx1o`` (segment (3, H))          node, gathered   ``vec`` (N, 3, H) as (N, 3H), index j
d       ``1x1o`` (segment (3,))            edge             ``u_e = -r_e / |r_e|``, (E, 3)
E       ``Hx0e``                           node, scattered  ``ds`` (N, H), index i
F       ``Hx1o`` (segment (3, H))          node, scattered  ``dv`` (N, 3H) -> (N, 3, H), index i
======  =================================  ===============  ===========================

with three operations (``[b1|b2|b3] = a ⊙ b / √3`` is never formed):

* ``a[2]_u · b[2]_u -> E_u``, coefficient 1/√3                              (ds += b3)
* ``a[0]_u · b[0]_u · c_iu -> F_ju``, coefficient CG(0e,1o→1o)_ij / √(3H)   (dv += b1 ⊙ vec[j] / √H)
* ``a[1]_u · b[1]_u · d_i -> F_ju``, coefficient CG(1o,0e→1o)_ij / √(3H)    (dv += u ⊗ b2 / √H)

The Clebsch–Gordan tensors of these couplings are the 3x3 identity in cuequivariance's real basis
of l=1, which is (x, y, z) (checked in the tests). After ``flatten_coefficient_modes()`` every
operand is H-uniform (1D segments of extent H, or 0D for ``d``), as ``uniform_1d`` requires: 1 + 3
+ 3 paths.

Layout: cuequivariance's ``ir_mul`` layout of ``Hx1o`` is (3, H) per node, xyz outer and channel
inner, which is exactly our ``(N, 3, H)`` memory: ``vec.reshape(N, 3H)`` and ``dv.view(N, 3, H)``
are free (no permutation). The ``mul_ir`` layout used by e3nn and cuequivariance's high-level
modules would be (H, 3) per node, i.e. ``vec.transpose(1, 2)``, a copy we avoid.

Parity: u is a polar vector (odd under inversion, ``1o``) like ``vec`` and ``dv``; the gates and
``x_proj`` are true scalars (``0e``). Both couplings 0e x 1o -> 1o and 1o x 0e -> 1o are therefore
O(3)-equivariant; declaring u as ``1e`` would make the second coupling 1e x 0e -> 1e, inconsistent
with ``dv``.

Precision: ``math_dtype`` is left unset, so the computation runs in the working dtype (float32 or
float64), as in the reference. Determinism: on CPU the naive scatter is deterministic; on CUDA the
scatter (``scatter_add_`` or the kernel's) uses atomic float adds.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..geometry import edge_vectors, safe_norm
from ..reference.message_passing import message_passing as _reference_message_passing
from ..reference.rbf import radial_basis

if TYPE_CHECKING:
    import cuequivariance as cue

# cuequivariance pulls in sympy (~1 s): it is imported on first use; the op table only checks it is installed.
FOUND = all(importlib.util.find_spec(name) is not None for name in ("cuequivariance", "cuequivariance_torch"))

_HAS_OPS: bool | None = None  # cuequivariance_ops_torch importable (checked on first CUDA call)
_MODULES: dict[tuple[int, str, str], torch.nn.Module] = {}
_WARNED_NAIVE_ON_CUDA = False


def message_descriptor(hidden: int) -> cue.EquivariantPolynomial:
    """The Step B polynomial for ``hidden`` channels (see the module docstring), with its O(3)
    irreps in ``ir_mul`` layout. Coefficient modes are not yet flattened."""
    import cuequivariance as cue

    h = hidden
    scalars3 = cue.SegmentedOperand([(h,)] * 3)  # [c0|c1|c2] chunks, H each
    vector = cue.SegmentedOperand([(3, h)])  # H x 1o in ir_mul: (xyz, channel)
    unit = cue.SegmentedOperand([(3,)])  # 1x1o
    scalar = cue.SegmentedOperand([(h,)])  # H x 0e

    cg_sv = cue.clebsch_gordan(cue.O3(0, 1), cue.O3(1, -1), cue.O3(1, -1))[0, 0]  # (3, 3)
    cg_vs = cue.clebsch_gordan(cue.O3(1, -1), cue.O3(0, 1), cue.O3(1, -1))[0, :, 0]  # (3, 3)
    c_v = 1.0 / math.sqrt(3.0 * h)

    to_ds = cue.SegmentedTensorProduct([(scalars3, "u"), (scalars3, "u"), (scalar, "u")])
    to_ds.add_path(2, 2, 0, c=1.0 / math.sqrt(3.0))
    vec_term = cue.SegmentedTensorProduct(
        [(scalars3, "u"), (scalars3, "u"), (vector, "iu"), (vector, "ju")], "ij")
    vec_term.add_path(0, 0, 0, 0, c=cg_sv * c_v)
    unit_term = cue.SegmentedTensorProduct(
        [(scalars3, "u"), (scalars3, "u"), (unit, "i"), (vector, "ju")], "ij")
    unit_term.add_path(1, 1, 0, 0, c=cg_vs * c_v)

    poly = cue.SegmentedPolynomial(
        [scalars3, scalars3, vector, unit], [scalar, vector],
        [((0, 1, 4), to_ds), ((0, 1, 2, 5), vec_term), ((0, 1, 3, 5), unit_term)],
    )
    o3 = cue.O3
    s3 = cue.Irreps(o3, f"{h}x0e + {h}x0e + {h}x0e")
    rep = lambda text: cue.IrrepsAndLayout(cue.Irreps(o3, text), cue.ir_mul)  # noqa: E731
    return cue.EquivariantPolynomial(
        [cue.IrrepsAndLayout(s3, cue.ir_mul), cue.IrrepsAndLayout(s3, cue.ir_mul), rep(f"{h}x1o"), rep("1x1o")],
        [rep(f"{h}x0e"), rep(f"{h}x1o")],
        poly,
    )


def _ops_available() -> bool:
    global _HAS_OPS
    if _HAS_OPS is None:
        try:
            import cuequivariance_ops_torch  # noqa: F401
        except Exception:  # not installed, or no driver (libcuda) on this machine
            _HAS_OPS = False
        else:
            _HAS_OPS = True
    return _HAS_OPS


def method_for(device: torch.device) -> str:
    """cuequivariance_torch method used for tensors on ``device``: ``"uniform_1d"`` or ``"naive"``."""
    if device.type == "cuda" and _ops_available():
        return "uniform_1d"
    return "naive"


def _module(hidden: int, method: str, device: torch.device) -> torch.nn.Module:
    key = (hidden, method, str(device))
    mod = _MODULES.get(key)
    if mod is None:
        import cuequivariance_torch as cuet

        poly = message_descriptor(hidden).polynomial.flatten_coefficient_modes()
        # The naive method logs "opt_einsum_fx not available" for every tensor product it builds.
        log = logging.getLogger("cuequivariance_torch.primitives.segmented_polynomial_naive")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            mod = cuet.SegmentedPolynomial(poly, method=method, name="e3relax_message_passing")
        finally:
            log.setLevel(level)
        mod = _MODULES[key] = mod.to(device)
    return mod


def message_passing(
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
) -> tuple[Tensor, Tensor]:
    """Messages of every edge, summed into its receiver, through cuequivariance.

    Same arguments and results as :func:`e3relax_fast.reference.message_passing.message_passing`
    (``rowptr`` is accepted and unused: the scatter needs no edge order). Differentiable with
    respect to every floating-point input (autograd through cuequivariance's polynomial). A graph
    without edges goes to the reference (its sums are empty: exact zeros, zero gradients), since
    cuequivariance's naive method takes an empty output index for "no index".

    Returns:
        ``(ds (N, H), dv (N, 3, H))`` in the dtype of ``x_proj``.
    """
    global _WARNED_NAIVE_ON_CUDA
    if edge_index.shape[1] == 0:
        return _reference_message_passing(x_proj, vec, positions, cells, edge_index, cell_offsets, edge_graph,
                                          edge_weight, edge_bias, rbf_centres, rbf_coeff, cutoff)
    del rowptr
    n, h = vec.shape[0], vec.shape[2]
    j, i = edge_index[0], edge_index[1]
    r = edge_vectors(positions, cells, edge_index, cell_offsets, edge_graph)
    d = safe_norm(r)
    u = -r / d.unsqueeze(-1)
    gate = torch.nn.functional.linear(radial_basis(d, rbf_centres, rbf_coeff, cutoff), edge_weight, edge_bias)

    method = method_for(x_proj.device)
    if method == "naive" and x_proj.device.type == "cuda" and not _WARNED_NAIVE_ON_CUDA:
        _WARNED_NAIVE_ON_CUDA = True
        warnings.warn("e3relax_fast: cueq message passing runs cuequivariance's naive PyTorch method on CUDA "
                      "(cuequivariance_ops_torch is not importable; pip install 'e3relax-fast[cueq-gpu]' "
                      "or '[cueq-gpu-cu13]', matching torch.version.cuda)",
                      stacklevel=2)
    poly = _module(h, method, x_proj.device)
    size_out = x_proj.new_empty((n, 0))  # only its first dimension is read
    ds, dv = poly(
        [gate, x_proj, vec.reshape(n, 3 * h), u.to(gate.dtype)],
        input_indices={1: j, 2: j},
        output_indices={0: i, 1: i},
        output_shapes={0: size_out, 1: size_out},
    )
    return ds, dv.view(n, 3, h)

