"""Hugging Face checkpoints of Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE and
DeepSeek-V3 models as jmoe models.

``model = jmoe.hf.load(path)`` reads a local folder (``config.json`` plus
``model.safetensors``, or shards with ``model.safetensors.index.json``), in the
per-expert layout Hub checkpoints and transformers' ``save_pretrained`` write
or the fused one (``experts.gate_up_proj [E, 2f, d]``); with ``mesh=`` every
parameter is created sharded, each process reading only its devices' slices.
``jmoe.hf.save(model, path)`` writes the same format back, one tensor gathered
at a time, from process 0. Needs the ``safetensors`` package (numpy API; no
torch). See docs/hf.md.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jmoe.hf import config as hf_config
from jmoe.hf import tensors as hf_tensors
from jmoe.hf.architectures import MODEL_TYPES
from jmoe.hf.files import Checkpoint, ShardWriter
from jmoe.parallel import state_shardings
from jmoe.router import ExpertBias
from jmoe.scanned_blocks import relayout
from jmoe.transformer import MoETransformer, TransformerConfig

__all__ = ["MODEL_TYPES", "load", "load_config", "save"]

# Buffers some checkpoints carry that a model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# save's default shard size (transformers' classic "5GB").
MAX_SHARD_BYTES = 5 * 10**9


def _checked_shapes(shapes: dict, maps: list) -> None:
    """Refuses missing, extra and misshapen tensors, naming them."""
    expected = {name: shape for m in maps for name, shape in zip(m.names, m.shapes)}
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ValueError(
            f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors missing)"
        )
    extra = sorted(n for n in shapes if n not in expected)
    if extra:
        raise ValueError(
            f"{extra[0]}: unexpected tensor in the checkpoint "
            f"({len(extra)} unexpected); the model has no such parameter"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(shapes[name])}")


def load_config(path, *, param_dtype=None, dtype=jnp.float32, impl: str = "auto"):
    """The `TransformerConfig` of the Hugging Face folder ``path`` (see `load`)."""
    hf = json.loads((Path(path) / "config.json").read_text())
    config = hf_config.from_hf(hf, dtype=dtype, impl=impl)
    moe = config.moe.replace(param_dtype=dtype if param_dtype is None else param_dtype)
    return config.replace(moe=moe, load_balancing_loss_scope="global")


def _parameter(mapping, read, variable, sharding, dtype) -> jax.Array:
    """One parameter as a jax.Array in ``sharding`` (None: the default device),
    each distinct shard read once from the checkpoint. Waits for the copies to
    the devices, so host memory never holds more than this parameter's slices
    (transfers are asynchronous: on a busy host they would pile up)."""
    if sharding is None:
        value = jax.device_put(hf_tensors.param_slice(mapping, read, variable.shape).astype(dtype))
        return value.block_until_ready()

    @functools.cache
    def shard(box):
        return hf_tensors.param_slice(mapping, read, variable.shape, box).astype(dtype)

    def callback(index):
        return shard(hf_tensors.normalized(index, variable.shape))

    return jax.make_array_from_callback(variable.shape, sharding, callback).block_until_ready()


def load(
    path,
    *,
    mesh=None,
    param_dtype=None,
    dtype=jnp.float32,
    impl: str = "auto",
    scan_layers: bool = False,
    fsdp: bool = False,
) -> MoETransformer:
    """A `MoETransformer` with the weights of the Hugging Face folder ``path``.

    The model trains with transformers' loss: ``load_balancing_loss_scope=
    "global"`` and ``load_balancing_loss_weight`` the checkpoint's
    ``router_aux_loss_coef``. Tensors are read one at a time, only the slices
    this process's devices hold (host memory: about the process's shards
    plus the largest tensor).

    Args:
      path: folder with ``config.json`` and safetensors weights.
      mesh: None (every parameter whole on the default device) or a
        ``jmoe.parallel.make_mesh`` mesh: each parameter is created sharded as
        the trainer shards it (`jmoe.parallel.state_shardings`).
      param_dtype: parameter dtype (None: ``dtype``); e.g. float32 master
        weights under a bfloat16 ``dtype``, upcast from the checkpoint's.
      dtype: compute dtype of the model.
      impl: expert product kernels (`MoEConfig.impl`).
      scan_layers: return the model with stacked, scanned layers
        (`TransformerConfig.scan_layers`).
      fsdp: with ``mesh``, split the other parameters over ``"data"`` too.

    Raises:
      ValueError: an unsupported ``model_type`` or configuration option, or a
        missing, unexpected or misshapen tensor (the message names it).
    """
    folder = Path(path)
    config = load_config(folder, param_dtype=param_dtype, dtype=dtype, impl=impl)
    arch = hf_config.architecture(json.loads((folder / "config.json").read_text()))
    checkpoint = Checkpoint(folder)
    shapes = {n: s for n, s in checkpoint.shapes.items() if not n.endswith(_IGNORED_SUFFIXES)}
    found = hf_tensors.sources(shapes, config, arch)
    maps = hf_tensors.mappings(config, arch)
    _checked_shapes({name: source.shape for name, source in found.items()}, maps)

    def read(name, index):
        return checkpoint.read(found[name].name, found[name].index(index))

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0))))
    shardings = (
        dict(nnx.to_flat_state(state_shardings(abstract, mesh, fsdp=fsdp)))
        if mesh is not None
        else {}
    )
    by_path = {m.path: m for m in maps}
    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        sharding = shardings[path].get_value() if mesh is not None else None
        value = _parameter(by_path[path], read, variable, sharding, variable.dtype)
        leaves.append((path, variable.replace(value)))
    return relayout(nnx.merge(graphdef, nnx.from_flat_state(leaves)), scan_layers)


def _host(value) -> np.ndarray:
    """The whole of ``value`` on this host (gathered from every process if needed)."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(jax.device_get(value))
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _aux_coef(config: TransformerConfig) -> float:
    """transformers' ``router_aux_loss_coef`` of a jmoe model: the weight under
    the ``"global"`` scope; under ``"layer_mean"`` the weight / top_k
    (transformers' loss is top_k at balance, the per-layer loss 1)."""
    weight = config.moe.load_balancing_loss_weight
    return weight if config.load_balancing_loss_scope == "global" else weight / config.moe.top_k


