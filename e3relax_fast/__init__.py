"""e3relax-fast: one-shot prediction of relaxed crystal structures (E3Relax, arXiv 2511.12243).

Importing the package needs only torch and numpy: pymatgen/ASE are imported when structures of
theirs are passed, and compiled or Triton backends are optional. This module only re-exports the
public names; the layout is in README.md.
"""

from .batch import Batch, Graph
from .graph import build_graph
from .io import InvalidStructureError
from .model import E3Relax, E3RelaxOutput, load_pretrained
from .ops import BackendUnavailableError
from .relax import RelaxResult, relax_batch
from .training import layerwise_loss, unwrap_targets

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
