"""Hugging Face tensor names and layouts <-> jmoe parameter paths.

Hugging Face linear weights are ``[out, in]`` (``y = x @ W.T``); jmoe kernels
are ``[in, *out]``, so a kernel is the weight transposed and reshaped. A jmoe
parameter can gather several Hugging Face tensors stacked along one axis:
``qkv.kernel [d, 3, heads, head_dim]`` holds q/k/v_proj and
``experts.w1 [E, d, f]`` one tensor per expert.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jmoe.hf.architectures import Architecture
from jmoe.transformer import TransformerConfig

FUSED_PREFIX = "mlp"


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One jmoe parameter and the Hugging Face tensors it is made of.

    ``names[i]`` has shape ``shapes[i]``; ``linear``: each is a ``[out, in]``
    weight whose transpose, reshaped, is a slice of the kernel; ``stack_axis``:
    the axis of the jmoe parameter the tensors are stacked on (None: one tensor).
    """

    path: tuple
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    linear: bool
    stack_axis: int | None = None


def _norm(path, name, width):
    return Mapping(path, (name,), ((width,),), linear=False)


def _linear(path, names, out_width, in_width, stack_axis=None):
    names = tuple(names)
    return Mapping(
        path, names, ((out_width, in_width),) * len(names), linear=True, stack_axis=stack_axis
    )


def _latent_attention(config: TransformerConfig, layer: int, prefix: str) -> list[Mapping]:
    """DeepSeek-V3's MLA projections (`jmoe.mla.LatentAttention`)."""
    mla, d, heads = config.mla, config.d_model, config.num_heads
    path = ("blocks", layer, "attn")
    proj = lambda name: f"{prefix}.self_attn.{name}.weight"
    q_width = heads * mla.qk_head_dim
    if mla.q_lora_rank is None:
        maps = [_linear((*path, "q", "kernel"), [proj("q_proj")], q_width, d)]
    else:
        maps = [
            _linear((*path, "q_a", "kernel"), [proj("q_a_proj")], mla.q_lora_rank, d),
            _norm((*path, "q_a_norm", "scale"), proj("q_a_layernorm"), mla.q_lora_rank),
            _linear((*path, "q", "kernel"), [proj("q_b_proj")], q_width, mla.q_lora_rank),
        ]
    kv_width = heads * (mla.qk_nope_head_dim + mla.v_head_dim)
    return maps + [
        _linear((*path, "kv_a", "kernel"), [proj("kv_a_proj_with_mqa")], mla.cache_width, d),
        _norm((*path, "kv_a_norm", "scale"), proj("kv_a_layernorm"), mla.kv_lora_rank),
        _linear((*path, "kv_b", "kernel"), [proj("kv_b_proj")], kv_width, mla.kv_lora_rank),
        _linear((*path, "out", "kernel"), [proj("o_proj")], d, heads * mla.v_head_dim),
    ]


def _attention_biases(config: TransformerConfig, layer: int, prefix: str) -> list[Mapping]:
    """Qwen2's q/k/v_proj biases (``attn.qkv.bias [3, heads, head_dim]``, or
    ``attn.q.bias`` and ``attn.kv.bias [2, kv_heads, head_dim]``)."""
    q_width, kv_width = config.num_heads * config.head_size, config.kv_heads * config.head_size
    path = ("blocks", layer, "attn")
    bias = lambda name: f"{prefix}.self_attn.{name}.bias"
    if config.kv_heads == config.num_heads:
        names = tuple(map(bias, ("q_proj", "k_proj", "v_proj")))
        return [Mapping((*path, "qkv", "bias"), names, ((q_width,),) * 3, False, 0)]
    return [
        Mapping((*path, "q", "bias"), (bias("q_proj"),), ((q_width,),), linear=False),
        Mapping(
            (*path, "kv", "bias"), (bias("k_proj"), bias("v_proj")), ((kv_width,),) * 2, False, 0
        ),
    ]


