"""Datasets generated locally (never downloaded): MNIST-1D and sklearn's digits."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
    """A classification data set: train and test splits as numpy arrays, and the clean train labels."""

    name: str
    x_train: np.ndarray  # float32 [n, features]
    y_train: np.ndarray  # int32 [n] (possibly noisy)
    x_test: np.ndarray
    y_test: np.ndarray  # clean
    num_classes: int
    y_train_clean: np.ndarray


def _mnist1d(seed: int, num_samples: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)  # the generator: deterministic from the seed, no download
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int32),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int32),
    )


def _digits(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    n = int(0.8 * len(x))
    return x[:n], y[:n], x[n:], y[n:]


def add_label_noise(y: np.ndarray, rate: float, num_classes: int, seed: int) -> np.ndarray:
    """Symmetric label noise: each label, with probability ``rate``, is replaced by
    a class drawn uniformly from the *other* ``num_classes - 1`` classes."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label noise rate must be in [0, 1], got {rate}.")
    rng = np.random.default_rng(seed + 7919)
    flip = rng.random(len(y)) < rate
    other = (y + rng.integers(1, num_classes, len(y))) % num_classes
    return np.where(flip, other, y).astype(np.int32)


def load(name: str = "mnist1d", *, seed: int = 0, label_noise: float = 0.0, num_samples: int = 4000) -> Dataset:
    """``mnist1d`` (the ``mnist1d`` package's generator, 40 features, 80/20 split)
    or ``digits`` (sklearn's bundled 8x8 digits, 64 features, 80/20 split).
    Features are standardized with the training set's statistics."""
    if name == "mnist1d":
        xtr, ytr, xte, yte = _mnist1d(seed, num_samples)
    elif name == "digits":
        xtr, ytr, xte, yte = _digits(seed)
    else:
        raise ValueError(f"dataset must be 'mnist1d' or 'digits', got {name!r}.")
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    noisy = add_label_noise(ytr, label_noise, 10, seed) if label_noise > 0 else ytr
    return Dataset(name, xtr, noisy, xte, yte, 10, ytr)
