"""The CUDA tools Mosaic GPU needs, found before anything compiles (standard library only).

Mosaic GPU compiles with ``ptxas`` and disassembles (the SASS lint) with ``nvdisasm``,
both under the CUDA root jax derives (``CUDA_ROOT``, else the pip ``nvidia`` CUDA
packages; ``jax._src.lib.cuda_path``, exported as ``MOSAIC_GPU_CUDA_ROOT``). `find_toolchain`
looks in ``$CUDA_ROOT``, ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``, the pip
``nvidia`` packages and ``PATH``; when the two tools live in different places (the pip
packages split them) it links both into one root. `cuda_environment` is what the steps get:
``CUDA_ROOT`` set to that root (jax then points Mosaic at it) and its ``bin`` first on
``PATH``. A missing tool is an infrastructure failure, recorded as such in the report.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

TOOLS = ("ptxas", "nvdisasm")


def _candidate_roots() -> list[pathlib.Path]:
    roots = [os.environ.get(name) for name in ("CUDA_ROOT", "CUDA_HOME", "CUDA_PATH")]
    roots.append("/usr/local/cuda")
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        roots += sorted(str(path.parent) for path in pathlib.Path(base).glob("*/bin"))
    return [pathlib.Path(root) for root in roots if root]


def _version(path: pathlib.Path) -> str:
    try:
        run = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    found = re.search(r"release (\S+), (V\S+)", run.stdout)
    return f"{found.group(1).rstrip(',')} ({found.group(2)})" if found else run.stdout.strip()[-80:]


def find_tool(name: str) -> pathlib.Path | None:
    """The first ``bin/<name>`` of the candidate roots, else ``PATH``'s."""
    for root in _candidate_roots():
        if (root / "bin" / name).is_file():
            return root / "bin" / name
    found = shutil.which(name)
    return pathlib.Path(found) if found else None


def find_toolchain() -> dict:
    """``{"root", "ptxas": {"path", "version"}, "nvdisasm": {...}, "missing": [...]}``;
    ``root`` is one directory whose ``bin`` holds every tool found (None if none)."""
    paths = {name: find_tool(name) for name in TOOLS}
    found = {name: path for name, path in paths.items() if path is not None}
    parents = {path.parent.parent for path in found.values()}
    if len(parents) == 1:
        root = parents.pop()
    elif found:  # split across packages: one root of links (the ptxas root's nvvm too)
        root = pathlib.Path(tempfile.mkdtemp(prefix="jmoe_cuda_root_"))
        (root / "bin").mkdir()
        for name, path in found.items():
            (root / "bin" / name).symlink_to(path)
        if "ptxas" in found and (found["ptxas"].parent.parent / "nvvm").exists():
            (root / "nvvm").symlink_to(found["ptxas"].parent.parent / "nvvm")
    else:
        root = None
    report = {"root": str(root) if root else None, "missing": sorted(set(TOOLS) - set(found))}
    for name in TOOLS:
        path = paths[name]
        report[name] = {"path": str(path), "version": _version(path)} if path else None
    return report


def cuda_environment(toolchain: dict) -> dict:
    """Environment variables that point jax (and so Mosaic GPU) at ``toolchain``'s root."""
    root = toolchain["root"]
    if root is None:
        return {}
    return {
        "CUDA_ROOT": root,
        "PATH": os.pathsep.join([f"{root}/bin", os.environ.get("PATH", "")]),
    }


def gpu_name() -> str | None:
    """The first GPU's name from ``nvidia-smi`` (None without one)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        run = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = run.stdout.strip().splitlines()[0] if run.stdout.strip() else ""
    return line.split(",")[0].strip() or None