def _attention(config: TransformerConfig, layer: int, prefix: str) -> list[Mapping]:
    if config.mla is not None:
        return _latent_attention(config, layer, prefix)
    d, hd = config.d_model, config.head_size
    q_width, kv_width = config.num_heads * hd, config.kv_heads * hd
    path = ("blocks", layer, "attn")
    proj = lambda name: f"{prefix}.self_attn.{name}.weight"
    if config.kv_heads == config.num_heads:
        maps = [
            _linear(
                (*path, "qkv", "kernel"),
                map(proj, ("q_proj", "k_proj", "v_proj")),
                q_width,
                d,
                stack_axis=1,
            )
        ]
    else:
        maps = [
            _linear((*path, "q", "kernel"), [proj("q_proj")], q_width, d),
            _linear(
                (*path, "kv", "kernel"), map(proj, ("k_proj", "v_proj")), kv_width, d, stack_axis=1
            ),
        ]
    maps.append(Mapping((*path, "out", "kernel"), (proj("o_proj"),), ((d, q_width),), linear=True))
    if config.qk_norm is not None:
        per_head = config.qk_norm == "head"
        maps += [
            _norm((*path, "q_norm", "scale"), proj("q_norm"), hd if per_head else q_width),
            _norm((*path, "k_norm", "scale"), proj("k_norm"), hd if per_head else kv_width),
        ]
    if config.attention_bias:
        maps += _attention_biases(config, layer, prefix)
    return maps


def _mlp(path: tuple, block: str, d: int, hidden: int) -> list[Mapping]:
    """A `DenseMLP`'s ``mlp.w1/w3/w2`` from ``<block>.gate/up/down_proj.weight``."""
    return [
        _linear((*path, "mlp", "w1"), [f"{block}.gate_proj.weight"], hidden, d),
        _linear((*path, "mlp", "w3"), [f"{block}.up_proj.weight"], hidden, d),
        _linear((*path, "mlp", "w2"), [f"{block}.down_proj.weight"], d, hidden),
    ]


def _moe_extras(config: TransformerConfig, arch: Architecture, layer: int, block: str):
    """Shared expert(s), the shared expert's gate and the selection bias of an MoE block."""
    moe, path, maps = config.moe, ("blocks", layer, "ffn"), []
    if moe.num_shared_experts:
        shared = f"{block}.{arch.shared_expert}"
        maps += _mlp((*path, "shared"), shared, config.d_model, moe.shared_hidden)
    if moe.num_shared_experts and moe.shared_expert_gate:
        gate = f"{block}.{arch.shared_expert_gate}.weight"
        maps.append(_linear((*path, "shared_gate"), [gate], 1, config.d_model))
    if moe.expert_bias:
        maps.append(
            _norm(
                (*path, "router", "expert_bias"),
                f"{block}.gate.e_score_correction_bias",
                moe.num_experts,
            )
        )
    return maps


def _moe(config: TransformerConfig, arch: Architecture, layer: int, prefix: str):
    moe, d = config.moe, config.d_model
    block = f"{prefix}.{arch.moe_prefix}"
    path = ("blocks", layer, "ffn")
    experts = lambda name: [f"{block}.experts.{i}.{name}.weight" for i in range(moe.num_experts)]
    gate, up, down = arch.expert_names
    if layer not in config.moe_layers:  # a dense MLP block
        return _mlp(path, f"{prefix}.mlp", d, config.dense_d_ff)
    return [
        _linear((*path, "router", "kernel"), [f"{block}.gate.weight"], moe.num_experts, d),
        _linear((*path, "experts", "w1"), experts(gate), moe.d_ff, d, stack_axis=0),
        _linear((*path, "experts", "w3"), experts(up), moe.d_ff, d, stack_axis=0),
        _linear((*path, "experts", "w2"), experts(down), d, moe.d_ff, stack_axis=0),
        *_moe_extras(config, arch, layer, block),
    ]


