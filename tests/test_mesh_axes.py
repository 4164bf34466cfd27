"""Meshes with axes beyond ``"data"``/``"expert"`` (`jmoe.parallel.make_named_mesh`):
`DroplessMoE` on a 2 x 2 x 2 ``data x fsdp x expert`` host mesh against one device
(output, aux and every gradient), the FSDP state shardings and their per-device bytes
(also of a scanned model's stacked ``[groups, ...]`` leaves and their optimizer moments), and
the expert-parallel FFN on a mesh whose only token axis is ``"fsdp"``.

8 host CPU devices (tests/conftest.py); float32 ``rtol=atol=1e-5``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.plan import abstract_mesh
from helpers.expert_parallel import (
    ffn_config,
    ffn_problem,
    layer_config,
    layer_outputs,
    single_device_outputs,
    value_and_grads,
)
from helpers.host_devices import held_bytes, host_cpus
from jmoe import DroplessMoE
from jmoe.parallel import expert_parallel_ffn, make_named_mesh, param_spec, state_shardings
from jmoe.parallel.mesh import bytes_per_device
from jmoe.transformer import MoETransformer, TransformerConfig

D = 16
TOL = dict(rtol=1e-5, atol=1e-5)
AXES = {"data": 2, "fsdp": 2, "expert": 2}


def _config():
    return layer_config(D)


@pytest.mark.parametrize(
    "fsdp",
    (pytest.param(False, marks=pytest.mark.slow), pytest.param(True, marks=pytest.mark.slow)),
    ids=["fsdp-axis", "fsdp-axis+data"],
)
def test_layer_on_data_fsdp_expert_mesh_matches_single_device(fsdp):
    config = _config()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4, D)), jnp.float32)
    with jax.default_device(host_cpus()[0]):
        want = layer_outputs(DroplessMoE(config, rngs=nnx.Rngs(0)), x)
    mesh = make_named_mesh(AXES, devices=host_cpus())
    model = DroplessMoE(config, rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh):
        state = nnx.state(model)
        nnx.update(model, jax.device_put(state, state_shardings(state, mesh, fsdp=fsdp)))
        tokens = NamedSharding(mesh, P(("data", "fsdp", "expert")))
        got = layer_outputs(model, jax.device_put(x, tokens))
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


def _path(*keys):
    return tuple(jax.tree_util.DictKey(k) for k in keys)


STACKED = ("blocks", "layers", 1)  # a scanned model's stacked blocks, group position 1
MOMENT = ("opt_state", 0, "mu", *STACKED)  # an optimizer's moment of the same leaf


@pytest.mark.parametrize("prefix", [STACKED, MOMENT], ids=["param", "adam-moment"])
@pytest.mark.parametrize(
    "axes,fsdp,leaf,shape,want",
    [
        # [groups, E, d, d_ff]: E over "expert" (dim 1), FSDP on the largest other dim
        (AXES, False, ("ffn", "experts", "w1"), (8, 8, 16, 32), P(None, "expert", None, "fsdp")),
        (
            AXES,
            True,
            ("ffn", "experts", "w2"),
            (8, 8, 32, 16),
            P(None, "expert", ("data", "fsdp"), None),
        ),
        # hidden sharding (E=2 < expert=4): E stays whole and is never FSDP-split
        (
            {"fsdp": 2, "expert": 4},
            False,
            ("ffn", "experts", "w1"),
            (64, 2, 8, 4),
            P(None, None, "fsdp", None),
        ),
        # the layer axis is the largest divisible dim, yet stays whole
        ({"fsdp": 8}, False, ("attn_norm", "scale"), (64, 16), P(None, "fsdp")),
        ({"fsdp": 8}, False, ("attn_norm", "scale"), (64, 6), P(None, None)),
        ({"fsdp": 4}, False, ("ffn", "router", "kernel"), (32, 8, 4), P(None, "fsdp", None)),
    ],
    ids=["experts", "experts-data-fsdp", "hidden-sharding", "norm", "norm-replicated", "router"],
)
def test_param_spec_keeps_the_stacked_layer_axis_whole(prefix, axes, fsdp, leaf, shape, want):
    mesh = abstract_mesh(axes)
    got = param_spec(_path(*prefix, *leaf), shape, mesh, fsdp=fsdp)
    assert got == want
    # the loop layout's leaf (no layer axis) gets the same spec without the leading None
    assert param_spec(_path("blocks", 3, *leaf), shape[1:], mesh, fsdp=fsdp) == P(*got[1:])


def test_state_shardings_of_a_scanned_model_and_its_optimizer():
    """Every stacked leaf of the real state (paths as `nnx` builds them) keeps its layer
    axis whole; the expert weights and their Adam moments are split over ``"expert"``."""
    config = TransformerConfig(
        vocab_size=64,
        d_model=D,
        num_layers=4,
        num_heads=2,
        max_seq_len=8,
        moe=_config(),
        moe_every=2,
        scan_layers=True,
    )

    def make():
        model = MoETransformer(config, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    state = nnx.state(nnx.eval_shape(make))
    specs = jax.tree.map(lambda s: s.spec, state_shardings(state, abstract_mesh(AXES)))
    model, opt = nnx.to_pure_dict(specs).values()
    for tree in (model, opt["opt_state"][0]["mu"], opt["opt_state"][0]["nu"]):
        experts = tree["blocks"]["layers"][1]["ffn"]["experts"]
        assert experts["w1"] == P(None, "expert", None, "fsdp")  # [2, 8, 16, 32]
        assert experts["w3"] == P(None, "expert", None, "fsdp")
        assert experts["w2"] == P(None, "expert", "fsdp", None)
        stacked = jax.tree.leaves(tree["blocks"], is_leaf=lambda x: isinstance(x, P))
        assert len(stacked) > 10 and all(spec[0] is None for spec in stacked)
        assert tree["embed"]["embedding"] == P("fsdp", None)  # [64, 16]: not stacked


def test_bytes_per_device_counts_the_shards():
    mesh = make_named_mesh(AXES, devices=host_cpus())
    state = nnx.state(DroplessMoE(_config(), rngs=nnx.Rngs(0)))
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    replicated = jax.tree.map(lambda a: NamedSharding(mesh, P()), state)
    assert bytes_per_device(state, replicated) == total
    placed = jax.device_put(state, shardings := state_shardings(state, mesh, fsdp=True))
    want = held_bytes(placed)
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
