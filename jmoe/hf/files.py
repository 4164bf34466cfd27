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


class Checkpoint:
    """The tensors of a folder's ``model.safetensors`` or of the shards its
    index names, read on demand: `shapes` comes from the file headers, `read`
    maps one tensor's file only while it reads a slice of it (so host memory
    holds the slice, not the file).
    """

    def __init__(self, folder: Path):
        safetensors = _safetensors()
        self.folder = Path(folder)
        if (self.folder / INDEX).exists():
            weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).exists():
            weight_map, files = None, [SINGLE]
        else:
            raise FileNotFoundError(f"{self.folder} has neither {SINGLE} nor {INDEX}")
        self.files: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            with safetensors.safe_open(self.folder / file, framework="np") as f:
                for name in f.keys():
                    if weight_map is not None and weight_map.get(name) != file:
                        raise ValueError(
                            f"{name}: stored in {file} but {INDEX} maps it to "
                            f"{weight_map.get(name)!r}"
                        )
                    self.files[name] = file
                    self.shapes[name] = tuple(f.get_slice(name).get_shape())
        if weight_map is not None and set(weight_map) != set(self.files):
            missing = sorted(set(weight_map) - set(self.files))
            raise ValueError(f"{missing[0]}: listed in {INDEX} but in none of its files")

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """``tensor[index]`` (a tuple of slices and ints) of tensor ``name``."""
        with _safetensors().safe_open(self.folder / self.files[name], framework="np") as f:
            part = f.get_slice(name)
            return np.array(part[index] if index else part[:])


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder (see `Checkpoint`), by name."""
    checkpoint = Checkpoint(folder)
    return {name: checkpoint.read(name) for name in checkpoint.shapes}


class ShardWriter:
    """Writes tensors as they come: each shard is written once it would exceed
    ``max_shard_bytes`` (None: no limit; a tensor larger than the limit gets a
    shard of its own), so host memory holds at most one shard. `close` names
    them ``model-0000i-of-0000n.safetensors`` with the index, or
    ``model.safetensors`` when there is one. ``write=False`` (processes other
    than 0) only counts.
    """

    def __init__(self, folder: Path, max_shard_bytes: int | None = None, *, write: bool = True):
        self.folder, self.max_shard_bytes, self.write = Path(folder), max_shard_bytes, write
        self.pending: dict[str, np.ndarray] = {}
        self.shards: list[list[str]] = []
        self.size = self.total = 0

    def _partial(self, i: int) -> Path:
        return self.folder / f"model-{i + 1:05d}.partial.safetensors"

    def _flush(self):
        if self.pending:
            if self.write:
                _safetensors().numpy.save_file(
                    self.pending, self._partial(len(self.shards)), metadata={"format": "pt"}
                )
            self.shards.append(list(self.pending))
            self.pending, self.size = {}, 0

    def add(self, tensors: dict[str, np.ndarray]):
        """Queues ``tensors`` (in order), writing the current shard first when full."""
        for name, tensor in tensors.items():
            limit = self.max_shard_bytes
            if limit is not None and self.size + tensor.nbytes > limit:
                self._flush()
            self.pending[name] = tensor
            self.size += tensor.nbytes
            self.total += tensor.nbytes

    def close(self):
        """Writes the last shard, renames the shards and writes the index."""
        self._flush()
        if not self.write:
            return
        count = len(self.shards)
        if count == 1:
            self._partial(0).rename(self.folder / SINGLE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self._partial(i).rename(self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        (self.folder / INDEX).write_text(
            json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2)
            + "\n"
        )


def write_tensors(folder: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int | None = None):
    """Writes ``tensors`` as ``model.safetensors``, or, when they exceed
    ``max_shard_bytes``, as shards plus the index (see `ShardWriter`)."""
    writer = ShardWriter(folder, max_shard_bytes)
    writer.add(tensors)
    writer.close()