def mappings(config: TransformerConfig, arch: Architecture) -> list[Mapping]:
    """Every jmoe parameter of a model of ``config`` with its Hugging Face
    tensors (per-expert layout)."""
    d = config.d_model
    maps = [
        Mapping(
            ("embed", "embedding"),
            ("model.embed_tokens.weight",),
            ((config.vocab_size, d),),
            linear=False,
        ),
        _norm(("final_norm", "scale"), "model.norm.weight", d),
    ]
    if not config.tie_embeddings:
        maps.append(_linear(("lm_head", "kernel"), ["lm_head.weight"], config.vocab_size, d))
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        maps += [
            _norm(("blocks", layer, "attn_norm", "scale"), f"{prefix}.input_layernorm.weight", d),
            _norm(
                ("blocks", layer, "ffn_norm", "scale"),
                f"{prefix}.post_attention_layernorm.weight",
                d,
            ),
            *_attention(config, layer, prefix),
            *_moe(config, arch, layer, prefix),
        ]
    return maps


def normalized(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``index`` (slices, as `jax.make_array_from_callback` passes them) with
    explicit starts and stops, one per dim of ``shape``."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _group(dims: tuple[int, ...], box: tuple[slice, ...]):
    """A row-major group of ``dims`` flattened: the flat range covering the
    ``box``, that range's shape as ``(rows of dims[0], *dims[1:])`` and the
    slices cutting the box out of it."""
    rest = math.prod(dims[1:])
    first = box[0]
    flat = slice(first.start * rest, first.stop * rest)
    return flat, (first.stop - first.start, *dims[1:]), (slice(None), *box[1:])


def _tensor_slice(mapping: Mapping, read, name: str, shape: tuple, box: tuple) -> np.ndarray:
    if not mapping.linear:
        hf_shape = mapping.shapes[0]
        if tuple(hf_shape) == tuple(shape):
            return read(name, box)
        # a small tensor kept in another shape (e.g. a bias [heads * head_dim]): whole, reshaped
        return read(name, tuple(slice(0, n) for n in hf_shape)).reshape(shape)[box]
    in_width = mapping.shapes[0][1]
    split = next(k for k in range(1, len(shape)) if math.prod(shape[:k]) == in_width)
    cols, in_shape, in_cut = _group(shape[:split], box[:split])
    rows, out_shape, out_cut = _group(shape[split:], box[split:])
    block = read(name, (rows, cols)).T.reshape(*in_shape, *out_shape)
    return block[(*in_cut, *out_cut)]


def param_slice(mapping: Mapping, read, shape: tuple[int, ...], index: tuple = ()) -> np.ndarray:
    """``param[index]`` of the jmoe parameter of ``shape`` made of the mapping's
    tensors, reading only what the slice needs: ``read(name, (slices...))``
    returns a slice of a Hugging Face tensor; a stacked parameter reads each
    stacked tensor (e.g. expert) in ``index`` separately. ``index``: one slice
    per dim (missing trailing ones: whole dims)."""
    box = normalized(index, shape)
    axis = mapping.stack_axis
    if axis is None:
        return _tensor_slice(mapping, read, mapping.names[0], shape, box)
    inner_shape, inner_box = shape[:axis] + shape[axis + 1 :], box[:axis] + box[axis + 1 :]
    pieces = [
        _tensor_slice(mapping, read, name, inner_shape, inner_box)
        for name in mapping.names[box[axis]]
    ]
    return np.stack(pieces, axis=axis)


def from_param(mapping: Mapping, param: np.ndarray) -> list[np.ndarray]:
    """The Hugging Face tensors of a jmoe parameter (inverse of `param_slice`)."""
    pieces = (
        [param] if mapping.stack_axis is None else list(np.moveaxis(param, mapping.stack_axis, 0))
    )
    if mapping.linear:
        pieces = [p.reshape(shape[::-1]).T for p, shape in zip(pieces, mapping.shapes)]
    else:
        pieces = [p.reshape(shape) for p, shape in zip(pieces, mapping.shapes)]
    return [np.ascontiguousarray(p) for p in pieces]


def _fused_names(layer: int) -> tuple[str, str]:
    block = f"model.layers.{layer}.{FUSED_PREFIX}.experts"
    return f"{block}.gate_up_proj", f"{block}.down_proj"


def is_fused(names) -> bool:
    """Whether a checkpoint stores experts fused (``experts.gate_up_proj [E, 2f, d]``)."""
    return any(name.endswith("experts.gate_up_proj") for name in names)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a tensor of the per-expert layout is stored in a checkpoint:
    ``name[expert, row_offset + rows, ...]`` of a fused tensor, or the whole
    tensor ``name`` (``expert`` None). ``shape``: the per-expert tensor's."""

    name: str
    shape: tuple[int, ...]
    expert: int | None = None
    row_offset: int = 0

    def index(self, index: tuple) -> tuple:
        """The checkpoint index of ``index`` (slices with starts and stops) into this tensor."""
        if self.expert is None:
            return index
        rows, *rest = index
        shifted = slice(rows.start + self.row_offset, rows.stop + self.row_offset)
        return (self.expert, shifted, *rest)


def sources(shapes: dict, config: TransformerConfig, arch: Architecture) -> dict[str, Source]:
    """The per-expert layout's tensors of a checkpoint whose tensors have
    ``shapes`` (by name): itself, or, for a fused checkpoint, ``gate_up_proj
    [E, 2f, d]`` (gate rows first) and ``down_proj [E, d, f]`` seen as one
    tensor per expert, and Mixtral's ``mlp.gate`` as ``block_sparse_moe.gate``."""
    out = {name: Source(name, tuple(shape)) for name, shape in shapes.items()}
    if not is_fused(shapes):
        return out
    gate, up, down = arch.expert_names
    f = config.moe.d_ff
    for layer in config.moe_layers:
        gate_up_name, down_name = _fused_names(layer)
        block = f"model.layers.{layer}.{arch.moe_prefix}"
        for name, rows in ((gate_up_name, 2 * f), (down_name, config.d_model)):
            shape = shapes.get(name)
            if shape is None or len(shape) != 3 or shape[1] != rows:
                raise ValueError(
                    f"{name}: the fused layout needs this tensor as "
                    f"[E, {rows}, ...], got {'nothing' if shape is None else list(shape)}"
                )
        gate_up, down_proj = out.pop(gate_up_name), out.pop(down_name)
        for i in range(gate_up.shape[0]):
            half = (f, gate_up.shape[2])
            out[f"{block}.experts.{i}.{gate}.weight"] = Source(gate_up_name, half, i)
            out[f"{block}.experts.{i}.{up}.weight"] = Source(gate_up_name, half, i, f)
            out[f"{block}.experts.{i}.{down}.weight"] = Source(down_name, down_proj.shape[1:], i)
        fused_router = f"model.layers.{layer}.{FUSED_PREFIX}.gate.weight"
        if fused_router in out:
            out[f"{block}.gate.weight"] = out.pop(fused_router)
    return out


def fuse_layer(tensors: dict, layer: int, config: TransformerConfig, arch: Architecture) -> dict:
    """``tensors`` with layer ``layer``'s per-expert tensors and router in the
    fused layout (the inverse of `sources`)."""
    out = dict(tensors)
    gate, up, down = arch.expert_names
    block = f"model.layers.{layer}.{arch.moe_prefix}"
    pop = lambda name: np.stack(
        [out.pop(f"{block}.experts.{i}.{name}.weight") for i in range(config.moe.num_experts)]
    )
    gate_up_name, down_name = _fused_names(layer)
    out[gate_up_name] = np.concatenate([pop(gate), pop(up)], axis=1)
    out[down_name] = pop(down)
    out[f"model.layers.{layer}.{FUSED_PREFIX}.gate.weight"] = out.pop(f"{block}.gate.weight")
    return out
