"""`experiments.plan`: the published OLMoE-1B-7B's per-device state on an abstract 16-device
``fsdp=2,expert=8`` mesh against its shapes counted by hand, a scanned small model's against
its placed arrays (8 host devices), and (slow) a small model's planned state against the
compiled train step's argument bytes (within 1%) and its activation estimate against XLA's
compiled temporary memory of the gradient under each remat policy (within 25%).

The activation check runs a small model (d_model 32, 2 blocks, seq 128, 8 experts, top-2, batch
32 on a 4 x 2 mesh), not the ``s`` preset: the ``s`` gradient takes minutes to compile on 2 CPU
cores, three times. docs/scale_out.md lists the ``s`` preset's numbers, measured once by hand.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import distributed, plan, train
from helpers.host_devices import held_bytes, host_cpus
from jmoe import MoEConfig
from jmoe.parallel import make_named_mesh, state_shardings
from jmoe.transformer import MoETransformer, TransformerConfig


def _olmoe_param_counts():
    """``(non-expert, expert)`` parameters of OLMoE-1B-7B from its published shapes."""
    layers, d, width, experts, d_ff, vocab = 16, 2048, 16 * 128, 64, 1024, 50304
    per_layer = 4 * d * width + 2 * width + 2 * d + d * experts  # q k v o, qk norms, norms, router
    return 2 * vocab * d + d + layers * per_layer, layers * experts * 3 * d * d_ff


def test_olmoe_plan_on_abstract_mesh(capsys):
    argv = ["--preset", "olmoe-1b-7b", "--mesh", "fsdp=2,expert=8", "--device", "h100"]
    got = plan.main([*argv, "--batch-size", "256"])
    dense, routed = _olmoe_param_counts()
    params = 4 * (dense // 2 + routed // 16)  # float32; experts over 8 x 2, the rest over fsdp 2
    assert got["memory"]["parameters"] == got["memory"]["gradients"] == params
    assert 2 * params <= got["memory"]["optimizer_state"] <= 2 * params + 64  # AdamW + counts
    assert got["devices"] == 16 and got["tokens_per_device"] == 256 * 4096 // 16
    assert set(got["communication_bytes"]) == {"fsdp", "expert"}
    ep = got["ep_exchange_bytes"]
    assert ep["with_buffer_factor"] < ep["worst_case"]
    assert got["flops_per_token"]["active_params"] == pytest.approx(1.3e9, rel=0.1)
    out = capsys.readouterr().out
    assert "16 x NVIDIA H100 80GB (fsdp=2 x expert=8)" in out and "Estimated step time" in out
    assert "compute bfloat16" in out  # --dtype auto is the planned GPU's, on any machine


def test_plan_errors():
    config = train.config_from_args(train.parse_args(["--mesh", "2x4", "--batch-size", "12"]))[0]
    with pytest.raises(ValueError, match="--batch-size 12 is not divisible by the 8 devices"):
        plan.make_plan(config, "h100")
    with pytest.raises(ValueError, match="--device must be one of"):
        plan.make_plan(dataclasses.replace(config, batch_size=16), "tpu")


# ------------------------------------------------------------------ against XLA (slow)

BATCH = 32


def _small(remat="none") -> TransformerConfig:
    moe = MoEConfig(d_model=32, d_ff=64, num_experts=8, top_k=2, block_size=32, impl="xla")
    return TransformerConfig(
        vocab_size=256,
        d_model=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=128,
        moe=moe,
        remat=remat,
    )


def _config(model, mesh, fsdp=False):
    return train.TrainConfig(
        model=model, out="unused", cache_dir="unused", batch_size=BATCH, mesh=mesh, fsdp=fsdp
    )


def _batch(placement, model):
    return jax.ShapeDtypeStruct(
        (BATCH, model.max_seq_len + 1), jnp.int32, sharding=placement.batch_sharding
    )


def test_planned_state_bytes_of_a_scanned_model_equal_the_placed_arrays():
    """``scan_layers``: the planned per-device state equals what the ``(model, optimizer)``
    arrays hold once placed as the trainer places them (zeros, to compile nothing), and, the
    stacked ``[groups, ...]`` layer axis never being split, the loop model's plan (checked
    against XLA below)."""
    axes = {"data": 2, "fsdp": 2, "expert": 2}
    config = _config(_small().replace(scan_layers=True), axes, fsdp=True)
    abstract = plan.abstract_state(config)
    mesh = make_named_mesh(axes, devices=host_cpus())
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    placed = jax.device_put(zeros, state_shardings(abstract, mesh, fsdp=True))
    memory = plan.make_plan(config, "cpu")["memory"]
    planned = memory["parameters"] + memory["other_model_state"] + memory["optimizer_state"]
    assert planned == held_bytes(placed)
    loop = plan.make_plan(dataclasses.replace(config, model=_small()), "cpu")["memory"]
    for key in ("parameters", "optimizer_state"):
        assert memory[key] == loop[key], key


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh,fsdp", [({"data": 4, "expert": 2}, False), ({"data": 2, "fsdp": 2, "expert": 2}, True)]
)
def test_planned_state_bytes_equal_the_compiled_train_step(mesh, fsdp):
    config = _config(_small(), mesh, fsdp)
    placement = distributed.Placement(mesh, num_experts=8, batch_size=BATCH, fsdp=fsdp)
    graphdef, state = placement.init_state(functools.partial(train._model_and_optimizer, config))
    with placement.context():
        compiled = (
            placement.jit_step(functools.partial(train.train_step, graphdef), donate_argnums=0)
            .lower(state, _batch(placement, config.model))
            .compile()
        )
    batch_bytes = BATCH * (config.model.max_seq_len + 1) * 4 // 8
    compiled_state = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    memory = plan.make_plan(config, "cpu")["memory"]
    planned = memory["parameters"] + memory["other_model_state"] + memory["optimizer_state"]
    assert planned == pytest.approx(compiled_state, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ("none", "ffn", "block"))
def test_activation_estimate_within_25_percent_of_xla(remat):
    """XLA's temporary memory of the compiled ``value_and_grad`` of the loss w.r.t. the
    parameters (the gradients are its outputs, so its temporaries are the activations and
    the backward's working set) on a 4 x 2 mesh without FSDP."""
    mesh = {"data": 4, "expert": 2}
    config = _config(_small(remat), mesh)
    placement = distributed.Placement(mesh, num_experts=8, batch_size=BATCH)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: MoETransformer(config.model, rngs=nnx.Rngs(0)))
    )
    shardings = plan.state_shardings(abstract, placement.mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )

    def loss(state, tokens):
        return train.lm_loss(nnx.merge(graphdef, state), tokens)[0]

    with placement.context():
        compiled = (
            jax.jit(jax.value_and_grad(loss))
            .lower(state, _batch(placement, config.model))
            .compile()
        )
    xla = compiled.memory_analysis().temp_size_in_bytes
    planned = plan.make_plan(config, "cpu")["memory"]["activations"]
    assert planned == pytest.approx(xla, rel=0.25), (planned, xla)
