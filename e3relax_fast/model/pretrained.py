"""Loading trained E3Relax weights: bundled models by name, or checkpoints by path.

Two checkpoint formats are read, both with ``torch.load(..., weights_only=True)`` (no pickled code):

- **the original's** (the authors' published EMA weights, spec §11): a plain state dict
  ``{name: tensor}``, names possibly prefixed with ``module.``, without the
  ``radial_basis.rbf.offset`` buffer. It loads into ``E3Relax(paper_compat=True)`` with
  ``hidden_channels``, ``num_layers``, ``num_rbf`` and ``num_elements`` inferred from the shapes.
- **this package's**: a dict with ``"state_dict"`` and ``"config"`` (the model's constructor
  arguments, ``paper_compat`` included; a top-level ``"paper_compat"`` entry overrides it).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

from .e3relax import E3Relax

#: Names of the models that can ship as package data under ``e3relax_fast/weights/<name>.pt``.
BUNDLED = ("default",)

_LAYER_KEY = re.compile(r"^message_passing_layers\.(\d+)\.")


class PretrainedModelNotFoundError(FileNotFoundError):
    """The requested pretrained model or checkpoint file does not exist."""


def _bundled_path(name: str) -> Path:
    return Path(str(resources.files("e3relax_fast").joinpath("weights", f"{name}.pt")))


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """Architecture of a state dict in the original's naming (``module.`` prefix already removed).

    Returns:
        ``{"hidden_channels", "num_layers", "num_rbf", "num_elements"}`` read from the shapes of
        ``atom_emb.embeddings.weight`` ``(num_elements, H)``, the ``message_passing_layers.{n}``
        indices and ``message_passing_layers.0.edge_proj.weight`` ``(3H, R)``.
    """
    try:
        num_elements, hidden = state_dict["atom_emb.embeddings.weight"].shape
        num_rbf = state_dict["message_passing_layers.0.edge_proj.weight"].shape[1]
    except KeyError as err:
        raise ValueError(f"not an E3Relax state dict: missing {err.args[0]!r}") from err
    layers = {int(m.group(1)) for key in state_dict if (m := _LAYER_KEY.match(key))}
    return {
        "hidden_channels": int(hidden),
        "num_layers": max(layers) + 1,
        "num_rbf": int(num_rbf),
        "num_elements": int(num_elements),
    }


def load_pretrained(
    name_or_path: str | Path = "default", map_location: str | torch.device = "cpu"
) -> E3Relax:
    """Return a trained :class:`~e3relax_fast.model.E3Relax` in eval mode on ``map_location``.

    Args:
        name_or_path: a bundled model name (``"default"``) or the path of a checkpoint file in
            either format described in the module docstring.
        map_location: device the weights are loaded to and the model is placed on.

    Raises:
        PretrainedModelNotFoundError: the bundled model is not shipped (none is yet) or the file
            does not exist. A ``FileNotFoundError``.
        ValueError: the file is not an E3Relax checkpoint, or its parameters do not match.
    """
    path = Path(name_or_path)
    if str(name_or_path) in BUNDLED:  # a file of that name must be given as e.g. "./default"
        path = _bundled_path(str(name_or_path))
        if not path.exists():
            raise PretrainedModelNotFoundError(
                f"no pretrained E3Relax model {name_or_path!r} ships with e3relax-fast yet "
                f"(looked for {path}). Pass a model explicitly, e.g. relax_batch(structures, "
                "model=load_pretrained('path/to/checkpoint.pt')) or model=E3Relax(...) with your "
                "own trained weights."
            )
    elif not path.is_file():
        raise PretrainedModelNotFoundError(
            f"no checkpoint file {str(path)!r}, and {str(name_or_path)!r} is not a bundled model "
            f"(bundled names: {', '.join(BUNDLED)})"
        )

    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not an E3Relax checkpoint (got {type(checkpoint).__name__})")
    if "state_dict" in checkpoint:
        state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
        config = {**infer_config(state), **dict(checkpoint.get("config") or {})}
        if "paper_compat" in checkpoint:
            config["paper_compat"] = bool(checkpoint["paper_compat"])
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
        # The original's weights are only correct with the original's arithmetic (spec §11).
        config = {**infer_config(state), "paper_compat": True}
    else:
        raise ValueError(
            f"{path}: not an E3Relax checkpoint (expected a state dict of tensors or a dict with "
            f"'state_dict'; found keys {sorted(map(str, checkpoint))[:8]})"
        )

    model = E3Relax(**config)
    try:
        # E3Relax.load_state_dict regenerates the RBF buffer when the checkpoint lacks it.
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: parameters do not match E3Relax({config}): {err}") from err
    return model.to(torch.device(map_location)).eval()
