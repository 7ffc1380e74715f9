"""The E3Relax model (spec §5–§7): atoms and the three lattice vectors are nodes with scalar and
vector features; every layer updates positions and cell and is supervised.

Parameter names follow the original implementation exactly, so its published checkpoints load
unchanged (``paper_compat=True``). The default mode fixes the original's two symmetry defects
(spec §12): lattice deltas are added as rows, and the atom–lattice geometry uses positions centred
per crystal, which makes the model rotation- and translation-equivariant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import backends
from .batch import Batch, graph_index_from_ptr
from .geometry import edge_vectors, lattice_vectors, safe_norm
from .reference.lattice_message import lattice_message as _reference_lattice_message
from .reference.lattice_pool import segment_mean as _reference_segment_mean
from .reference.message_passing import message_passing as _reference_message_passing
from .reference.rbf import radial_basis, rbf_centres, rbf_coefficient

MESSAGE_OP = "message_passing"
# On CPU the reference is the right choice (the fused kernels target GPUs).
backends.declare(MESSAGE_OP, {"cpu": ("reference",), "cuda": ("triton", "cuda", "cueq", "reference")})
backends.register(MESSAGE_OP, "reference", _reference_message_passing)
# The atom–lattice ops (Step 0/A geometry and message, Step 0/E pooling) have no CPU kernels either.
LATTICE_MESSAGE_OP = "lattice_message"
LATTICE_POOL_OP = "lattice_pool"
for _op, _fn in ((LATTICE_MESSAGE_OP, _reference_lattice_message), (LATTICE_POOL_OP, _reference_segment_mean)):
    backends.declare(_op, {"cpu": ("reference",), "cuda": ("triton", "reference")})
    backends.register(_op, "reference", _fn)
# Backends that implement only the atom–atom op run the atom–lattice ops on the reference.
_LATTICE_BACKEND = {"cuda": "reference", "cueq": "reference"}
try:  # registers backend "triton" when Triton and a CUDA device (or TRITON_INTERPRET=1) are present
    from . import kernels as _kernels  # noqa: E402,F401
except ImportError:
    pass
try:  # registers backend "cueq" when cuequivariance-torch imports (else records why it is missing)
    from . import cueq as _cueq  # noqa: E402,F401
except ImportError:
    pass

_INV_SQRT_2 = 1 / math.sqrt(2.0)
_NORM_EPS = 1e-8  # added (not clamped) inside the channel norm n(b) (spec §1.3)


def scaled_silu(x: Tensor) -> Tensor:
    """σ(x) = x · sigmoid(x) / 0.6, the model's only activation."""
    return nn.functional.silu(x) * (1 / 0.6)


class ScaledSiLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return scaled_silu(x)


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Sequential:
    # Index 1 is the (parameter-free) activation, matching the original's state-dict names.
    return nn.Sequential(nn.Linear(n_in, n_hidden), ScaledSiLU(), nn.Linear(n_hidden, n_out))


def _channel_norm(b: Tensor) -> Tensor:
    """n(b)_c = sqrt(sum_xyz b_xyz,c^2 + 1e-8) for ``b`` of shape ``(..., 3, H)``."""
    return torch.sqrt((b * b).sum(-2) + _NORM_EPS)


class AtomEmbedding(nn.Module):
    def __init__(self, num_elements: int, hidden: int):
        super().__init__()
        self.embeddings = nn.Embedding(num_elements, hidden)
        nn.init.uniform_(self.embeddings.weight, -math.sqrt(3), math.sqrt(3))


class GaussianBasis(nn.Module):
    def __init__(self, num_rbf: int):
        super().__init__()
        self.register_buffer("offset", rbf_centres(num_rbf))
        # From the float32 centres, whatever dtype the buffer is later cast to.
        self.coeff = rbf_coefficient(self.offset)


