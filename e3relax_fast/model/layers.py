"""The layers of E3Relax (spec §5–§7), each with its own forward: one step of a layer of the model.

Parameter names (module attributes) follow the original implementation exactly, so that its
published state dicts load unchanged; a layer's forward does not change them.

Shapes: ``N`` atoms, ``G`` crystals, ``H`` channels; scalar features ``(N, H)`` / ``(G, H)``,
vector features ``(N, 3, H)`` / ``(G, 3, H)``; positions ``(N, 3)`` and cells ``(G, 3, 3)`` in Å.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..reference.rbf import rbf_centres, rbf_coefficient
from .elements import NUM_FEATURES, element_feature_table

INV_SQRT_2 = 1 / math.sqrt(2.0)
NORM_EPS = 1e-8  # added (not clamped) inside the channel norm n(b) (spec §1.3)


def scaled_silu(x: Tensor) -> Tensor:
    """σ(x) = x · sigmoid(x) / 0.6, the model's only activation."""
    return nn.functional.silu(x) * (1 / 0.6)


class ScaledSiLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return scaled_silu(x)


def mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    # Index 1 is the (parameter-free) activation, matching the original's state-dict names.
    return nn.Sequential(nn.Linear(n_in, n_hidden), ScaledSiLU(), nn.Linear(n_hidden, n_out))


def channel_norm(b: Tensor) -> Tensor:
    """n(b)_c = sqrt(sum_xyz b_xyz,c^2 + 1e-8) for ``b`` of shape ``(..., 3, H)``."""
    return torch.sqrt((b * b).sum(-2) + NORM_EPS)


@dataclass
class Context:
    """What the layers of one forward pass share: the batch's indexing, its graph and the ops chosen
    for the batch's device (see :mod:`e3relax_fast.ops`).

    ptr: ``(G+1,)`` CSR atom ranges; graph_index: ``(N,)`` crystal of each atom.
    edges: receiver-sorted ``(edge_index (2, E), cell_offsets (E, 3), edge_graph (E,))``, rowptr
    ``(N+1,)`` their receiver CSR. basis: the radial basis of every projection; edge_cutoff: its
    cutoff (Å) for the atom–atom edges (``E3Relax(edge_cutoff=...)``; the basis's own by default).
    """

    ptr: Tensor
    graph_index: Tensor
    edges: tuple[Tensor, Tensor, Tensor]
    rowptr: Tensor
    basis: RadialBasis
    edge_cutoff: float
    message_passing: Callable
    lattice_message: Callable
    lattice_pool: Callable


class AtomEmbedding(nn.Module):
    def __init__(self, num_elements: int, hidden: int):
        super().__init__()
        self.embeddings = nn.Embedding(num_elements, hidden)
        nn.init.uniform_(self.embeddings.weight, -math.sqrt(3), math.sqrt(3))

    def forward(self, atomic_numbers: Tensor) -> Tensor:
        """``(N,)`` int64 Z -> ``(N, H)`` initial scalar features."""
        return self.embeddings(atomic_numbers)


class ElementFeatures(nn.Module):
    """A learned linear map (zero at the start) of the elements' physical descriptors
    (:func:`~e3relax_fast.model.elements.element_feature_table`, a buffer saved with the weights)."""

    def __init__(self, num_elements: int, hidden: int):
        super().__init__()
        self.register_buffer("table", element_feature_table(num_elements).to(torch.get_default_dtype()))
        self.proj = nn.Linear(NUM_FEATURES, hidden, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, atomic_numbers: Tensor) -> Tensor:
        """``(N,)`` int64 Z -> ``(N, H)``, added to the embedding."""
        return self.proj(self.table[atomic_numbers])


class GaussianBasis(nn.Module):
    def __init__(self, num_rbf: int):
        super().__init__()
        self.register_buffer("offset", rbf_centres(num_rbf))
        # From the float32 centres, whatever dtype the buffer is later cast to.
        self.coeff = rbf_coefficient(self.offset)


