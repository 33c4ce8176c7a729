"""Small Flax Linen models for the experiments."""

from __future__ import annotations

import flax.linen as nn


class MLP(nn.Module):
    """A two-hidden-layer ReLU perceptron."""

    hidden: int = 256
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class CNN1D(nn.Module):
    """A 1-D convnet over the feature sequence (as in the MNIST-1D paper)."""

    channels: int = 32
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x[..., None]
        x = nn.relu(nn.Conv(self.channels, (5,))(x))
        x = nn.relu(nn.Conv(self.channels, (5,), strides=(2,))(x))
        x = nn.relu(nn.Conv(self.channels, (3,), strides=(2,))(x))
        return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def make_model(name: str, num_classes: int = 10) -> nn.Module:
    """The model called ``name`` (``"mlp"`` or ``"cnn"``) with ``num_classes`` outputs."""
    if name == "mlp":
        return MLP(num_classes=num_classes)
    if name == "cnn":
        return CNN1D(num_classes=num_classes)
    raise ValueError(f"model must be 'mlp' or 'cnn', got {name!r}.")


def logits_fn(model: nn.Module):
    """``f(params, x)``: the logits of ``model`` at ``params`` (no mutable collections)."""
    return lambda params, x: model.apply({"params": params}, x)


__all__ = ["CNN1D", "MLP", "logits_fn", "make_model"]
