"""Plan a training run before launching it: per-device memory, FLOPs, communication, step time.

    python -m experiments.plan --preset qwen3-30b-a3b --mesh fsdp=2,expert=8 --device h100
    python -m experiments.plan --preset s --mesh data=2,fsdp=2,expert=2 --remat block --device cpu

Takes `experiments.train`'s flags (the model, ``--batch-size``, ``--remat``, ``--mesh``,
``--fsdp``, ...) plus ``--device {h100,h200,cpu}``, and allocates nothing: the state's
shapes come from `nnx.eval_shape`, each leaf's per-device shard from
`jmoe.parallel.state_shardings` on an `AbstractMesh` (no devices needed), the rest
from the formulas of `activation_bytes`, `flops_per_token` and `communication`.
docs/scale_out.md shows its output and how it compares with XLA's compiled sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from experiments import flops, train
from experiments.distributed import mesh_axes, mesh_flag
from jmoe.parallel.mesh import EXPERT, bytes_per_device, state_shardings
from jmoe.parallel.placement import ExpertSharding
from jmoe.transformer import TransformerConfig
from pallas_kernels.products import layout_block_size

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """What the plan assumes of one accelerator.

    Attributes:
      name: for the printout.
      memory_bytes: memory of one device.
      peak_flops: dense FLOP/s at the compute dtype the presets use (bf16 on
        GPUs; for ``cpu`` a nominal 50 GFLOP/s per core, float32).
      link_bytes_per_s: per device and direction inside a node (NVLink).
      network_bytes_per_s: per device and direction between nodes.
      per_node: devices per node (an axis whose group fits in a node uses the link).
      fused_attention: attention keeps no ``[seq, seq]`` scores (cuDNN flash
        attention); XLA:CPU materialises them.
      fused_expert_mlp: the expert MLP gathers its rows and scatter-adds its
        outputs chunk by chunk (XLA:CPU's `pallas_kernels.fused_mlp`), so no
        ``[rows, d_model]`` layouts exist; the GPU kernels build them.
      padded_exchange: the expert-parallel exchange is the padded one (XLA:CPU
        has no ragged all-to-all), whose steps recompute their forward in the
        backward, so the expert layout is never kept between the passes.
      reduces_gradients_at_end: the gradients' cross-device sums wait until the
        backward ends (XLA:CPU combines them all into a few all-reduces), so
        every unreduced gradient is live then; else (XLA:GPU: combined up to a
        threshold, asynchronous) only the last block's is in flight.
    """

    name: str
    memory_bytes: float
    peak_flops: float
    link_bytes_per_s: float
    network_bytes_per_s: float
    per_node: int
    fused_attention: bool
    fused_expert_mlp: bool
    padded_exchange: bool
    reduces_gradients_at_end: bool


def _host_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


DEVICES = {
    # H100/H200 SXM: 989 TFLOP/s dense bf16, NVLink 4 (450 GB/s per direction), 8 per node,
    # 400 Gb/s InfiniBand per GPU between nodes.
    "h100": Device(
        "NVIDIA H100 80GB",
        80e9,
        989e12,
        450e9,
        50e9,
        8,
        fused_attention=True,
        fused_expert_mlp=False,
        padded_exchange=False,
        reduces_gradients_at_end=False,
    ),
    "cpu": Device(
        "host CPU",
        _host_memory(),
        5e10 * (os.cpu_count() or 1),
        10e9,
        10e9,
        64,
        fused_attention=False,
        fused_expert_mlp=True,
        padded_exchange=True,
        reduces_gradients_at_end=True,
    ),
}
DEVICES["h200"] = dataclasses.replace(DEVICES["h100"], name="NVIDIA H200 141GB", memory_bytes=141e9)


def abstract_mesh(axes: dict[str, int]) -> AbstractMesh:
    """An `AbstractMesh` of ``{name: size}`` (Auto axes, no devices)."""
    return AbstractMesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def abstract_state(config: train.TrainConfig) -> nnx.State:
    """The ``(model, optimizer)`` state's shapes and dtypes (nothing allocated)."""
    return nnx.split(nnx.eval_shape(functools.partial(train._model_and_optimizer, config)))[1]


def state_bytes(
    config: train.TrainConfig, state: nnx.State, mesh: AbstractMesh | None
) -> dict[str, int]:
    """Per-device bytes of the parameters, the rest of the model state, the
    optimizer state and the gradients (the parameters' shards and dtype), from
    the `abstract_state` ``state``."""
    placed = lambda tree: (
        sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree))
        if mesh is None
        else bytes_per_device(tree, state_shardings(tree, mesh, fsdp=config.fsdp))
    )
    params = placed(nnx.filter_state(state[0], nnx.Param))
    return {
        "parameters": params,
        "other_model_state": placed(state[0]) - params,
        "optimizer_state": placed(state[1]),
        "gradients": params,
    }


