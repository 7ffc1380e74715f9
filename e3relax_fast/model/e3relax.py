"""The E3Relax model (spec §5–§7): atoms and the three lattice vectors are nodes with scalar and
vector features; every layer updates positions and cell and is supervised.

Parameter names follow the original implementation exactly, so its published checkpoints load
unchanged (``paper_compat=True``). The default mode fixes the original's two symmetry defects
(spec §12): lattice deltas are added as rows, and the atom–lattice geometry uses positions centred
per crystal, which makes the model rotation- and translation-equivariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..batch import Batch, graph_index_from_ptr
from ..geometry import CUTOFF, MAX_NEIGHBORS, NUM_RBF, RADIUS, edge_vectors, lattice_vectors, safe_norm
from ..reference.rbf import rbf_centres
from .bond_radii import BondRadiiStrain
from .layers import (
    AtomEmbedding,
    Context,
    ElementFeatures,
    LatticeNodeLayer,
    MessagePassingLayer,
    MessageUpdateLayer,
    RadialBasis,
    StructureUpdateLayer,
)
from .virial import CellVirial
from .volume_prior import VolumePrior

#: State-dict key of the buffer that marks a ``cell_transport`` model (see ``E3Relax.__init__``).
TRANSPORT_MARKER = "cell_transport_marker"
#: Buffer holding ``edge_cutoff`` when set, so that a bare state dict records it.
EDGE_CUTOFF_KEY = "edge_basis_cutoff"


@dataclass
class E3RelaxOutput:
    """Per-layer predictions; index -1 is the model's prediction.

    positions: list of ``(N, 3)`` Å.  cells: list of ``(G, 3, 3)`` Å, rows = lattice vectors.
    log_scale: ``(G,)`` the volume prior's ``ln s`` (``E3Relax(volume_prior=True)``), else ``None``.
    """

    positions: list[Tensor]
    cells: list[Tensor]
    log_scale: Tensor | None = None


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
        backend: kernel backend of the model's ops (:mod:`e3relax_fast.ops`), ``"auto" |
            "reference" | "triton" | "cuda" | "cueq"``: the atom–atom message op and the atom–lattice
            ops (lattice message of Step A, per-crystal means of Steps 0 and E). ``"cuda"`` and
            ``"cueq"`` implement only the atom–atom op; with them the atom–lattice ops run on the
            reference.
        radius, max_neighbors: graph rule used when a batch comes without a graph.
        cell_transport: after each layer's cell update, carry the atoms along with the cell's
            deformation about their centroid (``p <- c + (p - c) C^-1 C'``), so that the learned
            displacements are what a relaxation adds on top of the strain (default mode only; the
            original has no such step, and the models shipped before it were trained without it).
        element_features: add a learned linear map of each element's physical descriptors (radius,
            electronegativity, period, group: :mod:`e3relax_fast.model.elements`) to its learned
            embedding (default mode only). The map starts at zero, so a model grown from a
            checkpoint without it (``train --init``) starts with that checkpoint's predictions.
        cell_strain: add to each lattice node's cell delta its own lattice vector times a learned
            scalar of the node's invariant features (``Δa_k += ε_k a_k``): a direct path for the
            multiplicative change a relaxation makes to the cell, which the node's vector delta
            (an absolute displacement in Å) must otherwise build from its messages (default mode
            only). The scalars start at zero, so a model grown from a checkpoint without them starts
            with its predictions.
        cell_mix: add to each lattice node's cell delta a learned combination of all three lattice
            vectors (``Δa_k += Σ_j m_kj a_j``), its coefficients a linear map of the node's invariant
            features and of the current cell's shape (:func:`cell_shape`: its lengths against their
            geometric mean, the cosines of its angles): a direct path for shear and for the lengths'
            ratios, which a relaxation changes (a strained cubic cell made cubic again, a phase
            change's elongation) and which the node's vector delta rarely reproduced (default mode
            only). Rotation-equivariant (invariant coefficients of the vectors themselves); the
            coefficients start at zero, so a model grown from a checkpoint without them starts with
            its predictions.
        edge_cutoff: the radial basis cutoff of the atom–atom edges only, in Å (default: ``cutoff``,
            the original's one basis). The same R Gaussians then span ``edge_cutoff`` instead of
            30 Å: at 6 Å (the graph radius) they are 0.047 Å apart instead of 0.24 Å, fine enough to
            tell a bond strained by 2 % (default mode only; the atom–lattice distances, tens of Å,
            keep ``cutoff``).
        volume_prior: before the first layer, rescale each crystal isotropically by a factor learned
            from its bonds' lengths relative to their elements' covalent radii
            (:mod:`e3relax_fast.model.volume_prior`): the volume of unseen chemistry from what every
            element has, its radius (default mode only). Starts as no rescale, so a model grown from a
            checkpoint without it starts with its predictions; the prior learns from a loss term of its
            own (``layerwise_loss(prior_weight=...)``, ``train --prior-weight``), not through the layers.
        cell_virial: add to each lattice vector's delta ``a_k ε``, ε a symmetric strain summed over
            the crystal's bonds like the virial stress, each bond's weight learned from its atoms'
            features and its length (:mod:`e3relax_fast.model.virial`): which direction of the cell
            is too long, from the bonds along it (default mode only). Rotation-equivariant, the same
            for every basis of the lattice; starts at zero, so a model grown from a checkpoint
            without it starts with its predictions.
        bond_radii: add to each lattice vector's delta ``a_k ε``, ε a symmetric strain from the bonds'
            lengths relative to their atoms' radii (tabulated covalent radii times a learned factor:
            :mod:`e3relax_fast.model.bond_radii`), so that a bond too short for its elements reads
            alike for every element (default mode only). Same symmetries as ``cell_virial``; starts
            at zero.
        bond_forces: with ``bond_radii``, each layer also moves each atom along its bonds by a learned
            function of their relative lengths (a pair force read in the same units for every
            element); starts at zero.
    """

    def __init__(
        self,
        hidden_channels: int = 512,
        num_layers: int = 4,
        num_rbf: int = NUM_RBF,
        cutoff: float = CUTOFF,
        num_elements: int = 118,
        paper_compat: bool = False,
        backend: str = "auto",
        radius: float = RADIUS,
        max_neighbors: int = MAX_NEIGHBORS,
        cell_transport: bool = False,
        element_features: bool = False,
        cell_strain: bool = False,
        cell_mix: bool = False,
        edge_cutoff: float | None = None,
        volume_prior: bool = False,
        cell_virial: bool = False,
        bond_radii: bool = False,
        bond_forces: bool = False,
    ):
        super().__init__()
        h = hidden_channels
        self.hidden_channels, self.num_layers, self.num_rbf = h, num_layers, num_rbf
        self.cutoff, self.num_elements = cutoff, num_elements
        self.paper_compat, self.backend = paper_compat, backend
        self.radius, self.max_neighbors = radius, max_neighbors
        _check_options(paper_compat, cell_transport=cell_transport, element_features=element_features,
                       cell_strain=cell_strain, cell_mix=cell_mix, edge_cutoff=edge_cutoff, volume_prior=volume_prior,
                       cell_virial=cell_virial, bond_radii=bond_radii, bond_forces=bond_forces)
        self.cell_transport, self.use_element_features = cell_transport, element_features
        self.use_cell_strain, self.use_cell_mix = cell_strain, cell_mix
        self.edge_cutoff = None if edge_cutoff is None else float(edge_cutoff)
        self.use_volume_prior, self.use_cell_virial = volume_prior, cell_virial
        self.use_bond_radii, self.use_bond_forces = bond_radii, bond_forces
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
        if cell_transport:
            # The option has no weights: this marker makes a bare state dict (torch.save(model.
            # state_dict())) carry it, so that loading one cannot silently drop the transport.
            self.register_buffer(TRANSPORT_MARKER, torch.ones(()))
        if element_features:
            self.element_features = ElementFeatures(num_elements, h)
        if cell_strain:
            # Per layer, per lattice node: its scalar features -> ε_k, zero at the start.
            self.cell_strain_layers = nn.ModuleList(
                nn.ModuleList(_zero_linear(h, 1) for _ in range(3)) for _ in range(num_layers))
        if cell_mix:
            # Per layer, per lattice node: its scalar features and the cell's 6 shape invariants -> m_k (3,).
            self.cell_mix_layers = nn.ModuleList(
                nn.ModuleList(_zero_linear(h + 6, 3) for _ in range(3)) for _ in range(num_layers))
        if edge_cutoff is not None:
            self.register_buffer(EDGE_CUTOFF_KEY, torch.tensor(self.edge_cutoff, dtype=torch.float64))
        if volume_prior:
            self.volume_prior = VolumePrior(num_elements, h)
        if cell_virial:
            # Per layer: a strain from the bonds (model/virial.py), zero at the start.
            self.cell_virial_layers = nn.ModuleList(CellVirial(h, radius) for _ in range(num_layers))
        if bond_radii:
            # Per layer: a strain from the bonds' lengths relative to their atoms' radii, zero at the start.
            self.bond_radii_layers = nn.ModuleList(BondRadiiStrain(h, num_elements, radius, forces=bond_forces)
                                                   for _ in range(num_layers))

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
            "cell_transport": self.cell_transport,
            "element_features": self.use_element_features,
            "cell_strain": self.use_cell_strain,
            "cell_mix": self.use_cell_mix,
            "edge_cutoff": self.edge_cutoff,
            "volume_prior": self.use_volume_prior,
            "cell_virial": self.use_cell_virial,
            "bond_radii": self.use_bond_radii,
            "bond_forces": self.use_bond_forces,
            "radius": self.radius,
            "max_neighbors": self.max_neighbors,
        }

    # ------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights under the original's parameter names.

        Also accepts the authors' published format: names with a ``module.`` prefix (from
        DistributedDataParallel) and no ``radial_basis.rbf.offset`` buffer, which is regenerated;
        and, for a ``cell_transport`` model, a state dict without its marker buffer (made before it).
        """
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        key = "radial_basis.rbf.offset"
        if key not in state:
            state[key] = rbf_centres(self.num_rbf).to(self.radial_basis.rbf.offset)
        if self.cell_transport and TRANSPORT_MARKER not in state:  # saved before the marker existed
            state[TRANSPORT_MARKER] = torch.ones(()).to(self.radial_basis.rbf.offset)
        return super().load_state_dict(state, strict=strict, assign=assign)

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
        pos = batch.positions.to(device=device, dtype=dtype)
        cell = batch.cells.to(device=device, dtype=dtype)
        ctx = self._context(batch, device)
        record = _Recorder(trace)

        numbers = batch.atomic_numbers.to(device)
        out = E3RelaxOutput([], [])
        if self.use_volume_prior:
            pos, cell, out.log_scale = self.volume_prior(pos, cell, numbers, ctx)
        s = self.atom_emb(numbers)
        if self.use_element_features:
            s = s + self.element_features(numbers)
        v = s.new_zeros(pos.shape[0], 3, self.hidden_channels)
        lat_s = [emb.weight.expand(cell.shape[0], -1) for emb in
                 (self.scalar_l1_emb, self.scalar_l2_emb, self.scalar_l3_emb)]
        lat_v = [s.new_zeros(cell.shape[0], 3, self.hidden_channels) for _ in range(3)]
        for n in range(self.num_layers):
            nodes = (self.lattice_l1_layers[n], self.lattice_l2_layers[n], self.lattice_l3_layers[n])
            # Step 0: the atom–lattice geometry of this layer's input (the pairs themselves are
            # formed inside the lattice message op).
            centres = None if self.paper_compat else ctx.lattice_pool(pos, ctx.ptr, ctx.graph_index)
            record.lazy(f"L{n}_edge_dist", _edge_distances, pos, cell, batch, ctx)
            record.lazy(f"L{n}_lattice_dist", lambda p, c, m: safe_norm(lattice_vectors(p, c, ctx.graph_index, m)),
                        pos, cell, centres)
            # Step A: lattice -> atom, k = 1, 2, 3 in sequence.
            for k, node in enumerate(nodes):
                s, v = node.to_atoms(k, s, v, pos, cell, centres, lat_s[k], lat_v[k], ctx)
                record(f"L{n}_x_after_lattice_local_{k + 1}", s, f"L{n}_vec_after_lattice_local_{k + 1}", v)
            record(f"L{n}_x_after_lattice_local", s, f"L{n}_vec_after_lattice_local", v)
            # Step B: atom -> atom; Step C: self-update; Step D: positions.
            s, v = self.message_passing_layers[n](s, v, pos, cell, ctx)
            record(f"L{n}_x_after_message", s, f"L{n}_vec_after_message", v)
            s, v = self.message_update_layers[n](s, v)
            record(f"L{n}_x_after_selfupdate", s, f"L{n}_vec_after_selfupdate", v)
            dpos = self.structure_update_layers[n](s, v)
            record(f"L{n}_pos_delta", dpos)
            pos = pos + dpos
            # Step E: atom -> lattice, independent per node; Step F: the cell.
            s_mean = ctx.lattice_pool(s, ctx.ptr, ctx.graph_index)
            v_mean = ctx.lattice_pool(v, ctx.ptr, ctx.graph_index)
            deltas = []
            shape = cell_shape(cell) if self.use_cell_mix else None
            strain, bond_dpos = self._bonds(n, s, numbers, pos, cell, ctx)
            if bond_dpos is not None:
                pos = pos + bond_dpos
            for k, node in enumerate(nodes):
                lat_s[k], lat_v[k], delta = node.from_atoms(s_mean, v_mean, lat_s[k], lat_v[k])
                if self.use_cell_strain:
                    delta = delta + self.cell_strain_layers[n][k](lat_s[k]) * cell[:, k, :]
                if self.use_cell_mix:
                    mix = self.cell_mix_layers[n][k](torch.cat([lat_s[k], shape], dim=-1))  # (G, 3)
                    delta = delta + torch.einsum("gj,gjx->gx", mix, cell)
                if strain is not None:
                    delta = delta + torch.einsum("gx,gxy->gy", cell[:, k, :], strain)
                deltas.append(delta)
                record(f"L{n}_lat{k + 1}_scalar_after_global", lat_s[k], f"L{n}_lat{k + 1}_vector_after_global",
                       lat_v[k], f"L{n}_lat{k + 1}_delta", delta.unsqueeze(-1))
            # Paper: delta k becomes column k of a row-vector cell (defect 1, spec §12); default: row k.
            new_cell = cell + torch.stack(deltas, dim=-1 if self.paper_compat else -2)
            if self.cell_transport:
                pos = _transport(pos, cell, new_cell, ctx)
            cell = new_cell
            out.positions.append(pos)
            out.cells.append(cell)
        return out

    def _bonds(self, n: int, s: Tensor, numbers: Tensor, pos: Tensor, cell: Tensor, ctx: Context
               ) -> tuple[Tensor | None, Tensor | None]:
        """Layer ``n``'s strain ``(G, 3, 3)`` from the bonds (the virial strain's plus the relative-length
        one's, as configured; None without either) and the relative-length bonds' displacement of the
        atoms ``(N, 3)`` Å (None without ``bond_forces``)."""
        strain = self.cell_virial_layers[n](s, pos, cell, ctx) if self.use_cell_virial else None
        displacement = None
        if self.use_bond_radii:
            relative, displacement = self.bond_radii_layers[n](s, numbers, pos, cell, ctx)
            strain = relative if strain is None else strain + relative
        return strain, displacement

    def _context(self, batch: Batch, device: torch.device) -> Context:
        """The batch's indexing and receiver-sorted graph on ``device``, and this model's ops."""
        ptr = batch.ptr.to(device)
        graph_index = graph_index_from_ptr(ptr, batch.num_atoms)
        edge_index, cell_offsets = batch.edge_index.to(device), batch.cell_offsets.to(device)
        if batch.rowptr is not None:
            rowptr = batch.rowptr.to(device)
        else:
            # A graph given without its CSR (e.g. the original's): sort it by receiver (stable, so
            # each receiver keeps its edge order); checking sortedness would need a host sync.
            order = torch.argsort(edge_index[1], stable=True)
            edge_index, cell_offsets = edge_index[:, order], cell_offsets[order]
            rowptr = torch.searchsorted(edge_index[1], torch.arange(batch.num_atoms + 1, device=device))
        # The compiled "cuda" message op is forward-only: auto leaves it out while gradients are on.
        needs_grad = torch.is_grad_enabled()
        return Context(
            ptr, graph_index, (edge_index, cell_offsets, graph_index[edge_index[1]]), rowptr, self.radial_basis,
            self.cutoff if self.edge_cutoff is None else self.edge_cutoff,
            message_passing=ops.resolve(ops.MESSAGE_PASSING, self.backend, device.type, needs_grad)[1],
            lattice_message=ops.resolve(ops.LATTICE_MESSAGE, self.backend, device.type, needs_grad)[1],
            lattice_pool=ops.resolve(ops.LATTICE_POOL, self.backend, device.type, needs_grad)[1],
        )


def _check_options(paper_compat: bool, **options) -> None:
    """ValueError for an option the original mode refuses, or a value or combination that cannot be."""
    cell_term = "the original's cell update has no such term"
    why_not_original = {"cell_transport": "the original has no such step", "element_features": "the original has no "
                        "such input", "cell_strain": cell_term, "cell_mix": cell_term, "edge_cutoff": "the original "
                        "has one radial basis", "volume_prior": "the original has no such step",
                        "cell_virial": cell_term, "bond_radii": cell_term}
    for name, why in why_not_original.items():
        if paper_compat and options[name] not in (False, None):
            raise ValueError(f"{name} is a default-mode option ({why})")
    edge_cutoff = options["edge_cutoff"]
    if edge_cutoff is not None and not edge_cutoff > 0:
        raise ValueError(f"edge_cutoff must be a positive length in Å, got {edge_cutoff}")
    if options["bond_forces"] and not options["bond_radii"]:
        raise ValueError("bond_forces moves the atoms along the relative-length bonds: it needs bond_radii")


def _zero_linear(fan_in: int, fan_out: int) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def cell_shape(cell: Tensor) -> Tensor:
    """``(G, 6)`` rotation- and scale-invariant shape of ``(G, 3, 3)`` row cells: ln of each lattice
    vector's length over the three lengths' geometric mean, then the cosines of the angles (b, c),
    (a, c), (a, b). A cubic cell is all zeros."""
    lengths = safe_norm(cell)  # (G, 3)
    log_lengths = torch.log(lengths)
    unit = cell / lengths.unsqueeze(-1)
    cosines = torch.stack([(unit[:, i] * unit[:, j]).sum(-1) for i, j in ((1, 2), (0, 2), (0, 1))], dim=-1)
    return torch.cat([log_lengths - log_lengths.mean(-1, keepdim=True), cosines], dim=-1)


def _transport(pos: Tensor, cell: Tensor, new_cell: Tensor, ctx: Context) -> Tensor:
    """``(N, 3)`` positions carried along with the deformation ``F = C^-1 C'`` of their crystal's cell,
    about the crystal's centroid (fractional coordinates relative to the centroid kept)."""
    deformation = torch.linalg.solve(cell, new_cell)  # (G, 3, 3): C F = C'
    centres = ctx.lattice_pool(pos, ctx.ptr, ctx.graph_index)[ctx.graph_index]
    moved = torch.einsum("ni,nij->nj", pos - centres, deformation[ctx.graph_index])
    return centres + moved


def _edge_distances(pos: Tensor, cell: Tensor, batch: Batch, ctx: Context) -> Tensor:
    """``(E,)`` edge lengths in the batch's own edge order (the golden trace's), for tracing."""
    edge_index, cell_offsets = batch.edge_index.to(pos.device), batch.cell_offsets.to(pos.device)
    return safe_norm(edge_vectors(pos, cell, edge_index, cell_offsets, ctx.graph_index[edge_index[1]]))


class _Recorder:
    """Writes named intermediates into a trace dict; does nothing without one."""

    def __init__(self, trace: dict | None) -> None:
        self.trace = trace

    def __call__(self, *names_and_values) -> None:
        if self.trace is not None:
            self.trace.update(zip(names_and_values[::2], names_and_values[1::2], strict=True))

    def lazy(self, name: str, compute, *args) -> None:
        """Record ``compute(*args)``, evaluated only when tracing (diagnostics the forward does not need)."""
        if self.trace is not None:
            self.trace[name] = compute(*args)
