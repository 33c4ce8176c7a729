"""API 1.0 (issue 10): the data axis as a value, the one-object form, any batch
structure, one meaning of ``second_pass``, one reduction of integer aux leaves."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, loss_fn, make_batch, make_params
from sam_optax import geometry
from sam_optax.data import shards

P0 = make_params()
RHO = 0.05


# --------------------------------------------------------------------------- graph batches


def graph_loss(params, graph):
    """A loss over a batch whose leaves have different leading sizes (nodes, edges)."""
    h = jnp.tanh(graph["nodes"] @ params["w"])  # [10, 4]
    src, dst = graph["edges"][:, 0], graph["edges"][:, 1]
    msg = jnp.sum(h[src] * h[dst], axis=-1)  # [30]
    return jnp.mean((msg - 0.3) ** 2) + 0.1 * jnp.sum(params["b"] ** 2)


def make_graph(seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"nodes": jax.random.normal(k1, (10, 3)), "edges": jax.random.randint(k2, (30, 2), 0, 10)}


GRAPH_PARAMS = {"w": jax.random.normal(jax.random.PRNGKey(7), (3, 4)), "b": jnp.ones(2)}


@pytest.mark.slow
def test_graph_batch_with_one_shard_is_sam_by_hand():
    graph = make_graph(0)
    out = sam_optax.sharpness_aware_grad(graph_loss, geometry.l2(RHO))(GRAPH_PARAMS, graph)
    g = jax.grad(graph_loss)(GRAPH_PARAMS, graph)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    pp = jax.tree.map(lambda p, x: p + RHO * x / (norm + 1e-12), GRAPH_PARAMS, g)
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, jax.grad(graph_loss)(pp, graph))


def test_graph_batch_cannot_be_split_into_shards():
    f = sam_optax.sharpness_aware_grad(graph_loss, geometry.l2(RHO), shards(5))
    with pytest.raises(ValueError, match="same leading"):
        f(GRAPH_PARAMS, make_graph(0))


# --------------------------------------------------------------------------- one-object form


RULES = {
    "sam": lambda: sam_optax.sam(optax.sgd(0.1, momentum=0.9)),
    "wsam": lambda: sam_optax.wsam(optax.adam(1e-2), 0.8, learning_rate=1e-2),
    "gsam": lambda: sam_optax.gsam(optax.sgd(0.1), 0.3),
    "looksam": lambda: sam_optax.looksam(optax.sgd(0.1), k=2, alpha=0.7),
    "clip_both": lambda: sam_optax.apply_to_both(optax.clip_by_global_norm(0.1), sam_optax.sam(optax.sgd(0.1))),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RULES))
def test_one_object_form_equals_two_piece_form(name):
    """Four steps on graph batches: sharpness_aware(rule, geometry) with a grad_fn equals
    sharpness_aware_step (two passes + rule), for every rule (LookSAM's reuse steps too)."""
    geo = geometry.adaptive(0.5)
    one = sam_optax.sharpness_aware(RULES[name](), geo)
    init, step = sam_optax.sharpness_aware_step(graph_loss, RULES[name](), geo)

    @jax.jit
    def one_step(params, state, graph):
        grad_fn = lambda p: jax.grad(graph_loss)(p, graph)  # noqa: E731
        updates, state = one.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    p1, s1 = GRAPH_PARAMS, one.init(GRAPH_PARAMS)
    p2, s2 = GRAPH_PARAMS, init(GRAPH_PARAMS)
    step = jax.jit(step)
    for i in range(4):
        p1, s1 = one_step(p1, s1, make_graph(i))
        p2, s2, _ = step(p2, s2, make_graph(i))
    assert_trees_close(p1, p2, rtol=1e-6, atol=1e-7)
    assert not jnp.allclose(p1["w"], GRAPH_PARAMS["w"])


@pytest.mark.slow
def test_one_object_form_skips_the_second_pass_on_looksam_reuse_steps():
    """A grad_fn that returns NaN poisons a full step, but not a reuse step: there the
    second pass is not run (lax.cond), so its NaN never reaches the update."""
    nan_fn = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)  # noqa: E731
    ok_fn = lambda p: jax.tree.map(jnp.ones_like, p)  # noqa: E731
    tx = sam_optax.sharpness_aware(sam_optax.looksam(optax.sgd(0.1), k=3), geometry.l2(RHO))
    g = jax.tree.map(jnp.ones_like, P0)
    update = jax.jit(tx.update, static_argnames=("grad_fn",))
    state = tx.init(P0)
    full, _ = update(g, state, P0, grad_fn=nan_fn)  # step 0 is a full step
    assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(full))
    _, state = update(g, state, P0, grad_fn=ok_fn)
    for _ in range(2):  # steps 1 and 2 reuse the stored direction
        reuse, state = update(g, state, P0, grad_fn=nan_fn)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(reuse))
    again, _ = update(g, state, P0, grad_fn=nan_fn)  # step 3: full again
    assert all(bool(jnp.all(jnp.isnan(u))) for u in jax.tree.leaves(again))


