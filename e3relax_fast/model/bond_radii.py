"""A cell update from each bond's length *relative to its atoms' radii* (``E3Relax(bond_radii=True)``).

Why: the bond strain of :mod:`.virial` reads a bond's length in Å, so "a Ge–Ge bond of 2.35 Å is
too short" has to be learned for every element pair apart, from that pair's own crystals; a model
trained with already-relaxed twins then cannot tell "Ag at 2.89 Å stays" from "Ag at 2.55 Å grows"
for chemistry it has met little, and stays put. Here the length is read as ``x = d / (ρ_i + ρ_j)``,
with ``ρ`` each atom's radius: the tabulated covalent radius of its element
(:data:`.elements.ELEMENTS`) times a learned factor of its features (oxidation, coordination), so
that "bonds shorter than the radii want push the cell out" is one function of ``x`` for every
element, learned from all of them, and a crystal of elements the training pairs hold little of
starts from the table. The strain has the virial's form, as :class:`.virial.CellVirial`'s:

    ε = (1 / n_atoms) Σ_b φ_b r̂_b r̂_bᵀ,   φ_b = w · (silu(A s_i + A s_j + c) ⊙ B(x_b)) · envelope(d_b),

``B`` a learned map of Gaussians of ``x`` (bonds faded out over the last quarter of the graph
radius); rotation-equivariant, intensive, the same for every basis of the lattice and every wrapping
(an atom's bonds to its own periodic images are summed over the lattice vectors within the radius).
``w`` and the radius factor start at zero, so a model grown with it starts with the predictions of
the model it was grown from. With ``forces``, the same bond features also move each atom along its
bonds (``E3Relax(bond_forces=True)``): a pair force in the same relative units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..geometry import RADIUS, edge_vectors, safe_norm
from .elements import ELEMENTS
from .layers import Context
from .virial import BOND_WIDTH, IMAGE_RANGE, bond_directions, own_image_steps

#: Gaussians of the relative bond length x = d / (ρ_i + ρ_j) over [X_MIN, X_MAX]; widths = their spacing.
NUM_RELATIVE_BASIS, X_MIN, X_MAX = 32, 0.5, 2.5
#: The learned radius factor lies in exp(±RADIUS_RANGE): a crystal's radii may differ from the
#: covalent table by tens of percent (ionic, metallic bonds), not by several times.
RADIUS_RANGE = 0.7
#: Share of the graph radius over which the bonds are not faded (lengths in Å would break the "x alone").
FLAT = 0.75
#: The most (Å) that the bond forces move an atom in one layer.
MAX_STEP = 0.5
#: An atom's own periodic images summed (|n_k| <= IMAGE_RANGE, n != 0), before the CPU keeps those within the radius.
OWN_IMAGES = (2 * IMAGE_RANGE + 1) ** 3 - 1


def covalent_radii(num_elements: int) -> Tensor:
    """``(num_elements,)`` float64 covalent radii (Å) of Z = 0..num_elements-1 (1 Å for Z = 0 and past 118)."""
    radii = torch.ones(num_elements, dtype=torch.float64)
    count = min(num_elements - 1, len(ELEMENTS))
    radii[1:count + 1] = torch.tensor([row[0] for row in ELEMENTS[:count]], dtype=torch.float64)
    return radii


class BondRadiiStrain(nn.Module):
    """One layer's relative-length bond strain: ``(N, H)`` atom scalars, atomic numbers + geometry ->
    ``(G, 3, 3)`` symmetric ε."""

    def __init__(self, hidden: int, num_elements: int, radius: float = RADIUS, forces: bool = False):
        super().__init__()
        self.atom = nn.Linear(hidden, BOND_WIDTH)
        self.length = nn.Linear(NUM_RELATIVE_BASIS, BOND_WIDTH, bias=False)
        self.out = nn.Linear(BOND_WIDTH, 1, bias=False)
        nn.init.zeros_(self.out.weight)
        if forces:  # each atom's displacement along its bonds, from the same bond features
            self.force = nn.Linear(BOND_WIDTH, 1, bias=False)
            nn.init.zeros_(self.force.weight)
        self.forces = forces
        self.factor = nn.Linear(hidden, 1)
        nn.init.zeros_(self.factor.weight)
        nn.init.zeros_(self.factor.bias)
        self.radius = float(radius)
        self.register_buffer("radii", covalent_radii(num_elements), persistent=False)
        self.register_buffer("centres", torch.linspace(X_MIN, X_MAX, NUM_RELATIVE_BASIS, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("images", own_image_steps(), persistent=False)

    def atom_radii(self, s: Tensor, numbers: Tensor) -> Tensor:
        """``(N,)`` Å: each atom's radius, its element's covalent radius times ``exp(±RADIUS_RANGE)`` at most."""
        scale = RADIUS_RANGE * torch.tanh(self.factor(s)[:, 0])
        return self.radii.to(s.dtype)[numbers] * torch.exp(scale)

    def forward(self, s: Tensor, numbers: Tensor, pos: Tensor, cell: Tensor, ctx: Context
                ) -> tuple[Tensor, Tensor | None]:
        """ε ``(G, 3, 3)`` of each crystal from its bonds at the current positions and cell, and with
        ``forces`` each atom's displacement ``(N, 3)`` Å, ``δ_i = Σ_j ψ(x_ij) r̂_ij`` over its bonds
        (ψ from the same bond features as φ, by another zero-started map), its length capped smoothly at
        :data:`MAX_STEP` (else None).

        s: ``(N, H)`` atom scalars; numbers: ``(N,)`` int64; pos: ``(N, 3)`` Å; cell: ``(G, 3, 3)`` Å, rows.
        """
        edge_index, cell_offsets, edge_graph = ctx.edges
        ends = self.atom(s).to(cell.dtype)  # (N, W)
        rho = self.atom_radii(s, numbers).to(cell.dtype)  # (N,)
        weight = self.out.weight[0]
        # Bonds between distinct atoms (the graph's edges; its one-way self-image edges are left out,
        # as in the virial strain, and the self-images summed below instead).
        vectors = edge_vectors(pos, cell, edge_index, cell_offsets, edge_graph)
        radial, outer = self._radial(vectors, rho[edge_index[0]] + rho[edge_index[1]])
        distinct = (edge_index[0] != edge_index[1]).to(cell.dtype)
        features = nn.functional.silu(ends[edge_index[0]] + ends[edge_index[1]]) * radial  # (E, W)
        phi = features @ weight * distinct
        strain = cell.new_zeros(cell.shape[0], 3, 3).index_add_(0, edge_graph, phi.reshape(-1, 1, 1) * outer)
        # Every atom's bonds to its own images; relative to its own radius, so per atom (not per crystal).
        atom, own_vectors = self._own_images(cell, ctx.graph_index, prune=cell.device.type == "cpu")
        radial, outer = self._radial(own_vectors, 2.0 * rho[atom])
        own_phi = (radial * (nn.functional.silu(2.0 * ends) * weight)[atom]).sum(-1)
        own = own_phi.reshape(-1, 1, 1).to(cell.dtype) * outer  # bf16 under autocast
        strain = strain.index_add_(0, ctx.graph_index[atom], own)
        counts = (ctx.ptr[1:] - ctx.ptr[:-1]).clamp(min=1).to(cell.dtype)
        displacement = None
        if self.forces:  # along the edges into each atom (an atom's own images pull it nowhere)
            psi = (features @ self.force.weight[0] * distinct).to(cell.dtype)
            unit = vectors / safe_norm(vectors).unsqueeze(-1)
            displacement = pos.new_zeros(pos.shape).index_add_(0, edge_index[1], psi.unsqueeze(-1) * unit)
            # A smooth cap on each atom's step (≈ δ when small, at most MAX_STEP Å): summed over up to 50
            # bonds through four layers, an unbounded pair force once blew up in training (loss 1e5).
            size = safe_norm(displacement)
            displacement = displacement * (MAX_STEP * torch.tanh(size / MAX_STEP) / size).unsqueeze(-1)
        return strain / counts.reshape(-1, 1, 1), displacement

    # Its sizes depend on the data (which images lie within the radius): kept out of a compiled graph
    # (train --compile-bond-terms), which would break there anyway, and say so in every run's log.
    @torch.compiler.disable
    def _own_images(self, cell: Tensor, graph_index: Tensor, prune: bool) -> tuple[Tensor, Tensor]:
        """Each atom's bonds to its own periodic images: ``(atom index (B,) int64, vectors (B, 3) Å)``.

        ``prune`` (the CPU's choice) keeps only the images within the radius (for a cell of a few Å,
        ~20 of the 342); without it, all of them (the far ones weigh zero): picking them on an
        accelerator would wait on the device.
        """
        vectors = torch.einsum("lk,gkx->glx", self.images.to(cell.dtype), cell)  # (G, L, 3)
        if not prune:
            atoms = torch.arange(graph_index.shape[0], device=cell.device)
            return atoms.repeat_interleave(vectors.shape[1]), vectors[graph_index].reshape(-1, 3)
        near = safe_norm(vectors) < self.radius  # (G, L)
        crystal, image = near.nonzero(as_tuple=True)  # row-major: grouped by crystal
        per_crystal = torch.bincount(crystal, minlength=cell.shape[0])
        first = torch.cumsum(per_crystal, 0) - per_crystal
        counts = per_crystal[graph_index]  # (N,) images of each atom's crystal
        atom = torch.repeat_interleave(torch.arange(graph_index.shape[0]), counts)
        rank = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pick = first[graph_index[atom]] + rank
        return atom, vectors[crystal[pick], image[pick]]

    def _radial(self, vectors: Tensor, bond_radius: Tensor) -> tuple[Tensor, Tensor]:
        """Of bonds ``vectors (..., 3)`` Å whose atoms' radii sum to ``bond_radius (...)`` Å: the learned
        profile ``B(x) (..., W)`` of their relative length, faded to zero from 3/4 of the graph radius to
        it, and ``r̂ r̂ᵀ (..., 3, 3)``."""
        length, outer = bond_directions(vectors)
        x = length / bond_radius
        spacing = (X_MAX - X_MIN) / (NUM_RELATIVE_BASIS - 1)
        basis = torch.exp(-(((x.unsqueeze(-1) - self.centres.to(length.dtype)) / spacing) ** 2))
        # Flat to 3/4 of the radius, so that near bonds read by x alone; faded to zero at the radius.
        fade = ((length / self.radius - FLAT) / (1.0 - FLAT)).clamp(min=0.0, max=1.0)
        envelope = 0.5 * (1.0 + torch.cos(math.pi * fade))
        return self.length(basis).to(length.dtype) * envelope.unsqueeze(-1), outer
