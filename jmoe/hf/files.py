"""Reading and writing ``*.safetensors`` folders (single file or sharded with
``model.safetensors.index.json``) through the ``safetensors`` numpy API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as error:  # an optional dependency of `import jmoe`
        raise ImportError(
            "jmoe.hf needs the safetensors package: pip install safetensors"
        ) from error
    return safetensors


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's ``model.safetensors`` or of the shards its
    index names, by name."""
    safetensors = _safetensors()
    if (folder / INDEX).exists():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).exists():
        weight_map, files = None, [SINGLE]
    else:
        raise FileNotFoundError(f"{folder} has neither {SINGLE} nor {INDEX}")
    tensors = {}
    for file in files:
        with safetensors.safe_open(folder / file, framework="np") as f:
            for name in f.keys():
                if weight_map is not None and weight_map.get(name) != file:
                    raise ValueError(
                        f"{name}: stored in {file} but {INDEX} maps it to {weight_map.get(name)!r}"
                    )
                tensors[name] = f.get_tensor(name)
    if weight_map is not None and set(weight_map) != set(tensors):
        missing = sorted(set(weight_map) - set(tensors))
        raise ValueError(f"{missing[0]}: listed in {INDEX} but in none of its files")
    return tensors


def write_tensors(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None):
    """Writes ``tensors`` as ``model.safetensors``, or, when they exceed
    ``max_shard_bytes``, as ``model-0000i-of-0000n.safetensors`` shards
    (names in order, each shard up to that size unless one tensor is larger)
    plus the index."""
    safetensors = _safetensors()
    shards, size = [[]], 0
    for name in tensors:
        nbytes = tensors[name].nbytes
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        safetensors.numpy.save_file(tensors, folder / SINGLE, metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file({n: tensors[n] for n in names}, folder / file, metadata=meta)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.nbytes for t in tensors.values())
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
