"""The original E3Relax user pipeline, run in its own environment by :mod:`bench.bench_original`.

Not part of this package: it imports the original's modules from ``--src`` (a checkout of the authors'
public repository, which is never copied into ours) and runs its ``predict_relaxed_structure.py``
loop without the file I/O: per structure, ``AtomsToGraphs(radius=6, max_neigh=50).convert_single``
(pymatgen's neighbour list, a per-centre top-50, six self-image edges), a batch of one
(``torch_geometric`` ``Batch.from_data_list``), the eager forward under ``torch.no_grad()``, and the
last layer's positions and cell back to numpy.

Protocol (one JSON object per stdout line): after start-up it writes the seeded model's state dict to
``--state-out`` and prints ``{"ready": ...}``; then for each stdin line ``run`` it runs the pipeline over
every input and prints ``{"seconds": t}``; ``dump PATH`` saves the last run's predictions
(``positions`` concatenated, ``cells`` (G, 3, 3)) to PATH (.npz); ``quit`` ends it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", required=True, help="the original repository's files")
    ap.add_argument("--inputs", required=True, help=".npz with numbers, positions (concatenated), cells, ptr")
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--state-out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, args.src)
    import numpy as np
    import torch
    from ase import Atoms
    from E3Relax import E3Relax
    from graph_constructor import AtomsToGraphs
    from torch_geometric.data import Batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = E3Relax(hidden_channels=args.hidden, num_layers=args.layers, num_rbf=128, cutoff=30.0,
                    num_elements=118).eval()
    torch.save(model.state_dict(), args.state_out)
    data = np.load(args.inputs)
    ptr = data["ptr"]
    structures = [Atoms(numbers=data["numbers"][a:b], positions=data["positions"][a:b], cell=data["cells"][g],
                        pbc=True) for g, (a, b) in enumerate(zip(ptr[:-1], ptr[1:], strict=True))]
    a2g = AtomsToGraphs(radius=6, max_neigh=50)

    def run() -> list:
        out = []
        for atoms in structures:
            batch = Batch.from_data_list([a2g.convert_single(atoms)])
            with torch.no_grad():
                positions, cells = model(batch)
            out.append((positions[-1].numpy(), cells[-1].squeeze(0).numpy()))
        return out

    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    last = []
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            t0 = time.perf_counter()
            last = run()
            print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        elif cmd == "dump":
            np.savez(arg, positions=np.concatenate([p for p, _ in last]), cells=np.stack([c for _, c in last]))
            print(json.dumps({"dumped": arg}), flush=True)
        elif cmd == "quit":
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
