"""The 2-D toy of the WSAM paper (Fig. 2): SAM vs WSAM on a sharp and a flat minimum.

The loss (reconstructed; it reproduces every number printed in the figure, see
the project's algorithm notes) is a soft-min of two KL divergences of a
Gaussian :math:`\\mathcal N(\\mu, \\sigma^2)` to :math:`\\mathcal N(20, 30^2)` (flat
minimum) and :math:`\\mathcal N(-20, 10^2)` (sharp minimum):

    L(mu, sigma) = -log(0.7 exp(-KL_1 / 1.8^2) + 0.3 exp(-KL_2 / 1.2^2))

All runs start at (-6, 10) and take 150 steps of SGD with momentum 0.9 (lr 5)
with rho = 2.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax.experiments import _io

START = (-6.0, 10.0)
SHARP_MIN = (-16.8047, 12.8025)
FLAT_MIN = (19.8101, 29.9366)


def _kl(mu, sigma, m2, s2):
    return jnp.log(s2 / sigma) + (sigma**2 + (mu - m2) ** 2) / (2 * s2**2) - 0.5


def toy_loss(w, batch=None):
    """The WSAM toy loss of ``w = [mu, sigma]`` (``batch`` is ignored)."""
    del batch
    mu, sigma = w[0], w[1]
    a = 0.7 * jnp.exp(-_kl(mu, sigma, 20.0, 30.0) / 1.8**2)
    b = 0.3 * jnp.exp(-_kl(mu, sigma, -20.0, 10.0) / 1.2**2)
    return -jnp.log(a + b)


class Trajectory(NamedTuple):
    label: str
    points: np.ndarray  # [steps + 1, 2]


def run(steps: int = 150, lr: float = 5.0, rho: float = 2.0) -> list[Trajectory]:
    """SAM, WSAM gamma 0.6 and 0.95, coupled and decoupled, from the same start.

    Runs in float64 (inside ``jax.enable_x64``, without switching 64-bit mode on
    for the rest of the process): the example is 2-D, so the cost is nil, and
    float32 rounding moves coupled WSAM gamma=0.95 by about 0.3 over 150 steps.
    """
    with jax.enable_x64(True):
        base = optax.sgd(lr, momentum=0.9)
        setups = [("SAM", sam_optax.sam(base))]
        for gamma in (0.6, 0.95):
            setups.append((f"WSAM coupled gamma={gamma}", sam_optax.wsam(base, gamma, decouple=False)))
            setups.append((f"WSAM decoupled gamma={gamma}", sam_optax.wsam(base, gamma, learning_rate=lr)))
        return [Trajectory(label, _trajectory(tx, rho, steps)) for label, tx in setups]


def _trajectory(tx, rho: float, steps: int) -> np.ndarray:
    """The ``[steps + 1, 2]`` float64 path of ``tx`` from START (call under ``enable_x64``)."""
    init, step = sam_optax.sharpness_aware_step(toy_loss, tx, sam_optax.geometry.l2(rho))
    dummy = jnp.zeros((1,), jnp.float64)

    def body(carry, _):
        w, state = carry
        w, state, _ = step(w, state, dummy)
        return (w, state), w

    w0 = jnp.asarray(START, jnp.float64)
    (_, _), ws = jax.jit(lambda w: jax.lax.scan(body, (w, init(w)), None, length=steps))(w0)
    return np.concatenate([np.asarray(w0)[None], np.asarray(ws)])


DIVERGED = "diverged (not a number)"


def nearest_minimum(point) -> str:
    """``"sharp"`` or ``"flat"``: the minimum nearest to ``point``, or :data:`DIVERGED`
    if the point is not finite (NaN or inf: the run blew up)."""
    if not np.all(np.isfinite(point)):
        return DIVERGED
    d_sharp = np.hypot(point[0] - SHARP_MIN[0], point[1] - SHARP_MIN[1])
    d_flat = np.hypot(point[0] - FLAT_MIN[0], point[1] - FLAT_MIN[1])
    return "flat" if d_flat < d_sharp else "sharp"


def plot(trajectories: list[Trajectory], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mu = np.linspace(-30, 40, 300)
    sigma = np.linspace(1, 45, 300)
    mm, ss = np.meshgrid(mu, sigma)
    zz = np.asarray(jax.vmap(jax.vmap(lambda a, b: toy_loss(jnp.stack([a, b]))))(jnp.asarray(mm), jnp.asarray(ss)))
    fig, ax = plt.subplots(figsize=(7, 5.5))
    cs = ax.contourf(mm, ss, zz, levels=20, cmap="Greys")
    fig.colorbar(cs, ax=ax)
    for t in trajectories:
        ax.plot(t.points[:, 0], t.points[:, 1], lw=1.6, label=t.label)
    ax.plot(*SHARP_MIN, "ko", ms=7)
    ax.plot(*FLAT_MIN, "k*", ms=12)
    ax.set_xlabel("mu")
    ax.set_ylabel("sigma")
    steps = len(trajectories[0].points) - 1 if trajectories else 0
    ax.set_title(f"WSAM toy (Yue et al. 2023, Fig. 2): {steps} SGDM steps from {tuple(START)}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    try:
        _io.save_figure(fig, path, dpi=120)  # a temporary file renamed over the old one
    finally:
        plt.close(fig)
