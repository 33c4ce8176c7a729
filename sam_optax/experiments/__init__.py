"""Small, reproducible experiments on locally generated data (the ``sam-optax``
command and ``benchmarks/`` use them): datasets, models, method recipes and a
training loop."""

from sam_optax.experiments.datasets import Dataset, add_label_noise, load
from sam_optax.experiments.methods import METHODS, Hyper, build_method
from sam_optax.experiments.models import make_model
from sam_optax.experiments.training import RunResult, train_method

__all__ = [
    "Dataset",
    "Hyper",
    "METHODS",
    "RunResult",
    "add_label_noise",
    "build_method",
    "load",
    "make_model",
    "train_method",
]