def ep_bound(model: TransformerConfig) -> float | None:
    """The receive-buffer bound the expert-parallel layer uses: ``ep_buffer_factor``,
    else ``ep_capacity_factor``, else None (the worst case)."""
    moe = model.moe
    return moe.ep_capacity_factor if moe.ep_buffer_factor is None else moe.ep_buffer_factor


def layout_rows(model: TransformerConfig, tokens: int, axes: dict[str, int], factor) -> int:
    """Rows of one MoE layer's expert layout on a device with ``tokens`` local
    tokens: dropless on one device (every assignment, each expert's group padded
    to the block), or the expert-parallel receive buffer (worst case, or
    ``ceil(factor * tokens * k)`` rows per round) plus the local experts' padding."""
    moe = model.moe
    block = layout_block_size(moe.impl if moe.impl != "auto" else "xla", moe.block_size)
    if EXPERT not in axes:
        return tokens * moe.top_k + moe.num_experts * (block - 1)
    sharding = ExpertSharding.create(moe, axes[EXPERT])
    capacity = sharding.capacity(tokens, moe.top_k, factor)
    return capacity + sharding.num_local * (block - 1)


def activation_bytes(
    model: TransformerConfig, tokens: int, axes: dict[str, int], device: Device
) -> dict[str, int]:
    """Per-device activation bytes of one training step, ``tokens`` local tokens, at the
    backward pass's peak.

    The backward walks the blocks from the last to the first. While it differentiates
    block ``i`` the device holds what the forward kept of blocks ``0..i`` (``kept``),
    block ``i``'s working set (``working``: the cotangents of its activations, and
    under remat its recomputed activations), and the gradients of the blocks after
    ``i`` and of the output projection not yet summed over the devices
    (``pending_gradients``: with `Device.reduces_gradients_at_end` XLA combines the
    gradients' all-reduces into a few after the backward, so until then each is a
    temporary beside its output buffer; otherwise only the last block's is in flight;
    none on one device). The peak is the largest such sum. What each part holds:

    * per block, attention: its input and normalised input, q/k/v, the
      attention output ``[T, d]``-sized tensors in the compute dtype, and (without
      fused attention) two ``[b, heads, seq, seq]`` float32 tensors (scores, probabilities);
    * per MoE block: the normalised input, router logits and probabilities
      ``[T, E]`` (float32), the un-permuted ``[T, k, d]`` rows, and the layout rows
      ``R`` (`layout_rows`) at width ``d`` in and out (not with a
      `Device.fused_expert_mlp`) and ``d_ff`` hidden (two or three tensors for glu).
      Exchange steps that recompute their forward (the padded exchange, or rounds)
      keep no layout: it lives only while its block is differentiated. Dense blocks
      keep ``[T, k * d_ff]``;
    * remat ``"ffn"`` keeps only the FFN's input, ``"block"`` only the block's
      input; the recomputed part's activations are then live once, for the
      block being differentiated;
    * the logits ``[T, vocab]`` float32 (logits, log-softmax and their gradient).

    Checked against XLA:CPU's compiled temporaries (docs/scale_out.md).
    """
    moe = model.moe
    c = jnp.dtype(moe.dtype).itemsize
    d, hd, seq = model.d_model, model.head_size, model.max_seq_len
    heads, kv = model.num_heads, model.kv_heads
    scores = 0 if device.fused_attention else 2 * 4 * (tokens // seq) * heads * seq * seq
    attention = c * tokens * (2 * d + (heads + 2 * kv) * hd + heads * hd) + scores
    hidden = 3 if moe.expert_type == "glu" else 2
    bound = ep_bound(model)
    rows = layout_rows(model, tokens, axes, bound)
    layout = c * rows * ((0 if device.fused_expert_mlp else 2 * d) + hidden * moe.d_ff)
    recomputed = EXPERT in axes and (device.padded_exchange or bound is not None)
    routed = c * tokens * d + 4 * tokens * moe.num_experts * 2 + c * tokens * moe.top_k * d
    routed += 0 if recomputed else layout
    dense = c * tokens * (d + hidden * model.dense_d_ff)
    param = jnp.dtype(moe.param_dtype).itemsize
    reduced = math.prod(axes.values()) > 1  # the gradients are summed over devices
    at_end = device.reduces_gradients_at_end
    shards = axes.get(EXPERT, 1)
    block_input = c * tokens * d
    blocks = []  # (kept, working, gradient bytes) of each block
    for i in range(model.num_layers):
        is_routed = i in model.moe_layers
        ffn = routed if is_routed else dense
        keep = attention + ffn  # what the block's forward keeps without remat
        cotangents = keep + (layout if is_routed and recomputed else 0)
        kept, working = {
            "none": (keep, cotangents),
            "ffn": (attention + block_input, cotangents + ffn),
            "block": (block_input, keep + cotangents),
        }[model.remat]
        grads = param * flops.block_params(model, is_routed, shards) if reduced else 0
        blocks.append((kept, working, grads))
    # Gradients unreduced while block i is differentiated: the later blocks' and the
    # output projection's (all of them, or the one just computed).
    unreduced = [g for _, _, g in blocks] + [param * model.vocab_size * d if reduced else 0]
    pending = lambda i: sum(unreduced[i + 1 :]) if at_end else unreduced[i + 1]
    at_block = [
        (sum(kept for kept, _, _ in blocks[: i + 1]), blocks[i][1], pending(i))
        for i in range(len(blocks))
    ]
    kept, working, pending = max(at_block, key=sum)
    logits = 3 * 4 * tokens * model.vocab_size
    return {"kept": kept, "working": working, "pending_gradients": pending, "logits": logits}


def flops_per_token(model: TransformerConfig) -> dict[str, float]:
    """Training FLOPs per token (`experiments.flops`: ``6 * N_active`` plus causal
    attention's scores); ``remat`` adds the recomputed forward of each FFN or block
    (everything but the output projection)."""
    training = flops.flops_per_token(model)  # 3x the forward's
    recompute = {
        "none": 0,
        "ffn": 2 * flops.ffn_params_active(model),
        "block": training / 3 - 2 * model.d_model * model.vocab_size,
    }[model.remat]
    active = flops.matmul_params_active(model)
    return {"active_params": active, "train": training, "with_remat": training + recompute}


def _axis_bandwidth(axes: dict[str, int], name: str, device: Device) -> float:
    """Link bandwidth of ``name``'s groups: inside a node when the group's span fits one."""
    names = list(axes)
    stride = math.prod(axes[n] for n in names[names.index(name) + 1 :])
    inside = stride * axes[name] <= device.per_node
    return device.link_bytes_per_s if inside else device.network_bytes_per_s


def _names(part) -> tuple[str, ...]:
    return part if isinstance(part, tuple) else (part,)


def communication(
    config: train.TrainConfig, params: nnx.State, mesh: AbstractMesh | None, tokens: int
) -> dict[str, float]:
    """Bytes one device sends per step, per mesh axis (ring collectives), for the
    abstract parameters ``params`` and ``tokens`` local tokens.

    Per state leaf of ``s`` bytes per device: over its FSDP group of ``n``
    devices, all-gathers in the forward and the backward (``2 (n-1) s``, compute
    dtype) and a reduce-scatter of the gradient (``(n-1) s``); over each other
    token axis of size ``m`` it is replicated on, an all-reduce of the gradient
    (``2 (m-1)/m s``). A multi-axis FSDP group is listed under its joined
    names (``data+fsdp``). Expert axis: each MoE layer sends its tokens' rows
    to the experts' owners and back, forward and backward (``4 T k (ep-1)/ep``
    rows of ``d_model`` in the compute dtype, balanced routing), plus the
    recomputed forward's two under ``remat``.
    """
    if mesh is None:
        return {}
    axes = dict(mesh.shape)
    model = config.model
    compute = jnp.dtype(model.moe.dtype).itemsize
    shardings = state_shardings(params, mesh, fsdp=config.fsdp)
    volume = dict.fromkeys(axes, 0.0)
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        shard = math.prod(sharding.shard_shape(leaf.shape))
        used = [a for part in sharding.spec if part for a in _names(part)]
        group = [a for a in used if a != EXPERT]
        if group:
            n = math.prod(axes[a] for a in group)
            key = "+".join(group)
            volume[key] = volume.get(key, 0.0) + (n - 1) * shard * (
                2 * compute + leaf.dtype.itemsize
            )
        for name in axes:
            if name not in used:
                m = axes[name]
                volume[name] += 2 * (m - 1) / m * shard * leaf.dtype.itemsize
    if EXPERT in axes and model.moe_layers:
        ep = axes[EXPERT]
        passes = 4 + (2 if model.remat != "none" else 0)
        rows = passes * tokens * model.moe.top_k * (ep - 1) / ep
        volume[EXPERT] += len(model.moe_layers) * rows * model.d_model * compute
    return {name: value for name, value in volume.items() if value}


def make_plan(config: train.TrainConfig, device: str) -> dict:
    """Everything `experiments.plan` prints, as numbers (bytes, FLOPs, seconds), per device."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {tuple(DEVICES)}, got {device!r}")
    spec = DEVICES[device]
    axes = mesh_axes(config.mesh) if config.mesh is not None else {}
    devices = math.prod(axes.values())
    if config.batch_size % devices:
        raise ValueError(
            f"--batch-size {config.batch_size} is not divisible by the {devices} devices "
            f"of {mesh_flag(axes)}"
        )
    mesh = abstract_mesh(axes) if axes else None
    model = config.model
    if model.moe_layers and EXPERT in axes:
        ExpertSharding.create(model.moe, axes[EXPERT])  # ValueError unless the experts fit
    tokens = config.tokens_per_step // devices
    state = abstract_state(config)
    memory = state_bytes(config, state, mesh)
    activations = activation_bytes(model, tokens, axes, spec)
    memory["activations"] = sum(activations.values())
    ep = {}
    if model.moe_layers and EXPERT in axes:
        width = 2 * model.d_model * jnp.dtype(model.moe.dtype).itemsize  # dispatch + combine
        factor = model.moe.ep_buffer_factor or 1.0
        ep = {
            "worst_case": layout_rows(model, tokens, axes, None) * width,
            "buffer_factor": factor,
            "with_buffer_factor": layout_rows(model, tokens, axes, factor) * width,
        }
    per_token = flops_per_token(model)
    step_flops = per_token["with_remat"] * tokens
    comm = communication(config, nnx.filter_state(state[0], nnx.Param), mesh, tokens)
    comm_s = {
        name: volume / _axis_bandwidth(axes, name.split("+")[0], spec)
        for name, volume in comm.items()
    }
    return {
        "device": spec.name,
        "mesh": axes,
        "devices": devices,
        "tokens_per_device": tokens,
        "memory": memory,
        "activations": activations,
        "total_bytes": sum(memory.values()),
        "device_memory_bytes": spec.memory_bytes,
        "ep_exchange_bytes": ep,
        "flops_per_token": per_token,
        "flops_per_device_step": step_flops,
        "communication_bytes": comm,
        "compute_s": step_flops / spec.peak_flops,
        "communication_s": comm_s,
        "step_time_s": step_flops / spec.peak_flops + sum(comm_s.values()),
    }


def _size(value: float) -> str:
    return f"{value / GIB:,.2f} GiB" if value >= GIB / 10 else f"{value / 2**20:,.2f} MiB"


def format_plan(plan: dict, config: train.TrainConfig, name: str) -> str:
    """The plan as a Markdown-friendly text report."""
    model = config.model
    mesh = " x ".join(f"{k}={v}" for k, v in plan["mesh"].items()) or "one device"
    lines = [
        f"{name}: {plan['devices']} x {plan['device']} ({mesh}{', --fsdp' if config.fsdp else ''})"
        f" | batch {config.batch_size} x seq {model.max_seq_len}"
        f" ({plan['tokens_per_device']:,} tokens per device) | remat {model.remat}"
        f" | compute {jnp.dtype(model.moe.dtype).name}, parameters"
        f" {jnp.dtype(model.moe.param_dtype).name}",
        "",
        "| per device | bytes |",
        "|---|---:|",
    ]
    labels = {
        "parameters": "parameters",
        "other_model_state": "other model state",
        "optimizer_state": "optimizer state (AdamW)",
        "gradients": "gradients",
        "activations": f"activations (remat {model.remat})",
    }
    lines += [f"| {labels[k]} | {_size(v)} |" for k, v in plan["memory"].items()]
    lines.append(f"| **total** | **{_size(plan['total_bytes'])}** |")
    lines.append(f"| device memory | {_size(plan['device_memory_bytes'])} |")
    ep = plan["ep_exchange_bytes"]
    if ep:
        lines.append(
            f"| EP exchange buffers per MoE layer: worst case | {_size(ep['worst_case'])} |"
        )
        lines.append(
            f"| ... with ep_buffer_factor={ep['buffer_factor']:g} | "
            f"{_size(ep['with_buffer_factor'])} |"
        )
    per_token = plan["flops_per_token"]
    lines += [
        "",
        f"FLOPs per token (training): {per_token['train'] / 1e9:,.2f} GFLOP "
        f"({per_token['active_params'] / 1e9:,.2f} B active matmul parameters); "
        f"with remat {per_token['with_remat'] / 1e9:,.2f} GFLOP; "
        f"per device per step {plan['flops_per_device_step'] / 1e12:,.1f} TFLOP",
    ]
    if plan["communication_bytes"]:
        lines.append(
            "Communication per step per device (sent): "
            + ", ".join(
                f"{axis} {_size(volume)} ({plan['communication_s'][axis] * 1e3:,.1f} ms)"
                for axis, volume in plan["communication_bytes"].items()
            )
        )
    lines.append(
        f"Estimated step time at peak: compute {plan['compute_s']:.3f} s + communication "
        f"{sum(plan['communication_s'].values()):.3f} s (not overlapped) = "
        f"{plan['step_time_s']:.3f} s"
    )
    return "\n".join(lines)


def _add_plan_arguments(parser: argparse.ArgumentParser):
    parser.prog = "python -m experiments.plan"
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument_group("plan").add_argument(
        "--device",
        choices=tuple(DEVICES),
        default="h100",
        help="device kind: peak FLOP/s, memory, links (default: %(default)s)",
    )


def main(argv=None) -> dict:
    """Command-line entry: prints the plan, returns it."""
    args = train.parse_args(argv, extend=_add_plan_arguments)
    if args.dtype == "auto":  # the planned device's, not this machine's
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    config, name = train.config_from_args(args)
    plan = make_plan(config, args.device)
    print(format_plan(plan, config, name))
    return plan


if __name__ == "__main__":
    main()
