"""The E3Relax model: :class:`E3Relax` (:mod:`.e3relax`), its layers (:mod:`.layers`), loading
trained weights (:mod:`.pretrained`) and the one loop that runs a model over many crystals
(:mod:`.predict`)."""

from .e3relax import E3Relax, E3RelaxOutput
from .predict import predict_batches
from .pretrained import PretrainedModelNotFoundError, load_pretrained

__all__ = ["E3Relax", "E3RelaxOutput", "PretrainedModelNotFoundError", "load_pretrained", "predict_batches"]
