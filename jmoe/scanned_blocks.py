"""Scan over layers: a transformer's blocks stacked on a leading layer axis.

With ``TransformerConfig.scan_layers`` the ``num_layers`` blocks become
``num_layers / period`` groups of ``period = moe_every`` blocks (one block, or
a GLaM (dense, MoE) pair): each parameter of a group position gets a leading
``[groups]`` axis (created by `nnx.vmap` with `nnx.split_rngs`) and the groups
run under `nnx.scan`, so XLA compiles one group however deep the model is.
Each block keeps its `TransformerConfig.remat` (`nnx.remat` inside the scanned
body).

State layouts: the loop model holds ``blocks/{layer}/...``; the scanned one
``blocks/layers/{position}/...`` with leaves ``[groups, ...]``, layer
``group * period + position``. `stack_layers` / `unstack_layers` convert any
state between the two (a model's, or an optimizer's, whose moments mirror the
parameters); `relayout` builds the other layout's model with the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jmoe.attention import KVCache
from jmoe.config import require

_BLOCKS, _LAYERS = "blocks", "layers"


class ScannedBlocks(nnx.Module):
    """The blocks of a `jmoe.transformer.MoETransformer` with ``scan_layers``.

    ``blocks(x)`` for ``x [batch, seq, d_model]`` -> ``(x, per-layer aux dicts
    in layer order)``; ``layers`` is an ``nnx.List`` of ``period`` blocks whose
    variables are stacked ``[groups, ...]``.

    Args:
      config: the model's `TransformerConfig` (``num_layers`` a multiple of
        ``moe_every``).
      block: ``block(config, routed, rngs=rngs)`` builds one block
        (`jmoe.transformer.Block`).
    """

    def __init__(self, config, block: Callable[..., nnx.Module], *, rngs: nnx.Rngs):
        self.period = config.moe_every
        self.groups = config.num_layers // self.period
        routed = [p in config.moe_layers for p in range(self.period)]

        @nnx.split_rngs(splits=self.groups)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> nnx.List:
            return nnx.List([block(config, r, rngs=rngs) for r in routed])

        self.layers = make(rngs)

    def _layer_order(self, per_position: Sequence) -> list:
        """``period`` pytrees with leading ``[groups]`` -> ``num_layers`` pytrees."""
        return [
            jax.tree.map(lambda leaf, g=g: leaf[g], per_position[p])
            for g in range(self.groups)
            for p in range(self.period)
        ]

    def stack(self, per_layer: Sequence) -> list:
        """``num_layers`` pytrees (layer order) -> ``period`` pytrees stacked ``[groups, ...]``."""
        return [
            jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer[p :: self.period])
            for p in range(self.period)
        ]

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
        """Every block in layer order (``segment_ids``, ``positions``: see
        `jmoe.transformer.MoETransformer.__call__`) ``-> (x, per-layer aux)``."""

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def group(x, blocks):
            auxes = []
            for b in blocks:
                x, aux = b(x, segment_ids, positions)
                auxes.append(aux)
            return x, auxes

        x, auxes = group(x, self.layers)
        return x, self._layer_order(auxes)

    def cached(
        self, x: jax.Array, caches: list[KVCache], position: jax.Array
    ) -> tuple[jax.Array, list[KVCache]]:
        """`jmoe.transformer.Block.cached` of every layer: ``caches`` (from
        `stack`) are ``period`` `KVCache` of ``[groups, batch, max_len, kv_heads,
        head_dim]``; ``-> (x, updated caches)``.

        Decoding only reads the blocks, so this scans their split state with
        ``jax.lax.scan``: unlike `nnx.scan` it accepts blocks merged outside an
        enclosing loop (`jmoe.generate`'s ``fori_loop`` over tokens)."""
        graphdef, state = nnx.split(self.layers)

        def group(x, xs):
            blocks, group_caches = nnx.merge(graphdef, xs[0]), xs[1]
            updated = []
            for b, cache in zip(blocks, group_caches):
                x, _, cache = b.cached(x, cache, position)
                updated.append(cache)
            return x, updated

        return jax.lax.scan(group, x, (state, caches))


def _blocks_index(path: tuple) -> int | None:
    """Where ``"blocks"`` sits in ``path`` (None if nowhere)."""
    return path.index(_BLOCKS) if _BLOCKS in path else None


def is_stacked(path: Sequence) -> bool:
    """Whether the state leaf at ``path`` (its keys, e.g. ``("blocks", "layers", 0, "ffn",
    "experts", "w1")``, under any prefix such as an optimizer's ``opt_state/0/mu``) is
    stacked: its leading axis is the scanned layout's ``[groups]`` layer axis."""
    path = tuple(path)
    at = _blocks_index(path)
    return at is not None and path[at + 1 : at + 2] == (_LAYERS,)


def _replace_leaf(leaf, value):
    return leaf.replace(value) if isinstance(leaf, nnx.Variable) else value


def _value(leaf):
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def stack_layers(state: nnx.State, period: int) -> nnx.State:
    """The scanned layout of a loop-layout ``state`` (``blocks/{layer}/...`` ->
    ``blocks/layers/{layer % period}/...`` stacked by ``layer // period``).

    ``period`` is the model's ``moe_every``; paths without ``blocks`` (and any
    enclosing prefix, such as an optimizer's ``opt_state/...``) are kept.
    """
    groups: dict[tuple, list] = {}
    flat = []
    for path, leaf in nnx.to_flat_state(state):
        at = _blocks_index(path)
        if at is None:
            flat.append((path, leaf))
            continue
        layer = path[at + 1]
        require(
            isinstance(layer, int),
            f"state must have the loop layout (blocks/{{layer}}), got {path}",
        )
        key = (*path[: at + 1], _LAYERS, layer % period, *path[at + 2 :])
        groups.setdefault(key, []).append((layer // period, leaf))
    for key, members in groups.items():
        members.sort(key=lambda m: m[0])
        leaves = [leaf for _, leaf in members]
        flat.append((key, _replace_leaf(leaves[0], jnp.stack([_value(x) for x in leaves]))))
    return nnx.from_flat_state(flat)


def unstack_layers(state: nnx.State) -> nnx.State:
    """The loop layout of a scanned-layout ``state`` (inverse of `stack_layers`)."""
    positions = {
        path[_blocks_index(path) + 2] + 1
        for path, _ in nnx.to_flat_state(state)
        if is_stacked(path)
    }
    period = max(positions, default=1)
    flat = []
    for path, leaf in nnx.to_flat_state(state):
        at = _blocks_index(path)
        if at is None:
            flat.append((path, leaf))
            continue
        require(
            path[at + 1] == _LAYERS,
            f"state must have the scanned layout (blocks/layers), got {path}",
        )
        value = _value(leaf)
        for g in range(value.shape[0]):
            key = (*path[: at + 1], g * period + path[at + 2], *path[at + 3 :])
            flat.append((key, _replace_leaf(leaf, value[g])))
    return nnx.from_flat_state(flat)


def relayout(model: nnx.Module, scan_layers: bool) -> nnx.Module:
    """``model`` (a `jmoe.transformer.MoETransformer`) with its layers in the
    loop (``scan_layers=False``) or scanned layout, holding the same state;
    ``model`` itself when it already has that layout."""
    if model.config.scan_layers == scan_layers:
        return model
    config = model.config.replace(scan_layers=scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0))))
    state = nnx.state(model)
    state = stack_layers(state, config.moe_every) if scan_layers else unstack_layers(state)
    return nnx.merge(graphdef, state)
