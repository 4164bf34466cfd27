"""The expert-parallel tests' shared harness (test_expert_parallel.py, test_ep_rounds.py,
test_exchange_grad.py, test_parallel_layer.py).

* `ffn_problem`: a random dropless-FFN problem (``x [tokens, D]``, router gates, expert
  ids ``[tokens, k]`` under a chosen routing, expert weights, output cotangent);
  `single_device_outputs` / `expert_parallel_outputs`: the FFN's output, counts and the
  gradients of all five arguments on one device or on a ``data x expert`` host mesh.
* `emulated_ragged_all_to_all`: ``lax.ragged_all_to_all`` from its documented semantics
  (XLA:CPU cannot run it).
* `abstract_gpu_mesh`, `layer_grad_fn`: lowering a layer's gradient for CUDA on an
  abstract ``data x expert`` GPU mesh.
* `layer_config`, `layer_outputs`: the `DroplessMoE` layer tests' config (GLU experts, a
  shared expert, a z-loss) and its jitted outputs and gradients (test_parallel_layer.py,
  test_mesh_axes.py, test_masks.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from helpers.host_devices import host_cpus
from jmoe import MoEConfig
from jmoe.moe import dropless_ffn
from jmoe.parallel import expert_parallel_ffn, make_mesh

D, F = 8, 16
TOL = dict(rtol=1e-5, atol=1e-5)
# The products of tests that check routing, masks and the exchange rather than the
# products: ``ragged_dot`` (on CPU a dense masked matmul) has the same ragged layout as
# ``"xla"`` (block size 1) and compiles about 5x faster than the chunked ``"xla"`` path's
# many GEMM shapes. The products themselves are checked in test_products.py and
# test_layers.py; a few cases of each kind keep ``"xla"``, the CPU default.
LOGIC_IMPL = "ragged_dot"


def ffn_config(num_experts, top_k, expert_type="mlp", d_ff=F, impl=LOGIC_IMPL) -> MoEConfig:
    """A float32 FFN config of width `D` (block size 32)."""
    return MoEConfig(
        d_model=D,
        d_ff=d_ff,
        num_experts=num_experts,
        top_k=top_k,
        expert_type=expert_type,
        block_size=32,
        impl=impl,
    )


def layer_config(d_model: int, **changes) -> MoEConfig:
    """A float32 `DroplessMoE` config of width ``d_model``: 8 GLU experts of d_ff 32,
    top-2, one shared expert, router z-loss 0.01 (``changes`` override)."""
    base = dict(
        d_model=d_model,
        d_ff=32,
        num_experts=8,
        top_k=2,
        expert_type="glu",
        block_size=32,
        impl=LOGIC_IMPL,
        num_shared_experts=1,
        router_z_loss_weight=0.01,
    )
    return MoEConfig(**{**base, **changes})


def layer_outputs(model, x):
    """Jitted ``(y, aux)`` and the gradients (parameters, x) of
    ``sum(y * cos) + load_balancing_loss + router_z_loss``."""

    def loss(model, x):
        y, aux = model(x)
        weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * weights) + aux["load_balancing_loss"] + aux["router_z_loss"], (y, aux)

    grad = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, (y, aux)), (param_grads, dx) = grad(model, x)
    return y, aux, {"params": nnx.to_pure_dict(nnx.state(param_grads)), "x": dx}


def routed_experts(kind: str, tokens: int, num_experts: int, top_k: int, rng) -> np.ndarray:
    """``[tokens, k]`` distinct experts per token.

    ``random``: uniform; ``one_expert``: every token picks the same k experts
    (the top ones, all on the last rank when k <= E/ep), so one rank receives
    every assignment of every device; ``sparse``: random among the first
    ``max(k, E/8)`` experts, so most experts (and ranks) get nothing.
    """
    if kind == "one_expert":
        return np.tile(np.arange(num_experts - 1, num_experts - 1 - top_k, -1), (tokens, 1))
    pool = num_experts if kind == "random" else max(top_k, num_experts // 8)
    return np.argsort(rng.random((tokens, pool)), axis=1)[:, :top_k]


def ffn_problem(config, tokens, kind, seed=0):
    """Inputs, router gates, expert ids, expert weights and the output cotangent."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    e, k = config.num_experts, config.top_k
    d = config.d_model
    x = f32(rng.standard_normal((tokens, d)))
    gates = f32(rng.random((tokens, k)) + 0.1)
    expert_ids = jnp.asarray(routed_experts(kind, tokens, e, k, rng), jnp.int32)
    w1 = f32(rng.standard_normal((e, d, config.d_ff)) / math.sqrt(d))
    w3 = (
        f32(rng.standard_normal((e, d, config.d_ff)) / math.sqrt(d))
        if config.expert_type == "glu"
        else None
    )
    w2 = f32(rng.standard_normal((e, config.d_ff, d)) / math.sqrt(config.d_ff))
    dy = f32(rng.standard_normal((tokens, d)))
    return (x, gates, w1, w3, w2), expert_ids, dy


