"""A run's model configuration on disk (``model_config.json``), its latest
checkpoint's model, and starting a run from a Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

import jmoe.hf
from experiments.checkpoint import Checkpoints
from experiments.overrides import DTYPE_FIELDS
from jmoe import MoEConfig
from jmoe.transformer import MoETransformer, TransformerConfig

MODEL_CONFIG = "model_config.json"


def config_from_json(data: dict) -> TransformerConfig:
    """The inverse of `experiments.overrides.model_dict` (what ``model_config.json`` holds)."""
    moe = dict(data["moe"])
    moe.update({k: jnp.dtype(moe[k]) for k in DTYPE_FIELDS})
    return TransformerConfig(**{**data, "moe": MoEConfig(**moe)})


def read_model_config(run_dir: Path) -> TransformerConfig | None:
    """The run's ``model_config.json`` (written by `experiments.train`), or None."""
    path = Path(run_dir) / MODEL_CONFIG
    return config_from_json(json.loads(path.read_text())) if path.exists() else None


def latest_model(run_dir: Path, config: TransformerConfig) -> tuple[MoETransformer, int]:
    """``(model, step)`` of the latest Orbax checkpoint of an ``experiments.train`` run."""
    from experiments.train import TrainConfig, optimizer  # train imports this module

    abstract = nnx.eval_shape(lambda: MoETransformer(config, rngs=nnx.Rngs(0)))
    # The checkpoint holds (model, optimizer) state; its structure, not its values, is needed.
    opt = nnx.eval_shape(
        lambda: nnx.Optimizer(
            abstract, optimizer(TrainConfig(model=config, out="", cache_dir="")), wrt=nnx.Param
        )
    )
    graphdef, state = nnx.split((abstract, opt))
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints", every=1)
    step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {Path(run_dir) / 'checkpoints'}")
    state, _ = checkpoints.restore(step, state)
    checkpoints.close()
    model, _ = nnx.merge(graphdef, state)
    return model, step


def with_hf_weights(state: nnx.State, path: str, config: TransformerConfig, mesh) -> nnx.State:
    """``state`` of ``(model, optimizer)`` with the model's parameters read
    from the Hugging Face folder ``path`` (sharded on ``mesh`` as the trainer
    shards them; the optimizer state is unchanged)."""
    moe = config.moe
    loaded = jmoe.hf.load(path, mesh=mesh, param_dtype=moe.param_dtype, dtype=moe.dtype)
    flat = dict(nnx.to_flat_state(state))
    for leaf, variable in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
        key = (0, *leaf)
        if flat[key].get_value().shape != variable.get_value().shape:
            raise ValueError(
                f"--init-from-hf {path}: {'.'.join(map(str, leaf))} has shape "
                f"{variable.get_value().shape}, the model {flat[key].get_value().shape}"
            )
        flat[key] = flat[key].replace(variable.get_value())
    return nnx.from_flat_state(list(flat.items()))
