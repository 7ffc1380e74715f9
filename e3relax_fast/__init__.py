"""e3relax-fast: one-shot prediction of relaxed crystal structures (E3Relax, arXiv 2511.12243).

Importing the package needs only torch and numpy: pymatgen/ASE are imported when structures of
theirs are passed, and compiled or Triton backends are optional.
"""

import os as _os

# Source checkout run with PYTHONPATH=<repo root>: the subpackage e3relax_fast.kernels is the top-level
# kernels/ folder (pyproject maps it there on install), so let the import system look beside us too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")) and not _os.path.isdir(
        _os.path.join(_root, "e3relax_fast", "kernels")):
    __path__.append(_root)

from .backends import BackendUnavailableError
from .batch import Batch
from .graph import Graph, build_graph
from .loss import layerwise_loss, unwrap_targets
from .model import E3Relax, E3RelaxOutput
from .pretrained import load_pretrained
from .relax import RelaxResult, relax_batch
from .structures import InvalidStructureError

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Batch",
    "E3Relax",
    "E3RelaxOutput",
    "Graph",
    "InvalidStructureError",
    "RelaxResult",
    "__version__",
    "build_graph",
    "layerwise_loss",
    "load_pretrained",
    "relax_batch",
    "unwrap_targets",
]
