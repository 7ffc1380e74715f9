"""Training and evaluation: pair datasets with targets and graphs (:mod:`.dataset`), the one loss
(:mod:`.loss`), the training loop with EMA and DDP (:mod:`.train`), the field's metrics
(:mod:`.metrics`), evaluation against the Dummy baseline (:mod:`.evaluate`) and the leave-one-family-out
table (:mod:`.lofo`)."""

from .dataset import PairDataset, perturbed_twins, with_minima
from .evaluate import evaluate, write_report
from .loss import LOSSES, LossTerms, layerwise_loss, unwrap_targets
from .train import TrainConfig, TrainingDivergedError, TrainingSetupError, init_distributed, train

__all__ = ["LOSSES", "LossTerms", "PairDataset", "TrainConfig", "TrainingDivergedError", "TrainingSetupError",
           "evaluate", "init_distributed", "layerwise_loss", "perturbed_twins", "train", "unwrap_targets",
           "with_minima", "write_report"]