class RadialBasis(nn.Module):
    """e(d) = u(d/cutoff) · exp(η (d/cutoff − μ_k)²); no learnable parameters (spec §4).

    It holds the centres (buffer ``rbf.offset``), η and the cutoff; the fused ops evaluate the
    basis themselves (``reference/rbf.py`` is its definition)."""

    def __init__(self, num_rbf: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.rbf = GaussianBasis(num_rbf)

    def args(self) -> tuple[Tensor, float, float]:
        """``(centres (R,), coeff, cutoff)``: the basis arguments of every op."""
        return self.rbf.offset, self.rbf.coeff, self.cutoff


class MessagePassingLayer(nn.Module):
    """Step B: atom–atom messages (PaiNN form), summed per receiver."""

    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        self.x_proj = mlp(hidden, hidden // 2, 3 * hidden)
        self.edge_proj = nn.Linear(num_rbf, 3 * hidden)

    def forward(self, s: Tensor, v: Tensor, pos: Tensor, cell: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        # .to(pos.dtype), the parameters' dtype: under bf16 autocast the projection comes out in
        # bf16; the fused ops take one working dtype (a no-op otherwise).
        centres, coeff, _ = ctx.basis.args()
        ds, dv = ctx.message_passing(self.x_proj(s).to(pos.dtype), v, pos, cell, *ctx.edges, self.edge_proj.weight,
                                     self.edge_proj.bias, centres, coeff, ctx.edge_cutoff, rowptr=ctx.rowptr)
        return (s + ds) * INV_SQRT_2, v + dv


class MessageUpdateLayer(nn.Module):
    """Step C: gated self-update of each atom's features."""

    def __init__(self, hidden: int):
        super().__init__()
        self.vec_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.xvec_proj = mlp(2 * hidden, hidden, 3 * hidden)

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        h = s.shape[-1]
        a, b = self.vec_proj(v).split(h, dim=-1)
        c1, c2, c3 = self.xvec_proj(torch.cat([s, channel_norm(b)], dim=-1)).split(h, dim=-1)
        return (s + c2 * INV_SQRT_2 + s * torch.tanh(c3)) * INV_SQRT_2, v + c1.unsqueeze(1) * a


class StructureUpdateLayer(nn.Module):
    """Step D: each atom's displacement from its features."""

    def __init__(self, hidden: int):
        super().__init__()
        self.attention_pos = mlp(hidden, hidden, hidden)
        self.pos_mlp = nn.Linear(hidden, 1, bias=False)

    def forward(self, s: Tensor, v: Tensor) -> Tensor:
        """``(N, 3)`` displacement in Å."""
        attention = torch.softmax(self.attention_pos(s), dim=-1)
        return 0.5 * (self.pos_mlp(v).squeeze(-1) + (attention.unsqueeze(1) * v).sum(-1))


class LatticeNodeLayer(nn.Module):
    """Weights of one lattice node k in one layer: lattice → atom (Step A, :meth:`to_atoms`) and
    atom → lattice with the node's cell delta (Steps E–F, :meth:`from_atoms`)."""

    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        h = hidden
        self.mlp_scalar_global = mlp(2 * h, h, h)
        self.mlp_scalar_local = mlp(2 * h, h, h)
        self.mlp_vector_global = nn.Linear(h, h, bias=False)
        self.mlp_vector_local = nn.Linear(h, h, bias=False)
        self.x_local_proj = mlp(h, h, 3 * h)
        self.edge_local_proj = nn.Linear(num_rbf, 3 * h)
        self.vector_l_proj = nn.Linear(h, 2 * h, bias=False)
        self.scalar_l_proj = mlp(2 * h, h, 3 * h)
        self.mlp_l = nn.Linear(h, 1, bias=False)

    def to_atoms(self, k: int, s: Tensor, v: Tensor, pos: Tensor, cell: Tensor, centres: Tensor | None,
                 lat_s: Tensor, lat_v: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
        """Step A for node ``k``: the gated message from lattice point k to every atom, then the
        atoms' mix with the node's features. ``centres``: ``(G, 3)`` per-crystal mean positions
        (default mode) or ``None`` (the original's absolute positions)."""
        ds, v = ctx.lattice_message(self.x_local_proj(s).to(pos.dtype), v, pos, cell, ctx.graph_index, centres, k,
                                    self.edge_local_proj.weight, self.edge_local_proj.bias, *ctx.basis.args())
        s = s + ds
        s = s + scaled_silu(self.mlp_scalar_local(torch.cat([s, lat_s[ctx.graph_index]], dim=-1)))
        v = v + self.mlp_vector_local(v + lat_v[ctx.graph_index])
        return s, v

    def from_atoms(self, s_mean: Tensor, v_mean: Tensor, lat_s: Tensor, lat_v: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Steps E–F for this node: update its features ``(G, H)``, ``(G, 3, H)`` from the crystal's
        mean atom features and return them with its cell delta ``(G, 3)`` in Å."""
        h = s_mean.shape[-1]
        t = lat_s + scaled_silu(self.mlp_scalar_global(torch.cat([s_mean, lat_s], dim=-1)))
        tv = lat_v + self.mlp_vector_global(v_mean + lat_v)
        c, d = self.vector_l_proj(tv).split(h, dim=-1)
        k1, k2, k3 = self.scalar_l_proj(torch.cat([t, channel_norm(d)], dim=-1)).split(h, dim=-1)
        lat_s = k2 + t * torch.tanh(k3)
        lat_v = tv + k1.unsqueeze(1) * c
        return lat_s, lat_v, self.mlp_l(lat_v).squeeze(-1)
