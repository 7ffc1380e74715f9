"""Loading trained E3Relax weights: bundled models by name, or checkpoints by path.

Two checkpoint formats are read, both with ``torch.load(..., weights_only=True)`` (no pickled code):

- **the original's** (the authors' published EMA weights, spec §11): a plain state dict
  ``{name: tensor}``, names possibly prefixed with ``module.``, without the
  ``radial_basis.rbf.offset`` buffer. It loads into ``E3Relax(paper_compat=True)`` with
  ``hidden_channels``, ``num_layers``, ``num_rbf`` and ``num_elements`` inferred from the shapes.
- **this package's**: a dict with ``"state_dict"`` and ``"config"`` (the model's constructor
  arguments, ``paper_compat`` included; a top-level ``"paper_compat"`` entry overrides it). What
  the package writes (``train``'s ``best.pt``/``last.pt``) always records the mode this way.

A bare state dict that holds the RBF buffer (``torch.save(model.state_dict(), path)`` of an
:class:`E3Relax`) is ambiguous: it says nothing about the mode, and loading it in the wrong one
moves atoms by tenths of an Å without any error. :func:`load_pretrained` therefore refuses it unless
``paper_compat=`` is given.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import torch

from .e3relax import EDGE_CUTOFF_KEY, TRANSPORT_MARKER, E3Relax
from .predict import check_device

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
        ``{"hidden_channels", "num_layers", "num_rbf", "num_elements", "cell_transport",
        "element_features", "cell_strain", "cell_mix", "edge_cutoff", "volume_prior", "cell_virial",
        "bond_radii", "bond_forces"}`` read
        from the shapes of
        ``atom_emb.embeddings.weight`` ``(num_elements, H)``, the ``message_passing_layers.{n}`` indices,
        ``message_passing_layers.0.edge_proj.weight`` ``(3H, R)`` and the presence of the transport
        marker buffer, of the element features' map, of the cell-strain scalars, of the cell-mix maps and
        of the volume prior, of the bond strain and of the relative-length bond strain and its forces, and
        the edge-cutoff buffer (``None`` without it).
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
        "cell_transport": TRANSPORT_MARKER in state_dict,
        "element_features": "element_features.proj.weight" in state_dict,
        "cell_strain": "cell_strain_layers.0.0.weight" in state_dict,
        "cell_mix": "cell_mix_layers.0.0.weight" in state_dict,
        "edge_cutoff": float(state_dict[EDGE_CUTOFF_KEY]) if EDGE_CUTOFF_KEY in state_dict else None,
        "volume_prior": "volume_prior.out.weight" in state_dict,
        "cell_virial": "cell_virial_layers.0.out.weight" in state_dict,
        "bond_radii": "bond_radii_layers.0.out.weight" in state_dict,
        "bond_forces": "bond_radii_layers.0.force.weight" in state_dict,
    }


def _bare_mode(path: Path, state: dict, paper_compat: bool | None) -> bool:
    """The mode of a bare state dict: as asked; else the original's for the authors' format (no RBF
    buffer: their weights are only correct with the original's arithmetic, spec §11); else refused."""
    if paper_compat is not None:
        return paper_compat
    if "radial_basis.rbf.offset" not in state:
        return True
    raise ValueError(
        f"{path} is a bare state dict of an E3Relax model (torch.save(model.state_dict(), path)), which does "
        "not record the model's mode: pass load_pretrained(path, paper_compat=False) for this package's "
        "default mode or paper_compat=True for the original's arithmetic (CLI: --paper-compat / "
        "--no-paper-compat), or save {'state_dict': model.state_dict(), 'config': model.config} instead"
    )


def load_pretrained(
    name_or_path: str | Path = "default", map_location: str | torch.device = "cpu", paper_compat: bool | None = None
) -> E3Relax:
    """Return a trained :class:`~e3relax_fast.model.E3Relax` in eval mode on ``map_location``.

    Args:
        name_or_path: a bundled model name (``"default"``) or the path of a checkpoint file in
            either format described in the module docstring.
        map_location: device the weights are loaded to and the model is placed on.
        paper_compat: the mode, for a file that does not record it (a bare state dict); required for
            one that holds the RBF buffer (``torch.save(model.state_dict(), path)``), which could be
            of either mode. A file that records its mode must agree with it.

    Raises:
        PretrainedModelNotFoundError: the bundled model is not shipped (none is yet) or the file
            does not exist. A ``FileNotFoundError``.
        ValueError: the file is not a PyTorch file or not an E3Relax checkpoint, its parameters do
            not match, its mode is ambiguous and ``paper_compat`` was not given, or it contradicts
            ``paper_compat``; or ``map_location`` is a CUDA device and CUDA is not available.
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

    map_location = check_device(map_location)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    # torch.load raises many types on a file that is not a (safe) PyTorch file: KeyError for text,
    # EOFError when empty, RuntimeError for a truncated zip, UnpicklingError for arbitrary pickles.
    except Exception as err:
        reason = type(err).__name__ + (f": {str(err).splitlines()[0]}" if str(err).strip() else "")
        raise ValueError(f"{path}: not a PyTorch checkpoint that loads with weights_only=True ({reason})") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not an E3Relax checkpoint (got {type(checkpoint).__name__})")
    if "state_dict" in checkpoint:
        state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
        config = {**infer_config(state), **dict(checkpoint.get("config") or {})}
        if "paper_compat" in checkpoint:
            config["paper_compat"] = bool(checkpoint["paper_compat"])
        if "paper_compat" in config and paper_compat is not None and bool(config["paper_compat"]) != paper_compat:
            raise ValueError(f"{path} records paper_compat={bool(config['paper_compat'])}, "
                             f"but paper_compat={paper_compat} was asked for")
        config.setdefault("paper_compat", paper_compat)
        if config["paper_compat"] is None:
            raise ValueError(f"{path}: the checkpoint's config does not record paper_compat; pass "
                             "load_pretrained(path, paper_compat=True or False)")
    elif all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state = {k.removeprefix("module."): v for k, v in checkpoint.items()}
        config = {**infer_config(state), "paper_compat": _bare_mode(path, state, paper_compat)}
    else:
        raise ValueError(
            f"{path}: not an E3Relax checkpoint (expected a state dict of tensors or a dict with "
            f"'state_dict'; found keys {sorted(map(str, checkpoint))[:8]})"
        )

    try:
        model = E3Relax(**config)
    except ValueError as err:  # e.g. a cell_transport state dict asked for in paper_compat mode
        raise ValueError(f"{path}: {err}") from err
    try:
        # E3Relax.load_state_dict regenerates the RBF buffer when the checkpoint lacks it.
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: parameters do not match E3Relax({config}): {err}") from err
    return model.to(torch.device(map_location)).eval()


def package_checkpoint(checkpoint: str | Path, card: dict, out: str | Path) -> Path:
    """Write ``out``, a model file as the bundled ``weights/default.pt`` is: a ``train`` run's
    ``best.pt`` (its EMA weights and the model's config) with ``card``, the model card's entries
    (name, version, data, training command, metrics; JSON types, so the card reads the same anywhere).

    Raises:
        PretrainedModelNotFoundError: no such checkpoint file (a ``FileNotFoundError``).
        ValueError: the file is not a loadable E3Relax checkpoint, or not a ``best.pt`` (``last.pt``
            holds the raw weights beside the EMA ones: ship the EMA ones), or ``card`` is not JSON.
    """
    import json

    try:
        load_pretrained(checkpoint)  # a file that does not load as a model is refused here, by name
    except ValueError as err:
        if _is_resume_file(checkpoint):
            raise ValueError(f"{checkpoint}: a train run's last.pt (raw weights and optimiser state); package "
                             "the run's best.pt, the EMA weights its validation signal chose") from err
        raise
    best = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(best.get("config"), dict) or "state_dict" not in best:
        raise ValueError(f"{checkpoint}: not a train run's best.pt (it needs 'state_dict' and 'config'; "
                         f"found keys {sorted(map(str, best))[:8]})")
    try:
        card = json.loads(json.dumps(card))
    except (TypeError, ValueError) as err:
        raise ValueError(f"the model card is not JSON: {err}") from err
    out = Path(out)
    torch.save({"state_dict": best["state_dict"], "config": best["config"], "card": card}, out)
    return out


def _is_resume_file(path: str | Path) -> bool:
    """Whether ``path`` is a ``train`` run's ``last.pt`` (raw and EMA weights beside the optimiser's
    state), which ``load_pretrained`` refuses as it would any other dict it does not know."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable file is simply not a last.pt: the caller's error stands
        return False
    return isinstance(content, dict) and {"model", "ema", "optimizer"} <= content.keys()
