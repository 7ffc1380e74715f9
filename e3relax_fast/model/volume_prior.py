"""An isotropic rescale of each crystal before the first layer, from how strained its bonds are for
their elements (``E3Relax(volume_prior=True)``, default mode only).

Why: most of the coordinate error of the shipped models is the cell's (the true-cell baseline of
``eval``), and the cell is limited by how well the model knows a crystal's equilibrium volume; on
chemistry it has not seen it barely moves the volume at all (the model card). The model's edges carry
the distance alone, through a 30 Å basis, so whether a 2.4 Å bond is short or long is left to the
learned element embeddings of both ends — which know only the elements and combinations of the
training pairs. Here each edge is described by its distance relative to the sum of its elements'
covalent radii, ``x = ln(d / (r_i + r_j))`` (0 for a bond at the sum of the radii, the same scale for
every element), beside both elements' physical descriptors
(:func:`~e3relax_fast.model.elements.element_feature_table`): an element never trained on still has
a radius. A small MLP turns each edge into a vote for ``ln s``; a crystal's votes are averaged over
its edges (not the periodic self-images, which the graph rule takes along the cell's own basis),
bounded (``|ln s| ≤ LOG_SCALE_BOUND``), and the crystal is scaled by ``s`` about its centroid (cell
rows and positions), keeping its fractional coordinates.

The vote's last layer starts at zero: a model grown with the prior (``train --init``) starts with the
predictions of its checkpoint. Rotations, translations and the choice of cell leave the mean over a
crystal's edges unchanged, so the rescale is equivariant as the rest of the model; so do supercells
of a crystal with no periodic image of an atom within the graph radius (otherwise the supercell has
edges the cell left out as self-images: ``relax_batch``'s canonical frame answers for supercells).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..geometry import edge_vectors, safe_norm
from .elements import ELEMENTS, NUM_FEATURES, element_feature_table

#: Centres (and width) of the Gaussians over ``x = ln(d / (r_i + r_j))``: from bonds 45 % shorter
#: than the radii's sum to neighbours 2.7 × farther, 0.06 apart.
STRAIN_CENTRES, STRAIN_WIDTH = torch.linspace(-0.6, 1.0, 27, dtype=torch.float64), 0.06
#: The largest |ln s|: a rescale of the cell's edges by 0.67–1.49 (the volume by 0.30–3.3; the
#: generator drops pairs whose volume changes 3× or more).
LOG_SCALE_BOUND = 0.4


class VolumePrior(nn.Module):
    """Per crystal, ``ln s`` from its edges' strains; :meth:`forward` applies the rescale.

    Args:
        num_elements: rows of the element tables (indexed by Z).
        hidden: width of the per-edge MLP.
    """

    def __init__(self, num_elements: int, hidden: int):
        super().__init__()
        radii = torch.ones(num_elements, dtype=torch.float64)  # row 0 (no element) is never indexed
        radii[1:] = torch.tensor([row[0] for row in ELEMENTS[:num_elements - 1]], dtype=torch.float64)
        dtype = torch.get_default_dtype()
        self.register_buffer("radii", radii.to(dtype))
        self.register_buffer("elements", element_feature_table(num_elements).to(dtype))
        self.register_buffer("centres", STRAIN_CENTRES.to(dtype))
        self.strain_proj = nn.Linear(len(STRAIN_CENTRES), hidden)
        self.element_proj = nn.Linear(NUM_FEATURES, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def bond_strain(self, pos: Tensor, cell: Tensor, numbers: Tensor, edges: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``(E,)`` ``x = ln(d / (r_i + r_j))`` of every edge: its length against its elements' radii.

        pos ``(N, 3)`` Å, cell ``(G, 3, 3)`` Å (rows), numbers ``(N,)`` int64 Z, edges the receiver-sorted
        ``(edge_index (2, E), cell_offsets (E, 3), edge_graph (E,))`` of :class:`~.layers.Context`.
        """
        edge_index, cell_offsets, edge_graph = edges
        d = safe_norm(edge_vectors(pos, cell, edge_index, cell_offsets, edge_graph))
        return torch.log(d / (self.radii[numbers[edge_index[0]]] + self.radii[numbers[edge_index[1]]]))

    def log_scale(self, pos: Tensor, cell: Tensor, numbers: Tensor, edges: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``(G,)`` ln s of each crystal: the mean vote of its edges between two atoms within the graph
        radius (0 for a crystal without such an edge, e.g. one atom per cell); arguments as
        :meth:`bond_strain`."""
        edge_index, _, edge_graph = edges
        x = self.bond_strain(pos, cell, numbers, edges)
        basis = torch.exp(-(((x[:, None] - self.centres) / STRAIN_WIDTH) ** 2))
        pair = self.elements[numbers[edge_index[0]]] + self.elements[numbers[edge_index[1]]]
        votes = self.out(nn.functional.silu(self.strain_proj(basis) + self.element_proj(pair))).squeeze(-1)
        # The graph's self-image edges (j = i: six per atom along the cell's own basis vectors, whatever
        # their length; spec §3.4) depend on how the cell is written: they do not vote.
        voting = (edge_index[0] != edge_index[1]).to(votes.dtype)
        total = pos.new_zeros(cell.shape[0]).index_add_(0, edge_graph, votes * voting)
        count = pos.new_zeros(cell.shape[0]).index_add_(0, edge_graph, voting)
        return LOG_SCALE_BOUND * torch.tanh(total / count.clamp(min=1) / LOG_SCALE_BOUND)

    def forward(self, pos: Tensor, cell: Tensor, numbers: Tensor, ctx) -> tuple[Tensor, Tensor, Tensor]:
        """The rescaled ``(positions (N, 3), cells (G, 3, 3))``: each crystal's cell times ``s``, its atoms
        moved away from (or towards) its centroid by the same factor; and ``ln s`` ``(G,)``. ``ctx``: the
        forward's Context."""
        log_scale = self.log_scale(pos, cell, numbers, ctx.edges)
        # The rescale passes no gradient back: the layers' loss terms would teach the prior to leave
        # the volume to the layers (a model grown from a checkpoint already changes it there). The
        # prior learns from its own term (``train --prior-weight``), the layers from what it gives them.
        scale = torch.exp(log_scale.detach())
        centres = ctx.lattice_pool(pos, ctx.ptr, ctx.graph_index)[ctx.graph_index]
        return centres + (pos - centres) * scale[ctx.graph_index, None], cell * scale[:, None, None], log_scale
