"""Expert parallelism as a user meets it: `DroplessMoE` and `MoETransformer`
under ``with jax.set_mesh(mesh):`` against the same model without a mesh
(output, aux losses and counts, every gradient, a jitted train step), the
state shardings, the choice of exchange by platform and the ragged exchange
lowered for CUDA on an abstract mesh (XLA:CPU cannot run it).

8 host CPU devices (tests/conftest.py). Tolerances: float32 ``rtol=atol=1e-5``
for one layer; ``1e-4`` for the transformer (its gradients pass through
attention, norms and two MoE layers whose weight-gradient sums run in a
different order on 8 devices).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.presets import preset
from helpers.expert_parallel import (
    LOGIC_IMPL,
    abstract_gpu_mesh,
    layer_config,
    layer_grad_fn,
    layer_outputs,
)
from helpers.host_devices import host_cpus
from helpers.jaxpr_tools import all_eqns
from jmoe import DroplessMoE
from jmoe.parallel import context_mesh, make_mesh, param_spec, state_shardings
from jmoe.transformer import MoETransformer

D = 16
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(**kw):
    return layer_config(D, shared_expert_gate=True, **kw)


def _input(batch=4, seq=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, seq, D)), jnp.float32)


@pytest.mark.parametrize("axis_type", (AxisType.Auto, AxisType.Explicit))
def test_layer_under_mesh_matches_single_device(axis_type):
    """2 x 4 mesh, parameters placed by `state_shardings` (FSDP on Auto axes)."""
    config, x = _config(), _input()
    with jax.default_device(host_cpus()[0]):
        want = layer_outputs(DroplessMoE(config, rngs=nnx.Rngs(0)), x)
    mesh = make_mesh(2, 4, axis_type=axis_type, devices=host_cpus())
    model = DroplessMoE(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        fsdp = axis_type == AxisType.Auto
        nnx.update(model, jax.device_put(state, state_shardings(state, mesh, fsdp=fsdp)))
        got = layer_outputs(model, jax.device_put(x, NamedSharding(mesh, P("data"))))
    chex.assert_trees_all_equal(got[1]["tokens_per_expert"], want[1]["tokens_per_expert"])
    assert int(got[1]["dropped_tokens"]) == 0
    chex.assert_trees_all_close(got, want, **TOL)


def test_ep_capacity_factor_drops_are_counted_in_aux():
    """Every token picks experts 0 and 1 (both on expert rank 0 of 4). The
    default (None) drops nothing; ``ep_capacity_factor=0.5`` gives each rank a
    buffer of ceil(0.5 * 4 local tokens * top-2) = 4 rows, so of the 64
    assignments only 4 per data replica (2) are kept."""
    x = jnp.abs(_input())  # [4, 8, D]: 32 tokens, 4 per device
    outputs = {}
    for ep_capacity_factor in (None, 0.5):
        model = DroplessMoE(_config(ep_capacity_factor=ep_capacity_factor), rngs=nnx.Rngs(0))
        model.router.kernel[...] = jnp.zeros((D, 8)).at[:, 0].set(1.0)  # ties -> expert 1
        with jax.set_mesh(make_mesh(2, 4, devices=host_cpus())):
            outputs[ep_capacity_factor] = nnx.jit(lambda m, x: m(x))(model, x)
    assert int(outputs[None][1]["dropped_tokens"]) == 0
    assert int(outputs[0.5][1]["dropped_tokens"]) == 32 * 2 - 2 * 4
    chex.assert_trees_all_equal(
        outputs[0.5][1]["tokens_per_expert"], jnp.array([32, 32, 0, 0, 0, 0, 0, 0])
    )


def _has_shard_map(fn, *args) -> bool:
    return any(eqn.primitive.name == "shard_map" for eqn in all_eqns(jax.make_jaxpr(fn)(*args)))


def test_mesh_without_expert_axis_is_plain_data_parallel():
    # "xla": ragged_dot cannot infer its output sharding under an explicit data mesh.
    config, x = _config(impl="xla"), _input()
    want_y, _ = DroplessMoE(config, rngs=nnx.Rngs(0))(x)
    model = DroplessMoE(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(make_mesh(2, 4, devices=host_cpus())):
        assert _has_shard_map(lambda x: model(x)[0], x)
    with jax.set_mesh(jax.make_mesh((8,), ("data",), devices=host_cpus())):
        assert context_mesh() is None
        assert not _has_shard_map(lambda x: model(x)[0], x)
        y, _ = nnx.jit(lambda model, x: model(x))(model, x)
    chex.assert_trees_all_close(y, want_y, **TOL)


def test_state_shardings():
    mesh = make_mesh(2, 4, devices=host_cpus())
    state = nnx.state(DroplessMoE(_config(num_experts=8), rngs=nnx.Rngs(0)))
    specs = nnx.to_pure_dict(jax.tree.map(lambda s: s.spec, state_shardings(state, mesh)))
    assert specs["experts"] == {
        "w1": P("expert", None, None),
        "w3": P("expert", None, None),
        "w2": P("expert", None, None),
    }
    assert specs["router"]["kernel"] == P(None, None)
    fsdp = nnx.to_pure_dict(jax.tree.map(lambda s: s.spec, state_shardings(state, mesh, fsdp=True)))
    assert fsdp["experts"]["w1"] == P("expert", None, "data")  # [E, d=16, d_ff=32]
    assert fsdp["router"]["kernel"] == P("data", None)  # [d=16, E=8]
    hidden = param_spec(
        (jax.tree_util.DictKey("experts"),), (4, 16, 32), make_mesh(1, 8, devices=host_cpus())
    )
    assert hidden == P(None, None, None)  # E=4 < 8 ranks: each rank slices its d_ff part
    explicit = make_mesh(2, 4, axis_type=AxisType.Explicit, devices=host_cpus())
    with pytest.raises(ValueError, match="fsdp=True needs a mesh with AxisType.Auto"):
        state_shardings(state, explicit, fsdp=True)


# ------------------------------------------------------------------ exchange by platform


def _collectives(text: str) -> set[str]:
    names = ("ragged_all_to_all", "ragged-all-to-all", "all_to_all", "all-to-all")
    return {name.replace("_", "-") for name in names if name in text}


@pytest.mark.parametrize(
    "num_experts,data,expert,axis_type",
    [(8, 2, 4, AxisType.Auto), (8, 2, 4, AxisType.Explicit), (4, 1, 8, AxisType.Auto)],
    ids=["2x4-auto", "2x4-explicit", "1x8-hidden"],
)
def test_ragged_exchange_lowers_for_cuda(num_experts, data, expert, axis_type):
    """On a GPU mesh the layer uses ragged_all_to_all (forward: dispatch and
    combine; backward: their transposes) and moves no token rows through a
    padded all_to_all (the ragged op's own lowering all_to_all's int32 offsets)."""
    grad, state = layer_grad_fn(DroplessMoE(_config(num_experts=num_experts), rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((64, D), jnp.float32)
    with jax.sharding.use_abstract_mesh(abstract_gpu_mesh(data, expert, axis_type)):
        text = grad.trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@ragged_all_to_all") == 4
    padded = [
        line for line in text.splitlines() if "stablehlo.all_to_all" in line and "xf32>" in line
    ]
    assert not padded


def test_cpu_mesh_uses_padded_all_to_all():
    grad, _ = layer_grad_fn(model := DroplessMoE(_config(), rngs=nnx.Rngs(0)))
    with jax.set_mesh(make_mesh(2, 4, devices=host_cpus())):
        text = grad.lower(nnx.state(model), jnp.zeros((64, D))).compile().as_text()
    assert _collectives(text) == {"all-to-all"}


# ------------------------------------------------------------------ train step


def _lm_config():
    config = preset("xs", ffn="dmoe")
    moe = config.moe.replace(d_model=64, d_ff=128, top_k=2, block_size=32, impl=LOGIC_IMPL)
    return config.replace(d_model=64, num_layers=2, num_heads=2, max_seq_len=16, moe=moe)


def _train(model, tokens, steps: int):
    """Losses and final parameters of ``steps`` jitted SGD steps on next-token
    cross-entropy + aux loss."""
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss(model):
            logits, aux = model(tokens[:, :-1])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
            return ce + aux["aux_loss"]

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    losses = [step(model, optimizer, tokens) for _ in range(steps)]
    return jnp.stack(losses), nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.slow
def test_transformer_train_step_on_2x4_mesh_matches_single_device():
    config = _lm_config()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 17)), jnp.int32)
    with jax.default_device(host_cpus()[0]):
        want = _train(MoETransformer(config, rngs=nnx.Rngs(0)), tokens, steps=2)
    mesh = make_mesh(2, 4, devices=host_cpus())
    model = MoETransformer(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_shardings(state, mesh, fsdp=True)))
        got = _train(model, jax.device_put(tokens, NamedSharding(mesh, P("data"))), steps=2)
    assert float(want[0][1]) < float(want[0][0])  # the step trains
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
