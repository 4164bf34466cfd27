"""Model fields from the command line: ``--set KEY=VALUE`` and ``--config FILE.json``.

Keys are `TransformerConfig` field names (``num_layers``) and, dotted, `MoEConfig` field
names (``moe.num_experts``). A ``--config`` file is a JSON object holding the same keys,
dotted (``{"moe.top_k": 8}``), nested (``{"moe": {"top_k": 8}}``) or both; `model_dict`
writes a model in the nested form, which `apply` reads back to the same config. Values
are converted to the field's type: ``int``, ``float``, ``bool`` (``true``/``false``),
``str``, ``none``/``null`` where a field may be None, and dtype names (``bfloat16``) for
``moe.dtype`` and ``moe.param_dtype``. Setting ``d_model`` also sets ``moe.d_model``
unless that is given too, and setting ``moe.ep_capacity_factor`` clears
``moe.ep_buffer_factor`` (the two are exclusive) unless that is given too.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

import jax.numpy as jnp

from jmoe.config import MoEConfig
from jmoe.transformer import TransformerConfig

DTYPE_FIELDS = ("dtype", "param_dtype")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_assignment(text: str) -> tuple[str, str]:
    """``"moe.top_k=8"`` -> ``("moe.top_k", "8")`` (the ``--set`` argument type)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set takes KEY=VALUE, e.g. num_layers=12, got {text!r}")
    return key.strip(), value.strip()


def read_config_file(path: str | Path) -> dict[str, object]:
    """The dotted ``{key: value}`` of a ``--config`` JSON file (nested objects flattened)."""
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: must hold a JSON object, got {type(loaded).__name__}")
    return flatten(loaded)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"moe": {"top_k": 8}}`` -> ``{"moe.top_k": 8}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(key: str, value: object, hint: object, source: str) -> object:
    """``value`` (a string from ``--set`` or a JSON value) as the field's type."""
    name = key.rpartition(".")[2]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in args
    kind = next(a for a in args if a is not type(None))
    fail = lambda expected: ValueError(f"{source} {key}={value!r}: expected {expected}")
    spelled_none = isinstance(value, str) and value.lower() in ("none", "null")
    if value is None or (spelled_none and (optional or kind is not str)):
        if optional:
            return None
        raise fail(f"{getattr(kind, '__name__', 'a dtype name')}, not None")
    if name in DTYPE_FIELDS:
        try:
            dtype = jnp.dtype(value)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise fail("a floating dtype name: float32, bfloat16, float16")
        return getattr(jnp, dtype.name)
    if isinstance(value, str) and kind is not str:
        text = value.lower()
        if kind is bool:
            if text not in _TRUE + _FALSE:
                raise fail("true or false")
            return text in _TRUE
        try:
            return kind(value)
        except ValueError:
            raise fail(kind.__name__) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise fail(kind.__name__)
    return value


def apply(model: TransformerConfig, changes: dict[str, object], source: str) -> TransformerConfig:
    """``model`` with ``changes`` (``{key: value}``, see the module docstring) applied.

    ``source`` (``"--set"``, ``"--config FILE"``) starts every error message; an
    unknown key or a value of the wrong type raises ValueError naming the key, and
    the configs' own validation errors (e.g. ``top_k`` above ``num_experts``) pass through.
    """
    top, moe = {}, {}
    model_fields, moe_fields = _fields(TransformerConfig), _fields(MoEConfig)
    for key, value in changes.items():
        group, dot, name = key.partition(".")
        if dot and group == "moe" and name in moe_fields:
            moe[name] = _convert(key, value, moe_fields[name], source)
        elif not dot and key in model_fields and key != "moe":
            top[key] = _convert(key, value, model_fields[key], source)
        else:
            raise ValueError(
                f"{source}: unknown key {key!r}; keys are "
                f"{', '.join(k for k in model_fields if k != 'moe')} and "
                f"moe.{{{', '.join(moe_fields)}}}"
            )
    if "d_model" in top:
        moe.setdefault("d_model", top["d_model"])
    if moe.get("ep_capacity_factor") is not None:  # the two factors are exclusive
        moe.setdefault("ep_buffer_factor", None)
    return model.replace(**top, moe=model.moe.replace(**moe))


def model_dict(model: TransformerConfig) -> dict:
    """The JSON-able nested dict of every field of ``model`` (dtypes by name)."""
    as_json = lambda name, value: jnp.dtype(value).name if name in DTYPE_FIELDS else value
    moe = {
        f.name: as_json(f.name, getattr(model.moe, f.name)) for f in dataclasses.fields(MoEConfig)
    }
    top = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name != "moe"}
    return {**top, "moe": moe}
