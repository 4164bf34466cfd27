"""Hugging Face checkpoints of Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE and
DeepSeek-V3 models as jmoe models.

``model = jmoe.hf.load(path)`` reads a local folder (``config.json`` plus
``model.safetensors``, or shards with ``model.safetensors.index.json``), in the
per-expert layout Hub checkpoints and transformers' ``save_pretrained`` write
or the fused one (``experts.gate_up_proj [E, 2f, d]``); ``jmoe.hf.save(model,
path)`` writes the same format back. Needs the ``safetensors`` package (numpy
API; no torch). See docs/hf.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jmoe.hf import config as hf_config
from jmoe.hf import tensors as hf_tensors
from jmoe.hf.architectures import MODEL_TYPES
from jmoe.hf.files import read_tensors, write_tensors
from jmoe.router import ExpertBias
from jmoe.transformer import MoETransformer

__all__ = ["MODEL_TYPES", "load", "save"]

# Buffers some checkpoints carry that a model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _checked_tensors(tensors: dict, maps: list) -> None:
    """Refuses missing, extra and misshapen tensors, naming them."""
    expected = {name: shape for m in maps for name, shape in zip(m.names, m.shapes)}
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(
            f"{missing[0]}: missing from the checkpoint ({len(missing)} tensors missing)"
        )
    extra = sorted(n for n in tensors if n not in expected)
    if extra:
        raise ValueError(
            f"{extra[0]}: unexpected tensor in the checkpoint "
            f"({len(extra)} unexpected); the model has no such parameter"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{name}: expected shape {list(shape)}, got {list(tensors[name].shape)}"
            )


def load(path, *, dtype=jnp.float32, impl: str = "auto") -> MoETransformer:
    """A `MoETransformer` with the weights of the Hugging Face folder ``path``.

    Args:
      path: folder with ``config.json`` and safetensors weights.
      dtype: parameter and compute dtype of the model.
      impl: expert product kernels (`MoEConfig.impl`).

    Raises:
      ValueError: an unsupported ``model_type`` or configuration option, or a
        missing, unexpected or misshapen tensor (the message names it).
    """
    folder = Path(path)
    hf = json.loads((folder / "config.json").read_text())
    config = hf_config.from_hf(hf, dtype=dtype, impl=impl)
    arch = hf_config.architecture(hf)
    tensors = {n: t for n, t in read_tensors(folder).items() if not n.endswith(_IGNORED_SUFFIXES)}
    if hf_tensors.is_fused(tensors):
        tensors = hf_tensors.unfuse(tensors, config, arch)
    maps = hf_tensors.mappings(config, arch)
    _checked_tensors(tensors, maps)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0))))
    by_path = {m.path: m for m in maps}
    leaves = []
    for path, variable in abstract.flat_state():
        mapping = by_path[path]
        value = hf_tensors.to_param(mapping, [tensors[n] for n in mapping.names], variable.shape)
        leaves.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save(
    model: MoETransformer, path, *, fused: bool = False, max_shard_bytes: int | None = None
) -> None:
    """Writes ``model`` as a Hugging Face folder that `load` (and transformers)
    reads back: ``config.json`` and safetensors weights in the parameters' dtype.

    Args:
      model: a `MoETransformer` whose configuration one of the supported
        architectures expresses (see `jmoe.hf.config.to_hf`).
      path: the folder (created if needed).
      fused: write experts fused (``experts.gate_up_proj [E, 2f, d]``,
        ``experts.down_proj [E, d, f]``) instead of one tensor per expert.
      max_shard_bytes: split the weights into shards of at most this size.
    """
    hf = hf_config.to_hf(model.config)
    arch = hf_config.architecture(hf)
    params = {
        path: np.asarray(v.get_value())
        for path, v in nnx.state(model, nnx.Any(nnx.Param, ExpertBias)).flat_state()
    }
    tensors = {}
    for mapping in hf_tensors.mappings(model.config, arch):
        tensors.update(zip(mapping.names, hf_tensors.from_param(mapping, params[mapping.path])))
    if fused:
        tensors = hf_tensors.fuse(tensors, model.config, arch)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_tensors(folder, tensors, max_shard_bytes)
