"""What every combination rule shares: reading both gradients, clipping, the base step.

A combination rule turns the clean gradient ``g`` and the perturbed gradient
``g_pert`` (from :func:`sam_optax.sharpness_aware_grad`) into an update, using
any base optax optimizer. A rule is written as a ``combine`` function:

``combine(g, g_pert, state, params) -> (base_grads, post, extra)``

* ``state``: the rule's :class:`SharpnessRuleState` before this step;
* ``base_grads``: the gradient the base optimizer sees;
* ``post``: ``None`` or ``post(updates, new_inner_state) -> updates``, applied
  to the base optimizer's updates (e.g. WSAM's decoupled sharpness step; build
  such a rule with ``has_post=True``);
* ``extra``: the rule's new own state (or ``None``).

``g`` and ``g_pert`` come in at least float32; the base optimizer receives
``base_grads`` cast back to the dtype of the incoming gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

# combine(g, g_pert, state, params) -> (base_grads, post, extra), see the module docstring
CombineFn = Callable[
    [optax.Updates, optax.Updates, Any, optax.Params],
    tuple[optax.Updates, Callable[[optax.Updates, optax.OptState], optax.Updates] | None, Any],
]


class SharpnessRuleState(NamedTuple):
    """State of a combination rule.

    Attributes:
      rule_count: number of updates so far (for learning-rate schedules of the
        rule). Not named ``count``, so that
        ``optax.tree_utils.tree_get(state, "count")`` still finds the base
        optimizer's count (e.g. Adam's).
      inner_state: the base optimizer's state.
      extra: the rule's own state (``None`` for most rules).
    """

    rule_count: jax.Array  # shape=(), dtype=jnp.int32.
    inner_state: optax.OptState
    extra: Any = None


MISSING_PERTURBED = (
    "{name} needs the gradient at the perturbed weights: call "
    "tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads) "
    "with out = sam_optax.sharpness_aware_grad(...)(params, batch)."
)

MISPLACED = (
    "{name}: a transformation chained before the rule changed the clean gradient "
    "but not the perturbed one (e.g. optax.chain(optax.clip_by_global_norm(c), rule), "
    "optax.chain(optax.add_decayed_weights(wd), rule) or optax.MultiSteps(rule)). "
    "Supported ways: put the piece inside the rule's base optimizer, e.g. "
    "sam(optax.chain(optax.clip_by_global_norm(c), optax.sgd(lr))); clip both "
    "gradients with the rule's max_norm=; apply it to both gradients with "
    "sam_optax.rules.apply_to_both(pre, rule); accumulate gradients with "
    "sam_optax.rules.accumulate(rule, k) instead of optax.MultiSteps; skip "
    "non-finite steps with sam_optax.rules.skip_nonfinite(rule, n) instead of "
    "optax.apply_if_finite."
)


def check_clean_grads(grads: optax.Updates, clean_grads: optax.Updates | None, name: str) -> None:
    """Raises ``ValueError`` unless ``grads`` is, leaf by leaf, ``clean_grads``.

    The check is by Python identity at trace time (no cost at run time): a
    transformation chained before a rule that changes the clean gradient makes
    new arrays (or tracers), one that passes it on (``optax.identity``,
    ``optax.masked``, ``optax.multi_transform``, ``optax.inject_hyperparams``)
    hands over the very same objects. ``clean_grads`` is first masked like
    ``grads`` (``MaskedNode`` leaves are skipped), so a rule inside
    ``optax.masked`` / ``optax.multi_transform`` can be given the full gradient.

    Args:
      grads: the gradient the rule (or wrapper) received as ``updates``.
      clean_grads: ``None`` (no check) or the untouched clean gradient,
        ``out.grads`` of :func:`sam_optax.sharpness_aware_grad`, passed in the
        same trace.
      name: the rule's name, for the error message.

    Raises:
      ValueError: if some leaf of ``grads`` is not the matching leaf of
        ``clean_grads``.

    Examples:
      The same arrays pass; new arrays fail, even with equal values:

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> g = {"w": jnp.ones(2)}
      >>> sam_optax.rules.check_clean_grads(g, g, "sam")  # no error
      >>> try:
      ...     sam_optax.rules.check_clean_grads({"w": g["w"] * 1.0}, g, "sam")
      ... except ValueError as e:
      ...     print(str(e).split(" (")[0])
      sam: a transformation chained before the rule changed the clean gradient but not the perturbed one
    """
    if clean_grads is None:
        return
    try:
        clean = _utils.mask_like(grads, clean_grads)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name}: clean_grads must have the structure of the gradient given to the rule: {e}") from e
    got, want = jax.tree.leaves(grads), jax.tree.leaves(clean)
    if len(got) != len(want) or any(a is not b for a, b in zip(got, want)):
        raise ValueError(MISPLACED.format(name=name))


def read_both(
    grads: optax.Updates, perturbed_grads: optax.Updates | None, clean_grads: optax.Updates | None, name: str
) -> optax.Updates:
    """The checks every rule and wrapper makes on its inputs, in one place:
    ``perturbed_grads`` is given (:data:`MISSING_PERTURBED`), ``grads`` is the
    untouched ``clean_grads`` when those are given (:func:`check_clean_grads`),
    and ``perturbed_grads`` matches ``grads`` (:func:`check_perturbed_grads`).

    Returns:
      ``perturbed_grads`` masked like ``grads``.
    """
    if perturbed_grads is None:
        raise ValueError(MISSING_PERTURBED.format(name=name))
    check_clean_grads(grads, clean_grads, name)
    return check_perturbed_grads(grads, perturbed_grads, name)


def check_perturbed_grads(grads: optax.Updates, perturbed_grads: optax.Updates, name: str) -> optax.Updates:
    """``perturbed_grads`` masked like ``grads``; ``ValueError`` unless they match.

    ``perturbed_grads`` is first masked like ``grads`` (``MaskedNode`` where
    ``grads`` has one, so a rule inside ``optax.masked`` may be given the full
    perturbed gradient); it must then have the tree structure and leaf shapes of
    ``grads``. Checked at trace time (structures and shapes are static), so it
    costs nothing at run time.

    Args:
      grads: the clean gradient the rule (or wrapper) received as ``updates``.
      perturbed_grads: the gradient at the perturbed weights.
      name: the rule's name, for the error message.

    Returns:
      ``perturbed_grads`` with ``MaskedNode`` leaves where ``grads`` has them.

    Raises:
      ValueError: naming ``perturbed_grads``, on a structure or shape mismatch.
    """
    try:
        masked = _utils.mask_like(grads, perturbed_grads)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name}: perturbed_grads must have the tree structure of the gradient "
            f"{jax.tree.structure(grads)}, got {jax.tree.structure(perturbed_grads)}."
        ) from e
    want, got = jax.tree.structure(grads), jax.tree.structure(masked)
    if want != got:  # type: ignore[operator]  # jaxlib ships no stubs: PyTreeDef is unresolved
        raise ValueError(
            f"{name}: perturbed_grads must have the tree structure of the gradient {want}, "
            f"got {jax.tree.structure(perturbed_grads)}."
        )
    paths = jax.tree_util.tree_flatten_with_path(grads)[0]
    for (path, a), b in zip(paths, jax.tree.leaves(masked)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{name}: perturbed_grads{jax.tree_util.keystr(path)} has shape {jnp.shape(b)}, "
                f"but the gradient's leaf has shape {jnp.shape(a)}."
            )
    return masked


def _is_multi_steps(x: Any) -> bool:
    return isinstance(x, optax.MultiStepsState)


def check_no_multi_steps(inner_state: optax.OptState, name: str) -> None:
    """Raises ``ValueError`` if the base optimizer's state holds an ``optax.MultiStepsState``.

    Used by rules with a ``post`` hook (decoupled WSAM): ``post`` runs on every
    call, so inside ``optax.MultiSteps`` it would add its step on every micro-step.
    """
    if any(_is_multi_steps(x) for x in jax.tree.leaves(inner_state, is_leaf=_is_multi_steps)):
        raise ValueError(
            f"{name}: its base optimizer contains optax.MultiSteps, but this rule adds "
            "its own step after the base optimizer's on every call (also on "
            "accumulation micro-steps). Accumulate over the whole rule instead: "
            f"sam_optax.rules.accumulate({name}(base, ...), every_k)."
        )


def clip_by_global_norm(tree: optax.Updates, max_norm: Any) -> optax.Updates:
    """``tree * min(1, max_norm / ||tree||)`` (no NaN for a zero tree), in at least float32.

    A clipped tree is computed as ``u * (max_norm / ||u||)`` with ``u = tree / d``
    (``d`` a power of two near ``max |x|``, see :func:`sam_optax._utils.tree_norm_parts`),
    so a huge finite tree is clipped to norm ``max_norm`` in its own direction.

    Examples:
      The tree :math:`(3, 4)` has norm 5: clipped to 1 it is :math:`(0.6, 0.8)`;
      a ``max_norm`` of 10 leaves it unchanged.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
      >>> for max_norm in (1.0, 10.0):
      ...     clipped = sam_optax.rules.clip_by_global_norm(tree, max_norm)
      ...     print([round(float(clipped[k][0]), 4) for k in ("a", "b")])
      [0.6, 0.8]
      [3.0, 4.0]
    """
    u, d, n = _utils.tree_norm_parts(tree)
    clip = d * n > max_norm
    scale = max_norm / _utils.safe_divisor(n)
    return jax.tree.map(lambda x, ux: jnp.where(clip, scale * ux, _utils.to_compute(x)), tree, u)


def same_arrays(a: Any, b: Any) -> bool:
    """Whether two trees hold the very same arrays (Python identity, at trace time).

    ``sharpness_aware_step(..., second_pass=False)`` passes ``perturbed_grads``
    that *are* the clean ``grads``; a rule then sees ``g_pert is g`` leaf by leaf
    and may compile a one-pass update (LookSAM's reuse step).
    """
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return bool(la) and len(la) == len(lb) and all(x is y for x, y in zip(la, lb))


def global_norm_parts(tree: Any) -> tuple[jax.Array, jax.Array]:
    r"""``(d, n)`` with :math:`\lVert tree\rVert_2 = d\, n`, in one pass over ``tree`` when it can.

    The plain sum of squares :math:`s = \sum_i x_i^2` is exact to rounding when it is
    finite and :math:`s \ge \sqrt{\mathrm{tiny}}` (squares that underflow then add
    less than :math:`N \cdot \mathrm{tiny} / \sqrt{\mathrm{tiny}}` relative error):
    ``(1, sqrt(s))``. Otherwise (a huge, tiny or zero tree; a non-finite entry) the
    overflow-safe two-pass form of :func:`sam_optax._utils.tree_norm_parts` runs, under
    ``lax.cond`` (scalar outputs only), so ``d * n`` never overflows in between.

    Examples:
      >>> import jax.numpy as jnp
      >>> d, n = global_norm_parts({"a": jnp.array([3.0]), "b": jnp.array([4.0])})
      >>> float(d * n)
      5.0
    """
    tree = _utils.to_compute(tree)
    s = _utils.tree_sum(jax.tree.map(jnp.square, tree))
    ok = jnp.isfinite(s) & (s >= jnp.sqrt(jnp.finfo(s.dtype).tiny))

    def two_pass():
        _, d, n = _utils.tree_norm_parts(tree)
        return jnp.asarray(d, s.dtype), jnp.asarray(n, s.dtype)

    return jax.lax.cond(ok, lambda: (jnp.ones_like(s), jnp.sqrt(s)), two_pass)


def sharpness_rule(
    base: optax.GradientTransformation,
    combine: CombineFn,
    *,
    name: str,
    max_norm: float | None = None,
    init_extra: Callable[[optax.Params], Any] | None = None,
    check_init: Callable[[optax.OptState], None] | None = None,
    has_post: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Builds a combination rule around a base optimizer.

    Args:
      base: any optax ``GradientTransformation``; extra keyword arguments given
        to the rule's ``update`` (other than ``perturbed_grads`` and
        ``clean_grads``) are forwarded to it.
      combine: the rule (see the module docstring).
      name: the rule's name, for error messages.
      max_norm: if given, ``> 0``: both ``g`` and ``g_pert`` are clipped to this
        global norm before ``combine`` (as the official WSAM code's ``max_norm``).
      init_extra: ``params -> extra`` initial rule state.
      check_init: ``inner_state -> None``, may raise ``ValueError`` at init.
      has_post: whether ``combine`` returns a ``post`` hook. Such a rule refuses
        (``ValueError`` at init) a base optimizer containing ``optax.MultiSteps``,
        since ``post`` would act on every micro-step.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`, whose
      ``update(grads, state, params=None, *, perturbed_grads, clean_grads=None,
      **extra_args)`` takes the clean gradient as ``grads``. With
      ``clean_grads`` (``out.grads``, as the library's steps pass it) it raises
      ``ValueError`` if a transformation chained before the rule changed
      ``grads`` (see :func:`check_clean_grads`).

    Examples:
      A rule whose base optimizer sees the mean of both gradients: with
      :math:`g = (1, 0)` and :math:`\tilde g = (3, 2)` it sees :math:`(2, 1)`,
      and SGD(0.1) gives :math:`(-0.2, -0.1)`.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> def combine(g, g_pert, state, params):
      ...     mean = jax.tree.map(lambda a, b: (a + b) / 2, g, g_pert)
      ...     return mean, None, state.extra
      >>> tx = sam_optax.sharpness_rule(optax.sgd(0.1), combine, name="mean_rule")
      >>> w = jnp.zeros(2)
      >>> g, g_pert = jnp.array([1.0, 0.0]), jnp.array([3.0, 2.0])
      >>> updates, state = tx.update(g, tx.init(w), w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates], int(state.rule_count))
      [-0.2, -0.1] 1
    """
    _utils.check_transformation("base", base)
    if max_norm is not None:
        _utils.check_range("max_norm", max_norm, low=0.0, low_inclusive=False)
    if not isinstance(has_post, bool):
        raise ValueError(f"has_post must be a bool, got {has_post!r}.")
    base = optax.with_extra_args_support(base)

    def init_fn(params):
        inner = base.init(params)
        if has_post:
            check_no_multi_steps(inner, name)
        if check_init is not None:
            check_init(inner)
        extra = init_extra(params) if init_extra is not None else None
        return SharpnessRuleState(rule_count=jnp.zeros([], jnp.int32), inner_state=inner, extra=extra)

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        perturbed_grads = read_both(updates, perturbed_grads, clean_grads, name)
        one_pass = same_arrays(updates, perturbed_grads)  # no second pass: keep them one object
        g = _utils.to_compute(updates)
        if max_norm is not None:
            g = clip_by_global_norm(g, max_norm)
        if one_pass:
            g_pert = g
        else:
            g_pert = _utils.to_compute(perturbed_grads)
            if max_norm is not None:
                g_pert = clip_by_global_norm(g_pert, max_norm)
        base_grads, post, extra = combine(g, g_pert, state, params)
        if post is not None and not has_post:
            raise ValueError(f"{name}: combine returned a post hook; build the rule with has_post=True.")
        base_grads = _utils.cast_like(base_grads, updates)
        new_updates, inner = base.update(base_grads, state.inner_state, params, **extra_args)
        if post is not None:
            new_updates = _utils.cast_like(post(new_updates, inner), new_updates)
        new_state = SharpnessRuleState(
            rule_count=optax.safe_increment(state.rule_count), inner_state=inner, extra=extra
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