def save(
    model: MoETransformer,
    path,
    *,
    fused: bool = False,
    max_shard_bytes: int | None = MAX_SHARD_BYTES,
) -> None:
    """Writes ``model`` as a Hugging Face folder that `load` (and transformers)
    reads back: ``config.json`` and safetensors weights in the parameters' dtype.

    Works on models sharded over devices and processes: every process calls
    it; the parameters are gathered one at a time (a layer's experts together
    with ``fused``) and process 0 writes shards as they fill, so its host
    memory holds at most one shard plus the tensor being gathered. Returns on
    every process once the folder is complete.

    Args:
      model: a `MoETransformer` whose configuration one of the supported
        architectures expresses (see `jmoe.hf.config.to_hf`).
      path: the folder (created if needed).
      fused: write experts fused (``experts.gate_up_proj [E, 2f, d]``,
        ``experts.down_proj [E, d, f]``) instead of one tensor per expert.
      max_shard_bytes: shard size limit (None: one file); a model that fits
        one shard is written as ``model.safetensors``.
    """
    model = relayout(model, scan_layers=False)  # HF names one tensor per layer
    hf = hf_config.to_hf(model.config)
    hf["router_aux_loss_coef"] = _aux_coef(model.config)
    arch = hf_config.architecture(hf)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, ExpertBias))))
    main = jax.process_index() == 0
    folder = Path(path)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    writer = ShardWriter(folder, max_shard_bytes, write=main)
    maps = hf_tensors.mappings(model.config, arch)
    # fused: a layer's router and experts form one group (fused together)
    group = lambda m: m.path[:3] if fused and m.path[2:3] == ("ffn",) else m.path
    for key, members in itertools.groupby(maps, key=group):
        tensors = {}
        for mapping in members:
            value = _host(params[mapping.path].get_value())
            tensors.update(zip(mapping.names, hf_tensors.from_param(mapping, value)))
        if fused and key[-1] == "ffn" and key[1] in model.config.moe_layers:
            tensors = hf_tensors.fuse_layer(tensors, key[1], model.config, arch)
        writer.add(tensors)
    writer.close()
    if jax.process_count() > 1:  # return when the folder is complete, on every process
        multihost_utils.sync_global_devices(f"jmoe.hf.save {folder}")
