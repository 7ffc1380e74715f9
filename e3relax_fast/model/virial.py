"""A cell update from the crystal's bonds, shaped like the virial stress (``E3Relax(cell_virial=True)``).

Why: the model's own cell update sees the atoms only through their features pooled per crystal, so
it cannot tell *which direction* of the cell is too long. A strained crystal says it in its bonds:
bonds along a stretched axis are longer than their chemistry wants. The virial has exactly that
form, σ ∝ Σ_bonds f_b r̂_b r̂_bᵀ (r̂ the bond's direction, f its force along itself), and relaxing the
cell is moving it against σ. Here each bond's scalar ``φ_b`` is learned from both atoms' invariant
features and the bond's length, and the crystal's strain is

    ε = (1 / n_atoms) Σ_b φ_b r̂_b r̂_bᵀ        (symmetric, 3 × 3, dimensionless),

applied to the rows as ``a_k ← a_k + a_k ε``. It is rotation-equivariant (ε turns as R ε Rᵀ) and
intensive (a supercell has the same ε), and it reads bonds (an atom's bonds to its own periodic
images included), not the cell vectors: the same for every basis of the lattice, every wrapping of
the atoms and every supercell wherever the graph's top-K cut keeps the same bonds (an atom's bonds
to its own images are all summed, within the radius, whatever the cut). The map's last layer starts
at zero, so a model grown with it starts with the predictions of the model it was grown from.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..geometry import RADIUS, edge_vectors, safe_norm
from .layers import Context

#: Gaussians of the bond length (Å) over [0, RADIUS]; widths = their spacing.
NUM_BOND_BASIS = 16
#: Width of the bond map's hidden layer.
BOND_WIDTH = 32
#: Images of an atom's own, per lattice direction, summed as its bonds to itself.
IMAGE_RANGE = 3


def own_image_steps() -> Tensor:
    """``(L, 3)`` float64 integer lattice vectors n (|n_k| <= IMAGE_RANGE, n != 0): every image within
    the radius of a cell whose three heights are at least radius / (IMAGE_RANGE + 1) (1.5 Å: any reduced
    cell of a real crystal)."""
    steps = torch.arange(-IMAGE_RANGE, IMAGE_RANGE + 1, dtype=torch.float64)
    images = torch.cartesian_prod(steps, steps, steps)
    return images[images.abs().sum(-1) > 0]


def bond_directions(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Of bonds ``vectors (..., 3)`` Å: their lengths ``(...)`` Å (at least 1e-4 Å, so a zero bond
    divides safely) and ``r̂ r̂ᵀ (..., 3, 3)``, the virial's outer product of each bond's direction."""
    length = safe_norm(vectors)
    unit = vectors / length.unsqueeze(-1)
    return length, unit.unsqueeze(-1) * unit.unsqueeze(-2)


class CellVirial(nn.Module):
    """One layer's bond strain: ``(N, H)`` atom scalars + geometry -> ``(G, 3, 3)`` symmetric ε.

    A bond's weight is ``φ = w · (silu(A s_i + A s_j + c) ⊙ R(d))``: its two ends' features (summed, so
    the bond has no direction) times a learned radial profile ``R`` of its length d (Gaussians, faded
    to zero at the radius); ``w`` starts at zero."""

    def __init__(self, hidden: int, radius: float = RADIUS):
        super().__init__()
        self.atom = nn.Linear(hidden, BOND_WIDTH)
        self.length = nn.Linear(NUM_BOND_BASIS, BOND_WIDTH, bias=False)
        self.out = nn.Linear(BOND_WIDTH, 1, bias=False)
        nn.init.zeros_(self.out.weight)
        self.radius = float(radius)
        self.register_buffer("centres", torch.linspace(0.0, self.radius, NUM_BOND_BASIS, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("images", own_image_steps(), persistent=False)

    def forward(self, s: Tensor, pos: Tensor, cell: Tensor, ctx: Context) -> Tensor:
        """ε ``(G, 3, 3)`` of each crystal from its bonds at the current positions and cell.

        s: ``(N, H)`` atom scalars; pos: ``(N, 3)`` Å; cell: ``(G, 3, 3)`` Å, rows a, b, c.
        """
        edge_index, cell_offsets, edge_graph = ctx.edges
        # .to(cell.dtype): under bf16 autocast the linear maps come out in bf16; the sums over the
        # bonds stay in the cell's dtype (a no-op otherwise).
        ends = self.atom(s).to(cell.dtype)  # (N, W)
        weight = self.out.weight[0]  # (W,)
        # Bonds between distinct atoms: the graph's edges. Its periodic self-images are six fixed
        # one-way edges instead (+a, +b, +c, +b+c, +a+c, +a+b: spec §3.4), three of a cubic cell's
        # twelve face diagonals, which would shear a cubic crystal: they are left out here ...
        radial, outer = self._radial(edge_vectors(pos, cell, edge_index, cell_offsets, edge_graph))
        distinct = (edge_index[0] != edge_index[1]).to(s.dtype)
        phi = (nn.functional.silu(ends[edge_index[0]] + ends[edge_index[1]]) * radial) @ weight * distinct
        strain = cell.new_zeros(cell.shape[0], 3, 3).index_add_(0, edge_graph, phi.reshape(-1, 1, 1) * outer)
        # ... and every atom's bonds to its own images (the lattice vectors within the radius) are
        # summed here, in both directions as the graph has each bond between distinct atoms. φ is
        # linear in the radial profile, so the sum over images is taken once per crystal.
        radial, outer = self._radial(torch.einsum("lk,gkx->glx", self.images.to(cell.dtype), cell))
        per_feature = torch.einsum("glw,glxy->gwxy", radial, outer)  # (G, W, 3, 3)
        own = torch.einsum("nw,nwxy->nxy", nn.functional.silu(2.0 * ends) * weight, per_feature[ctx.graph_index])
        own = own.to(cell.dtype)  # bf16 under autocast, as the einsums of the rest of the model
        strain = strain.index_add_(0, ctx.graph_index, own)
        counts = (ctx.ptr[1:] - ctx.ptr[:-1]).clamp(min=1).to(cell.dtype)
        return strain / counts.reshape(-1, 1, 1)

    def _radial(self, vectors: Tensor) -> tuple[Tensor, Tensor]:
        """Of bonds ``vectors (..., 3)`` Å: their radial profiles ``R(d) (..., W)``, zero from the
        radius on (a smooth envelope: a bond leaving the radius as the atoms move fades out instead
        of jumping), and ``r̂ r̂ᵀ (..., 3, 3)``."""
        length, outer = bond_directions(vectors)
        spacing = self.radius / (NUM_BOND_BASIS - 1)
        basis = torch.exp(-(((length.unsqueeze(-1) - self.centres.to(length.dtype)) / spacing) ** 2))
        envelope = 0.5 * (1.0 + torch.cos(math.pi * (length / self.radius).clamp(max=1.0)))
        return self.length(basis).to(length.dtype) * envelope.unsqueeze(-1), outer
