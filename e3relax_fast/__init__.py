"""e3relax-fast: one-shot prediction of relaxed crystal structures (E3Relax, arXiv 2511.12243)."""

from .backends import BackendUnavailableError
from .batch import Batch
from .graph import Graph, build_graph

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "Batch", "Graph", "build_graph", "__version__"]
