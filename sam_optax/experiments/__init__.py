"""Small, reproducible experiments on locally generated data (the ``sam-optax``
command and ``benchmarks/`` use them): datasets, models, method recipes and a
training loop.

They need the ``examples`` extra (``pip install sam-optax[examples]``: Flax,
mnist1d, scikit-learn, matplotlib, tqdm). The names below are imported on first
use, so that ``sam_optax.experiments._io`` and ``._interrupt`` (standard library
only; the ``sam-optax`` command's output files and Ctrl-C) import without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sam_optax.experiments.datasets import Dataset, add_label_noise, load
    from sam_optax.experiments.methods import METHODS, Hyper, build_method
    from sam_optax.experiments.models import make_model
    from sam_optax.experiments.training import RunResult, train_method

_SOURCE = {
    "Dataset": "datasets",
    "add_label_noise": "datasets",
    "load": "datasets",
    "METHODS": "methods",
    "Hyper": "methods",
    "build_method": "methods",
    "make_model": "models",
    "RunResult": "training",
    "train_method": "training",
}


def __getattr__(name: str) -> Any:
    if name in _SOURCE:
        value = getattr(importlib.import_module(f"sam_optax.experiments.{_SOURCE[name]}"), name)
        globals()[name] = value  # later look-ups (and monkeypatch) see a plain attribute
        return value
    raise AttributeError(f"module 'sam_optax.experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCE))


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
