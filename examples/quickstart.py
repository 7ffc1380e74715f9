"""Quickstart: relax the example crystals in this folder with one batched call.

    python examples/quickstart.py

Prints, per structure, the largest atomic displacement and the volume change predicted by the
shipped default model (README, "Pretrained model": a small model trained on CHGNet relaxations;
treat its numbers accordingly). If the package was installed without its weights, it falls back
to an UNTRAINED, randomly initialised model and says so loudly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Structure

from e3relax_fast import E3Relax, load_pretrained, relax_batch
from e3relax_fast.model import PretrainedModelNotFoundError

HERE = Path(__file__).resolve().parent


def get_model() -> E3Relax:
    """The bundled pretrained model if there is one, else an untrained seeded small model."""
    try:
        return load_pretrained("default")
    except PretrainedModelNotFoundError:
        print("=" * 78)
        print("WARNING: no pretrained model ships yet; using an UNTRAINED random model")
        print("(torch.manual_seed(0); E3Relax(hidden_channels=64, num_layers=4)).")
        print("The output below demonstrates the API only. It is NOT a physical relaxation.")
        print("=" * 78)
        torch.manual_seed(0)
        return E3Relax(hidden_channels=64, num_layers=4)


def main() -> None:
    paths = sorted(HERE.glob("*.cif"))
    with warnings.catch_warnings():
        # pymatgen notes that it snapped coordinates such as 0.33333333 to 1/3 (wurtzite).
        warnings.filterwarnings("ignore", message="Issues encountered while parsing CIF")
        structures = [Structure.from_file(path) for path in paths]

    relaxed = relax_batch(structures, model=get_model())

    print(f"{'structure':32s} {'atoms':>5s} {'max |dp| (A)':>13s} {'dV/V (%)':>9s}")
    for path, before, after in zip(paths, structures, relaxed, strict=True):
        # Sites correspond by index and positions are not wrapped, so differences are displacements.
        displacement = np.linalg.norm(after.cart_coords - before.cart_coords, axis=1).max()
        volume_change = 100 * (after.volume / before.volume - 1)
        print(f"{path.stem:32s} {len(before):5d} {displacement:13.4f} {volume_change:+9.2f}")


if __name__ == "__main__":
    main()
