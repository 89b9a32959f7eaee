"""SVI: the trainer of a model and an amortized guide, the compiled ELBO, and evaluation."""

from .compiled import CompiledELBO, Term, TracingFailed, is_compilable
from .trainer import SVITrainer, TrainingDiverged, TrainResult

__all__ = [
    "CompiledELBO",
    "SVITrainer",
    "Term",
    "TracingFailed",
    "TrainResult",
    "TrainingDiverged",
    "is_compilable",
]
