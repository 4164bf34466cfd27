"""Meshes with axes beyond ``"data"``/``"expert"`` (`jmoe.parallel.make_named_mesh`):
`DroplessMoE` on a 2 x 2 x 2 ``data x fsdp x expert`` host mesh against one device
(output, aux and every gradient), the FSDP state shardings and their per-device bytes,
and the expert-parallel FFN on a mesh whose only token axis is ``"fsdp"``.

8 host CPU devices (tests/conftest.py); float32 ``rtol=atol=1e-5``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers.expert_parallel import (
    LOGIC_IMPL,
    ffn_config,
    ffn_problem,
    single_device_outputs,
    value_and_grads,
)
from helpers.host_devices import host_cpus
from jmoe import DroplessMoE, MoEConfig
from jmoe.parallel import expert_parallel_ffn, make_named_mesh, state_shardings
from jmoe.parallel.mesh import bytes_per_device

D = 16
TOL = dict(rtol=1e-5, atol=1e-5)
AXES = {"data": 2, "fsdp": 2, "expert": 2}


def _config():
    return MoEConfig(
        d_model=D,
        d_ff=32,
        num_experts=8,
        top_k=2,
        expert_type="glu",
        block_size=32,
        impl=LOGIC_IMPL,
        num_shared_experts=1,
        router_z_loss_weight=0.01,
    )


def _layer_outputs(model, x):
    """Jitted ``(y, aux)`` and the gradients (parameters, x) of
    ``sum(y * cos) + load_balancing_loss + router_z_loss``."""

    def loss(model, x):
        y, aux = model(x)
        weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * weights) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)

    grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, aux)), (param_grads, dx) = grad(model, x)
    return y, aux, {"params": nnx.to_pure_dict(nnx.state(param_grads)), "x": dx}


@pytest.mark.parametrize(
    "fsdp",
    (pytest.param(False, marks=pytest.mark.slow), pytest.param(True, marks=pytest.mark.slow)),
    ids=["fsdp-axis", "fsdp-axis+data"],
)
def test_layer_on_data_fsdp_expert_mesh_matches_single_device(fsdp):
    config = _config()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4, D)), jnp.float32)
    with jax.default_device(host_cpus()[0]):
        want = _layer_outputs(DroplessMoE(config, rngs=nnx.Rngs(0)), x)
    mesh = make_named_mesh(AXES, devices=host_cpus())
    model = DroplessMoE(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_shardings(state, mesh, fsdp=fsdp)))
        tokens = NamedSharding(mesh, P(("data", "fsdp", "expert")))
        got = _layer_outputs(model, jax.device_put(x, tokens))
    chex.assert_trees_all_equal(got[1]["tokens_per_expert"], want[1]["tokens_per_expert"])
    assert int(got[1]["dropped_tokens"]) == 0
    chex.assert_trees_all_close(got, want, **TOL)


def test_state_shardings_on_named_axes():
    mesh = make_named_mesh(AXES, devices=host_cpus())
    state = nnx.state(DroplessMoE(_config(), rngs=nnx.Rngs(0)))
    spec = lambda **kw: nnx.to_pure_dict(
        jax.tree.map(lambda s: s.spec, state_shardings(state, mesh, **kw))
    )
    specs = spec()
    assert specs["experts"]["w1"] == P("expert", None, "fsdp")  # [E=8, d=16, d_ff=32]
    assert specs["router"]["kernel"] == P("fsdp", None)  # [d=16, E=8]: d first (larger)
    both = spec(fsdp=True)
    assert both["experts"]["w2"] == P("expert", ("data", "fsdp"), None)  # [8, 32, 16]
    assert both["router"]["kernel"] == P(("data", "fsdp"), None)
    no_expert = make_named_mesh({"fsdp": 8}, devices=host_cpus())
    w1 = nnx.to_pure_dict(jax.tree.map(lambda s: s.spec, state_shardings(state, no_expert)))
    assert w1["experts"]["w1"] == P(None, None, "fsdp")


def test_bytes_per_device_counts_the_shards():
    mesh = make_named_mesh(AXES, devices=host_cpus())
    state = nnx.state(DroplessMoE(_config(), rngs=nnx.Rngs(0)))
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    replicated = jax.tree.map(lambda a: NamedSharding(mesh, P()), state)
    assert bytes_per_device(state, replicated) == total
    placed = jax.device_put(state, shardings := state_shardings(state, mesh, fsdp=True))
    want = max(
        sum(
            s.data.nbytes
            for a in jax.tree.leaves(placed)
            for s in a.addressable_shards
            if s.device == device
        )
        for device in mesh.devices.flat
    )
    assert bytes_per_device(state, shardings) == want < total / 4


@pytest.mark.slow
def test_ffn_with_only_fsdp_token_axis():
    """A ``fsdp x expert`` mesh (no ``"data"`` axis) and a ``pipe x data x expert`` one."""
    config = ffn_config(8, 2)
    args, expert_ids, dy = ffn_problem(config, 64, "random")
    want = single_device_outputs(config, expert_ids, args, dy)
    for axes in ({"fsdp": 2, "expert": 4}, {"pipe": 2, "data": 2, "expert": 2}):
        mesh = make_named_mesh(axes, devices=host_cpus())
        ffn = lambda x, w, w1, w3, w2, mesh=mesh: expert_parallel_ffn(
            config, x, w, expert_ids, w1, w3, w2, mesh=mesh
        )
        y, (counts, dropped), grads = value_and_grads(ffn, args, dy)
        assert int(dropped) == 0
        chex.assert_trees_all_close((y, counts, grads), (want[0], want[1][0], want[2]), **TOL)


def test_named_mesh_errors():
    with pytest.raises(ValueError, match="fsdp must be a positive int"):
        make_named_mesh({"fsdp": 0, "expert": 2})
    with pytest.raises(ValueError, match="a 4 x 4 mesh needs 16 devices, 8 are available"):
        make_named_mesh({"fsdp": 4, "expert": 4}, devices=host_cpus())
    config = ffn_config(8, 2)
    args, expert_ids, _ = ffn_problem(config, 64, "random")
    no_expert = make_named_mesh({"data": 8}, devices=host_cpus())
    with pytest.raises(ValueError, match="mesh must have an axis named 'expert'"):
        expert_parallel_ffn(config, args[0], args[1], expert_ids, *args[2:], mesh=no_expert)