def value_and_grads(ffn, args, dy):
    """``ffn(x, gates, w1, w3, w2) -> (y, *counts)``: outputs and the
    gradients of ``sum(y * dy)`` w.r.t. all five arguments."""

    def loss(*args):
        y, *counts = ffn(*args)
        return jnp.sum(y * dy), (y, counts)

    grad = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)
    (_, (y, counts)), grads = jax.jit(grad)(*args)
    return y, counts, grads


def single_device_outputs(config, expert_ids, args, dy):
    """`value_and_grads` of the single-device dropless FFN on host CPU 0."""
    with jax.default_device(host_cpus()[0]):
        ffn = lambda x, w, w1, w3, w2: dropless_ffn(config, x, w, expert_ids, w1, w3, w2)
        return value_and_grads(ffn, args, dy)


def expert_parallel_outputs(config, expert_ids, args, dy, data, expert, **kw):
    """`value_and_grads` of `expert_parallel_ffn` (``**kw`` passed on) on a
    ``data x expert`` mesh of host CPUs."""
    mesh = make_mesh(data, expert, devices=host_cpus())
    ffn = lambda x, w, w1, w3, w2: expert_parallel_ffn(
        config, x, w, expert_ids, w1, w3, w2, mesh=mesh, **kw
    )
    return value_and_grads(ffn, args, dy)


def emulated_ragged_all_to_all(
    operand,
    output,
    input_offsets,
    send_sizes,
    output_offsets,
    recv_sizes,
    *,
    axis_name,
    axis_index_groups=None,
):
    """``lax.ragged_all_to_all`` as its docstring specifies it, from all-gathers.

    Slice ``i`` of the sender goes to rank ``i // slices_per_rank`` at the
    sender's ``output_offsets[i]``; the receiver writes ``recv_sizes`` rows.
    Rows become NaN where a send size disagrees with the matching receive size.
    """
    assert axis_index_groups is None
    everything = [
        lax.all_gather(a, axis_name) for a in (operand, input_offsets, send_sizes, output_offsets)
    ]
    operands, in_offsets, sizes, out_offsets = everything
    ranks, num_slices = in_offsets.shape
    per_rank = num_slices // ranks
    me = lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])[:, None]
    result = output
    for src in range(ranks):
        for j in range(per_rank):
            sent = me * per_rank + j
            start, size = out_offsets[src, sent], recv_sizes[src * per_rank + j]
            inside = (rows >= start) & (rows < start + size)
            source_row = jnp.clip(
                in_offsets[src, sent] + rows[:, 0] - start, 0, operand.shape[0] - 1
            )
            value = jnp.where(size == sizes[src, sent], operands[src][source_row], jnp.nan)
            result = jnp.where(inside, value, result)
    return result


def abstract_gpu_mesh(data: int, expert: int, axis_type: AxisType) -> AbstractMesh:
    """A ``data x expert`` mesh of abstract H100s, to lower for CUDA on CPU."""
    device = AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="cuda")
    return AbstractMesh(
        (data, expert), ("data", "expert"), axis_types=(axis_type,) * 2, abstract_device=device
    )


def layer_grad_fn(model):
    """``(jitted grad, abstract state)``: the gradient w.r.t. state and ``x`` of
    ``sum(y**2) + load_balancing_loss`` of ``model(x)``, and the state's shapes."""
    graphdef, state = nnx.split(model)

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y**2) + aux["load_balancing_loss"]

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return jax.jit(jax.grad(loss, argnums=(0, 1))), abstract