class RadialBasis(nn.Module):
    """e(d) = u(d/cutoff) · exp(η (d/cutoff − μ_k)²); no learnable parameters (spec §4)."""

    def __init__(self, num_rbf: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.rbf = GaussianBasis(num_rbf)

    def forward(self, distances: Tensor) -> Tensor:
        return radial_basis(distances, self.rbf.offset, self.rbf.coeff, self.cutoff)


class MessagePassingLayer(nn.Module):
    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        self.x_proj = _mlp(hidden, hidden // 2, 3 * hidden)
        self.edge_proj = nn.Linear(num_rbf, 3 * hidden)


class MessageUpdateLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.vec_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.xvec_proj = _mlp(2 * hidden, hidden, 3 * hidden)


class StructureUpdateLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.attention_pos = _mlp(hidden, hidden, hidden)
        self.pos_mlp = nn.Linear(hidden, 1, bias=False)


class LatticeNodeLayer(nn.Module):
    """Weights of one lattice node k in one layer (lattice→atom, atom→lattice and its delta)."""

    def __init__(self, hidden: int, num_rbf: int):
        super().__init__()
        h = hidden
        self.mlp_scalar_global = _mlp(2 * h, h, h)
        self.mlp_scalar_local = _mlp(2 * h, h, h)
        self.mlp_vector_global = nn.Linear(h, h, bias=False)
        self.mlp_vector_local = nn.Linear(h, h, bias=False)
        self.x_local_proj = _mlp(h, h, 3 * h)
        self.edge_local_proj = nn.Linear(num_rbf, 3 * h)
        self.vector_l_proj = nn.Linear(h, 2 * h, bias=False)
        self.scalar_l_proj = _mlp(2 * h, h, 3 * h)
        self.mlp_l = nn.Linear(h, 1, bias=False)


@dataclass
class E3RelaxOutput:
    """Per-layer predictions; index -1 is the model's prediction.

    positions: list of ``(N, 3)`` Å.  cells: list of ``(G, 3, 3)`` Å, rows = lattice vectors.
    """

    positions: list[Tensor]
    cells: list[Tensor]


class E3Relax(nn.Module):
    """E3Relax (arXiv 2511.12243).

    Args:
        hidden_channels: H, width of scalar and vector features (512 in the paper).
        num_layers: L, number of layers, each emitting positions and cell.
        num_rbf: R, Gaussians of the radial basis (128).
        cutoff: radial basis cutoff in Å (30; separate from the 6 Å graph radius).
        num_elements: rows of the element table, indexed by Z (118; Z must be 1..117).
        paper_compat: reproduce the original exactly (column-wise lattice update, absolute-position
            atom–lattice geometry). Needed for the authors' checkpoints and golden parity.
        backend: kernel backend, ``"auto" | "reference" | "triton" | "cuda" | "cueq"``. It selects
            the atom–atom message op and, for ``"auto"``, ``"reference"`` and ``"triton"``, also the
            atom–lattice ops (lattice message of Step A, per-crystal means of Steps 0 and E);
            ``"cuda"`` and ``"cueq"`` implement only the atom–atom op, so with them the atom–lattice
            ops run on the reference.
        radius, max_neighbors: graph rule used when a batch comes without a graph.
    """

    def __init__(
        self,
        hidden_channels: int = 512,
        num_layers: int = 4,
        num_rbf: int = 128,
        cutoff: float = 30.0,
        num_elements: int = 118,
        paper_compat: bool = False,
        backend: str = "auto",
        radius: float = 6.0,
        max_neighbors: int = 50,
    ):
        super().__init__()
        h = hidden_channels
        self.hidden_channels, self.num_layers, self.num_rbf = h, num_layers, num_rbf
        self.cutoff, self.num_elements = cutoff, num_elements
        self.paper_compat, self.backend = paper_compat, backend
        self.radius, self.max_neighbors = radius, max_neighbors
        # Registration order follows the original's state dict.
        self.atom_emb = AtomEmbedding(num_elements, h)
        self.scalar_l1_emb = nn.Embedding(1, h)
        self.scalar_l2_emb = nn.Embedding(1, h)
        self.scalar_l3_emb = nn.Embedding(1, h)
        self.radial_basis = RadialBasis(num_rbf, cutoff)
        self.message_passing_layers = nn.ModuleList(MessagePassingLayer(h, num_rbf) for _ in range(num_layers))
        self.message_update_layers = nn.ModuleList(MessageUpdateLayer(h) for _ in range(num_layers))
        self.structure_update_layers = nn.ModuleList(StructureUpdateLayer(h) for _ in range(num_layers))
        self.lattice_l1_layers = nn.ModuleList(LatticeNodeLayer(h, num_rbf) for _ in range(num_layers))
        self.lattice_l2_layers = nn.ModuleList(LatticeNodeLayer(h, num_rbf) for _ in range(num_layers))
        self.lattice_l3_layers = nn.ModuleList(LatticeNodeLayer(h, num_rbf) for _ in range(num_layers))

    @property
    def config(self) -> dict:
        """Constructor arguments that define the architecture and mode (saved in checkpoints)."""
        return {
            "hidden_channels": self.hidden_channels,
            "num_layers": self.num_layers,
            "num_rbf": self.num_rbf,
            "cutoff": self.cutoff,
            "num_elements": self.num_elements,
            "paper_compat": self.paper_compat,
            "radius": self.radius,
            "max_neighbors": self.max_neighbors,
        }

    # ------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights under the original's parameter names.

        Also accepts the authors' published format: names with a ``module.`` prefix (from
        DistributedDataParallel) and no ``radial_basis.rbf.offset`` buffer, which is regenerated.
        """
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        key = "radial_basis.rbf.offset"
        if key not in state:
            state[key] = rbf_centres(self.num_rbf).to(self.radial_basis.rbf.offset)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _lattice_nodes(self, layer: int) -> tuple[LatticeNodeLayer, LatticeNodeLayer, LatticeNodeLayer]:
        return self.lattice_l1_layers[layer], self.lattice_l2_layers[layer], self.lattice_l3_layers[layer]

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, trace: dict | None = None) -> E3RelaxOutput:
        """Predict relaxed positions and cells for every layer.

        Args:
            batch: a :class:`Batch`; if it has no graph, one is built on the batch's device with the
                model's ``radius``/``max_neighbors``. Positions/cells are cast to the parameters' dtype.
            trace: optional dict that receives per-layer intermediates under the golden names
                (``L{n}_x_after_message`` ...), for tests and debugging.

        Returns:
            :class:`E3RelaxOutput` with ``num_layers`` positions ``(N, 3)`` and cells ``(G, 3, 3)``.
        """
        if not batch.has_graph:
            batch = batch.with_graph(self.radius, self.max_neighbors)
        weight = self.atom_emb.embeddings.weight
        dtype, device = weight.dtype, weight.device
        # The compiled "cuda" message op is forward-only: auto leaves it out when gradients are needed.
        skip = ("cuda",) if torch.is_grad_enabled() else ()
        _, message_passing = backends.resolve(MESSAGE_OP, self.backend, device.type, skip)
        lattice_backend = _LATTICE_BACKEND.get(self.backend, self.backend)
        _, lattice_message = backends.resolve(LATTICE_MESSAGE_OP, lattice_backend, device.type)
        _, segment_mean = backends.resolve(LATTICE_POOL_OP, lattice_backend, device.type)

        pos = batch.positions.to(device=device, dtype=dtype)
        cell = batch.cells.to(device=device, dtype=dtype)
        ptr = batch.ptr.to(device)
        edge_index = batch.edge_index.to(device)
        cell_offsets = batch.cell_offsets.to(device)
        num_atoms, num_graphs, h = pos.shape[0], cell.shape[0], self.hidden_channels
        graph_index = graph_index_from_ptr(ptr, num_atoms)
        edge_graph = graph_index[edge_index[1]]
        # Receiver-sorted CSR copy of the graph for the message op (the stable sort keeps each
        # receiver's edge order; always done, since checking sortedness would need a host sync).
        order = torch.argsort(edge_index[1], stable=True)
        mp_edges = (edge_index[:, order], cell_offsets[order], edge_graph[order])
        rowptr = torch.searchsorted(mp_edges[0][1], torch.arange(num_atoms + 1, device=device))
        rbf = self.radial_basis

        s = self.atom_emb.embeddings(batch.atomic_numbers.to(device))
        v = s.new_zeros(num_atoms, 3, h)
        lat_s = [emb.weight.expand(num_graphs, h) for emb in
                 (self.scalar_l1_emb, self.scalar_l2_emb, self.scalar_l3_emb)]
        lat_v = [s.new_zeros(num_graphs, 3, h) for _ in range(3)]

        out_pos, out_cell = [], []
        for n in range(self.num_layers):
            nodes = self._lattice_nodes(n)
            # --- Step 0: atom–lattice geometry from the layer's input positions and cell.
            # The atom–lattice pairs themselves (q, its length, direction and basis) are computed
            # inside the lattice message op of Step A.
            centres = None if self.paper_compat else segment_mean(pos, ptr, graph_index)
            if trace is not None:
                r = edge_vectors(pos, cell, edge_index, cell_offsets, edge_graph)
                trace[f"L{n}_edge_dist"] = safe_norm(r)
                trace[f"L{n}_lattice_dist"] = safe_norm(lattice_vectors(pos, cell, graph_index, centres))

            # --- Step A: lattice -> atom, k = 1, 2, 3 in sequence.
            for k, node in enumerate(nodes):
                # .to(dtype): under bf16 autocast the projection comes out in bf16; the fused ops
                # take one working dtype (a no-op otherwise).
                ds, v = lattice_message(
                    node.x_local_proj(s).to(dtype), v, pos, cell, graph_index, centres, k,
                    node.edge_local_proj.weight, node.edge_local_proj.bias, rbf.rbf.offset, rbf.rbf.coeff,
                    rbf.cutoff,
                )
                s = s + ds
                s = s + scaled_silu(node.mlp_scalar_local(torch.cat([s, lat_s[k][graph_index]], dim=-1)))
                v = v + node.mlp_vector_local(v + lat_v[k][graph_index])
                if trace is not None:
                    trace[f"L{n}_x_after_lattice_local_{k + 1}"] = s
                    trace[f"L{n}_vec_after_lattice_local_{k + 1}"] = v

            if trace is not None:
                trace[f"L{n}_x_after_lattice_local"], trace[f"L{n}_vec_after_lattice_local"] = s, v

            # --- Step B: atom–atom messages (PaiNN form), summed per receiver.
            mp = self.message_passing_layers[n]
            ds, dv = message_passing(
                mp.x_proj(s).to(dtype), v, pos, cell, *mp_edges,
                mp.edge_proj.weight, mp.edge_proj.bias, rbf.rbf.offset, rbf.rbf.coeff, rbf.cutoff,
                rowptr=rowptr,
            )
            s = (s + ds) * _INV_SQRT_2
            v = v + dv
            if trace is not None:
                trace[f"L{n}_x_after_message"], trace[f"L{n}_vec_after_message"] = s, v

            # --- Step C: gated self-update.
            mu = self.message_update_layers[n]
            a, b = mu.vec_proj(v).split(h, dim=-1)
            c1, c2, c3 = mu.xvec_proj(torch.cat([s, _channel_norm(b)], dim=-1)).split(h, dim=-1)
            s = (s + c2 * _INV_SQRT_2 + s * torch.tanh(c3)) * _INV_SQRT_2
            v = v + c1.unsqueeze(1) * a
            if trace is not None:
                trace[f"L{n}_x_after_selfupdate"], trace[f"L{n}_vec_after_selfupdate"] = s, v

            # --- Step D: positions.
            su = self.structure_update_layers[n]
            attention = torch.softmax(su.attention_pos(s), dim=-1)
            dpos = 0.5 * (su.pos_mlp(v).squeeze(-1) + (attention.unsqueeze(1) * v).sum(-1))
            pos = pos + dpos
            if trace is not None:
                trace[f"L{n}_pos_delta"] = dpos

            # --- Step E: atom -> lattice, independent per node; Step F: cell.
            s_mean = segment_mean(s, ptr, graph_index)
            v_mean = segment_mean(v, ptr, graph_index)
            deltas = []
            for k, node in enumerate(nodes):
                t = lat_s[k] + scaled_silu(node.mlp_scalar_global(torch.cat([s_mean, lat_s[k]], dim=-1)))
                tv = lat_v[k] + node.mlp_vector_global(v_mean + lat_v[k])
                c, d = node.vector_l_proj(tv).split(h, dim=-1)
                k1, k2, k3 = node.scalar_l_proj(torch.cat([t, _channel_norm(d)], dim=-1)).split(h, dim=-1)
                lat_s[k] = k2 + t * torch.tanh(k3)
                lat_v[k] = tv + k1.unsqueeze(1) * c
                deltas.append(node.mlp_l(lat_v[k]).squeeze(-1))  # (G, 3)
                if trace is not None:
                    trace[f"L{n}_lat{k + 1}_scalar_after_global"] = lat_s[k]
                    trace[f"L{n}_lat{k + 1}_vector_after_global"] = lat_v[k]
                    trace[f"L{n}_lat{k + 1}_delta"] = deltas[-1].unsqueeze(-1)
            # Paper: delta k becomes column k of a row-vector cell (defect 1, spec §12); default: row k.
            cell = cell + torch.stack(deltas, dim=-1 if self.paper_compat else -2)
            out_pos.append(pos)
            out_cell.append(cell)
        return E3RelaxOutput(out_pos, out_cell)
