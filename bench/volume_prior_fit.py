"""How well the model's volume prior, alone, knows the volume of a seed family it was not fitted on.

:class:`e3relax_fast.model.volume_prior.VolumePrior` (each edge's length against its elements'
covalent radii, and both elements' descriptors, through a small MLP, averaged per crystal) fitted
by itself — no message passing, no layers — to every training pair's ``ln(V_relaxed / V_input) / 3``
(L1, Adam), leaving one seed family out: fitted on the training split of every other family,
scored on all pairs of the held-out one, per protocol, as the mean absolute error of ln V against
Dummy's (ln V unchanged) and the correlation with the true change.

    python -m bench.volume_prior_fit --data data/chgnet_v13sym --data data/chgnet_v4b --family carbon
    python -m bench.volume_prior_fit --data data/chgnet_v13sym --data data/chgnet_v4b --data data/chgnet_v5b \
        --family aflow --family pyxtal

It asks what the prior could bring to ``E3Relax(volume_prior=True)``: a model whose prior does not
beat Dummy here on a family cannot get that family's volume from it.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch

from bench.volume_descriptors import log_volume_change
from e3relax_fast import Batch
from e3relax_fast.batch import graph_index_from_ptr
from e3relax_fast.geometry import MAX_NEIGHBORS, RADIUS
from e3relax_fast.model.volume_prior import VolumePrior

CHUNK = 256  # crystals per optimiser step


def prepare(pairs: list) -> list[tuple[Batch, tuple, torch.Tensor]]:
    """The unrelaxed inputs in chunks of ``CHUNK`` float32 crystals with the model's graph, their edges
    and each crystal's target ``ln(V_relaxed / V_input) / 3``."""
    chunks = []
    for start in range(0, len(pairs), CHUNK):
        part = pairs[start:start + CHUNK]
        batch = Batch.from_arrays([(p.atomic_numbers, p.pos_unrelaxed, p.cell_unrelaxed) for p in part],
                                  dtype=torch.float32).with_graph(RADIUS, MAX_NEIGHBORS)
        edge_graph = graph_index_from_ptr(batch.ptr, batch.num_atoms)[batch.edge_index[1]]
        change = torch.tensor([log_volume_change(p) / 3 for p in part])
        chunks.append((batch, (batch.edge_index, batch.cell_offsets, edge_graph), change))
    return chunks


def predict(prior: VolumePrior, chunks: list) -> np.ndarray:
    """``ln s`` of every crystal of ``chunks``, in order."""
    with torch.no_grad():
        return torch.cat([prior.log_scale(b.positions, b.cells, b.atomic_numbers, e) for b, e, _ in chunks]).numpy()


def fit(chunks: list, epochs: int = 30, lr: float = 3e-3, seed: int = 0) -> VolumePrior:
    """A float32 :class:`VolumePrior` (H = 64) fitted to the chunks' targets: L1, Adam, chunks shuffled."""
    torch.manual_seed(seed)
    prior = VolumePrior(118, 64)
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for k in rng.permutation(len(chunks)):
            batch, edges, change = chunks[k]
            loss = (prior.log_scale(batch.positions, batch.cells, batch.atomic_numbers, edges) - change).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return prior


def score(pairs: list, predicted: np.ndarray) -> list[tuple[str, int, float, float, float]]:
    """Per protocol and for all: ``(group, pairs, Dummy's mean |ln V change|, the prior's mean |ln V
    error|, correlation)`` — ln V, three times the per-length quantities fitted."""
    true = np.array([log_volume_change(p) for p in pairs])
    predicted = 3 * predicted
    groups = collections.defaultdict(list)
    for k, pair in enumerate(pairs):
        groups[pair.protocol or "?"].append(k)
        groups["all"].append(k)
    rows = []
    for name in sorted(groups, key=lambda g: (g == "all", g)):
        idx = np.array(groups[name])
        corr = float(np.corrcoef(true[idx], predicted[idx])[0, 1]) if len(idx) > 2 and true[idx].std() > 0 else np.nan
        rows.append((name, len(idx), float(np.abs(true[idx]).mean()), float(np.abs(predicted[idx] - true[idx]).mean()),
                     corr))
    return rows


def main(argv: list[str] | None = None) -> None:
    from e3relax_fast.io import read_pairs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, help="pairs folder (repeatable)")
    parser.add_argument("--family", action="append", help="held-out family (repeatable; default: every family)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    splits = {split: read_pairs(args.data, split) for split in ("train", "val", "test")}
    every = [p for pairs in splits.values() for p in pairs]
    families = args.family or sorted({p.family for p in every if p.family})
    print(f"# The volume prior alone, one seed family left out ({', '.join(args.data)}; {args.epochs} epochs)\n")
    print("| held-out family | protocol | pairs | Dummy: mean abs ln V change | prior: mean abs ln V error | "
          "prior / Dummy | correlation |\n|---|---|---|---|---|---|---|")
    for family in families:
        start = time.perf_counter()
        prior = fit(prepare([p for p in splits["train"] if p.family != family]), args.epochs, seed=args.seed)
        held_out = [p for p in every if p.family == family]
        for name, n, dummy, error, corr in score(held_out, predict(prior, prepare(held_out))):
            ratio = f"{error / dummy:.3f}" if dummy > 0 else "n/a"
            print(f"| {family} | {name} | {n} | {dummy:.4f} | {error:.4f} | {ratio} | {corr:.2f} |")
        print(f"<!-- {family}: {time.perf_counter() - start:.0f} s -->")


if __name__ == "__main__":
    main()