def test_one_object_form_errors():
    tx = sam_optax.sharpness_aware(sam_optax.sam(optax.sgd(0.1)))
    state = tx.init(P0)
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(P0, state, P0)
    with pytest.raises(ValueError, match="params"):
        tx.update(P0, state, None, grad_fn=lambda p: p)
    with pytest.raises(ValueError, match="geometry"):
        sam_optax.sharpness_aware(sam_optax.sam(optax.sgd(0.1)), "l2")
    with pytest.raises(ValueError, match="rule"):
        sam_optax.sharpness_aware(None)


# --------------------------------------------------------------------------- the data axis value


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=0), "m must be an integer"),
        (dict(chunk_mode="loop"), "chunk_mode"),
        (dict(microbatch_size=2.0), "microbatch_size"),
        (dict(axis_name=3), "axis_name"),
        (dict(selection=0.5), "selection"),
        (dict(selection=sam_optax.data.sharpness_sensitive(0.5), microbatch_size=2), "selection and microbatch_size"),
        (dict(mesh="mesh"), "mesh"),
    ],
)
def test_shards_rejects_bad_arguments_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shards(**kwargs)


@pytest.mark.multidevice
def test_shards_checks_mesh_axes():
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match="axis_name is required"):
        shards(mesh=mesh)
    with pytest.raises(ValueError, match="not in the mesh axes"):
        shards(mesh=mesh, axis_name="batch")
    assert shards(mesh=mesh, axis_name="data").axis_name == ("data",)


def test_data_must_be_a_data_axis():
    with pytest.raises(ValueError, match="data must come from sam_optax.data.shards"):
        sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), {"m": 4})


def test_full_selection_is_plain_sam():
    assert shards(selection=sam_optax.data.sharpness_sensitive(1.0)).selection is None


# --------------------------------------------------------------------------- integer aux leaves


def loss_with_int_aux(params, batch):
    return loss_fn(params, batch), {"max_label": jnp.max(batch["y"]), "any_big": jnp.any(batch["y"] > 1)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "data",
    [
        shards(4, chunk_mode="vmap"),
        shards(4, chunk_mode="unroll"),
        shards(4, chunk_mode="scan"),
        shards(microbatch_size=4),
        shards(16, microbatch_size=4, chunk_mode="scan"),
    ],
    ids=["vmap", "unroll", "scan", "micro", "scan+micro"],
)
def test_integer_aux_is_the_max_over_shards_in_every_layout(data):
    """The batch's only label 2 sits in the first chunk: the max over shards is 2,
    where keeping the last shard's value (as scan and micro-batches did) gave 1."""
    batch = make_batch(n=32)
    y = jnp.where(jnp.arange(32) == 0, 2, jnp.minimum(batch["y"], 1))
    batch = dict(batch, y=y)
    out = sam_optax.sharpness_aware_grad(loss_with_int_aux, geometry.l2(RHO), data, has_aux=True)(P0, batch)
    assert out.aux["max_label"].dtype == y.dtype and int(out.aux["max_label"]) == 2
    assert out.aux["any_big"].dtype == jnp.bool_ and bool(out.aux["any_big"])


# --------------------------------------------------------------------------- second_pass


@pytest.mark.slow
def test_second_pass_has_one_meaning():
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO))
    batch = make_batch()
    with pytest.raises(ValueError, match="second_pass must be True, False or a boolean array"):
        f(P0, batch, second_pass=None)
    never = f(P0, batch, second_pass=False)
    assert_trees_close(never.perturbed_grads, never.grads)
    assert_trees_close(f(P0, batch, second_pass=jnp.asarray(True)).perturbed_grads, f(P0, batch).perturbed_grads)
    init, step = sam_optax.sharpness_aware_step(loss_fn, sam_optax.sam(optax.sgd(0.1)))
    with pytest.raises(ValueError, match="second_pass must be 'auto'"):
        step(P0, init(P0), batch, second_pass=None)
    with pytest.raises(ValueError, match="second_pass must be 'auto'"):
        step(P0, init(P0), batch, second_pass="always")


# --------------------------------------------------------------------------- function length


def test_the_two_pass_machinery_has_no_function_over_80_lines():
    """Issue 10: chunk layouts, device layout, multi-step ascent and data selection each in
    their own place, no function longer than about 80 lines (docstrings not counted)."""
    root = pathlib.Path(sam_optax.__file__).parent
    files = [
        "two_pass.py",
        "_ascent.py",
        "one_object.py",
        "train.py",
        "data/_axis.py",
        "data/_layout.py",
        "data/_devices.py",
        "data/_selection.py",
        "data/_shards.py",
        "rules/_base.py",
        "rules/_wrappers.py",
    ]
    long = []
    for name in files:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:]
                if not body:
                    continue
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > 80:
                    long.append((name, node.name, lines))
    assert not long, long
    np.testing.assert_equal(len(files), 11)
