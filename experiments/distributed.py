"""Scale-out of a training run: host devices, JAX's distributed runtime and the mesh.

Command-line flags (`add_arguments`): ``--mesh DATAxEXPERT`` or ``--mesh
data=D,fsdp=F,expert=E``, ``--fsdp``, ``--host-devices N``,
``--coordinator HOST:PORT``, ``--num-processes N``, ``--process-id I`` and
``--coordinator-timeout S``. `start_runtime` applies the host devices and the
multi-process ones; it must run before jax creates its backends (the first
``jax.devices()`` or computation). `Placement` then puts a run's state and
batches on one device or on a mesh of named axes (``data``, ``fsdp``, ``expert``):

* expert weights ``[E, ...]`` (and their optimizer moments) are split over
  ``"expert"``; every leaf (expert weights along another dimension) is split
  FSDP-style over ``"fsdp"``, and over ``"data"`` too with ``--fsdp``; what
  does not divide is replicated (`jmoe.parallel.state_shardings`);
* the batch ``[batch, seq + 1]`` is split over all axes; each
  process reads only the rows of its own devices from the corpus;
* the train step is compiled under ``jax.set_mesh`` with those shardings, so
  `jmoe.DroplessMoE` runs expert-parallel; its metrics come back replicated.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe.parallel import DATA, EXPERT, FSDP, make_named_mesh, state_shardings
from jmoe.parallel.mesh import token_spec

MESH_AXES = (DATA, FSDP, EXPERT)  # --mesh NAME=SIZE names, in mesh order


def add_arguments(parser: argparse.ArgumentParser):
    """Adds the mesh and multi-process flags to ``parser``."""
    group = parser.add_argument_group("scale-out (docs/scale_out.md)")
    group.add_argument(
        "--mesh",
        type=parse_mesh,
        metavar="DATAxEXPERT|data=D,fsdp=F,expert=E",
        help="train on a device mesh: DATAxEXPERT (e.g. 2x4) or named axes, e.g. "
        "data=2,fsdp=2,expert=2 (tokens split over all axes, expert weights over expert, "
        "the rest of the state over fsdp; default: one device, no mesh)",
    )
    group.add_argument(
        "--fsdp",
        action="store_true",
        help="also split the state (parameters, optimizer moments) over the data axis",
    )
    group.add_argument(
        "--host-devices",
        type=int,
        metavar="N",
        help="XLA host (CPU) devices per process, set before jax starts its backends "
        "(default: XLA's, 1)",
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="process 0's address, the same for every process (multi-process runs)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="processes in the run (default: %(default)s)",
    )
    group.add_argument(
        "--process-id",
        type=int,
        default=0,
        metavar="I",
        help="this process's id, 0 .. N-1 (default: %(default)s)",
    )
    group.add_argument(
        "--coordinator-timeout",
        type=int,
        default=120,
        metavar="S",
        help="seconds to wait for the coordinator and the other processes (default: %(default)s)",
    )


def parse_mesh(text: str) -> dict[str, int]:
    """``"2x4"`` -> ``{"data": 2, "expert": 4}``; ``"fsdp=2,expert=8"`` -> ``{"fsdp": 2,
    "expert": 8}`` (axes in `MESH_AXES` order); ValueError naming ``--mesh`` otherwise."""
    error = ValueError(
        f"--mesh must be DATAxEXPERT (e.g. 2x4) or NAME=SIZE,... with names from "
        f"{MESH_AXES}, each at most once (e.g. data=2,fsdp=2,expert=2), sizes positive "
        f"ints, got {text!r}"
    )
    if "=" not in text:
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise error
        return {DATA: int(parts[0]), EXPERT: int(parts[1])}
    pairs = [part.partition("=") for part in text.split(",")]
    sizes = {name.strip(): size.strip() for name, _, size in pairs}
    if len(sizes) != len(pairs) or not all(
        name in MESH_AXES and size.isdigit() and int(size) >= 1 for name, size in sizes.items()
    ):
        raise error
    return {name: int(sizes[name]) for name in MESH_AXES if name in sizes}


def mesh_axes(mesh_shape: tuple[int, int] | dict[str, int]) -> dict[str, int]:
    """``(data, expert)`` or ``{name: size}`` (`parse_mesh`) -> ``{name: size}``."""
    if isinstance(mesh_shape, dict):
        return dict(mesh_shape)
    data, expert = mesh_shape
    return {DATA: data, EXPERT: expert}


def mesh_flag(axes: dict[str, int]) -> str:
    """``--mesh`` as a user writes it: ``--mesh 2x4`` or ``--mesh fsdp=2,expert=8``."""
    if tuple(axes) == (DATA, EXPERT):
        return f"--mesh {axes[DATA]}x{axes[EXPERT]}"
    return "--mesh " + ",".join(f"{name}={size}" for name, size in axes.items())


def start_runtime(args: argparse.Namespace):
    """Sets the host device count and joins the distributed runtime, per ``args``."""
    if args.host_devices is not None:
        set_host_devices(args.host_devices)
    if args.coordinator is not None or args.num_processes != 1:
        initialize(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout)


def set_host_devices(count: int):
    """Gives XLA's CPU backend ``count`` devices (per process).

    Works until jax creates its backends; after that only the count already in
    place is accepted (e.g. pytest's 8, see tests/conftest.py).
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"--host-devices must be a positive int, got {count!r}")
    from jax._src import xla_bridge  # the only public-equivalent check is private

    if xla_bridge.backends_are_initialized():
        have = len(jax.local_devices(backend="cpu"))
        if have != count:
            raise ValueError(
                f"--host-devices {count}: jax already started with {have} CPU "
                "devices; set it before any jax computation"
            )
        return
    jax.config.update("jax_num_cpu_devices", count)


def _split_address(address: str | None) -> tuple[str, int]:
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator must be HOST:PORT, got {address!r}")
    return host, int(port)


def wait_for_coordinator(address: str, timeout: float):
    """Raises ValueError naming ``--coordinator`` unless a TCP connection to it
    opens within ``timeout`` seconds (JAX's client would abort the process)."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"--coordinator {address} is unreachable after {timeout:g} s "
                    f"({error}); start process 0 first or fix the address"
                ) from None
            time.sleep(0.2)


def initialize(coordinator: str | None, num_processes: int, process_id: int, timeout: int):
    """``jax.distributed.initialize`` with gloo CPU collectives, after checking the flags.

    Process 0 hosts the coordinator at ``coordinator``; the others first wait
    (up to ``timeout`` s) until it accepts connections.
    """
    if coordinator is None:
        raise ValueError(f"--num-processes {num_processes} needs --coordinator HOST:PORT")
    host, _ = _split_address(coordinator)
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"--num-processes must be a positive int, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id!r}")
    if not isinstance(timeout, int) or timeout < 1:
        raise ValueError(f"--coordinator-timeout must be a positive int, got {timeout!r}")
    if process_id == 0:
        try:
            socket.getaddrinfo(host, None)
        except OSError as error:
            raise ValueError(
                f"--coordinator {coordinator}: cannot resolve {host!r} ({error})"
            ) from None
    else:
        wait_for_coordinator(coordinator, timeout)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout,
    )
    sys.excepthook = _exit_at_once


def _exit_at_once(kind, error, traceback):
    """Prints an uncaught exception and exits with status 1 at once: the normal exit
    would wait at jax's shutdown barrier for the other processes, which are stuck in a
    collective with this one, so the run would hang instead of failing (`launch_local`
    then stops the others)."""
    sys.__excepthook__(kind, error, traceback)
    sys.stderr.flush()
    os._exit(1)


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str):
    """Waits for every process (no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Placement:
    """Where a run's state and batches live: one device, or a mesh of named axes.

    Args:
      mesh_shape: ``(data, expert)`` or ``{name: size}`` (`parse_mesh`), or
        None for the default device.
      num_experts: experts per MoE layer, or None for a model without any.
      batch_size: sequences per step (training and validation).
      fsdp: also split the state over ``"data"`` (it is always split over ``"fsdp"``).
    """

    def __init__(
        self,
        mesh_shape: tuple[int, int] | dict[str, int] | None,
        *,
        num_experts: int | None,
        batch_size: int,
        fsdp: bool = False,
    ):
        self.mesh = (
            None
            if mesh_shape is None
            else _training_mesh(mesh_axes(mesh_shape), num_experts, batch_size)
        )
        self.fsdp = fsdp
        self.state_sharding = None
        if self.mesh is not None:
            self.batch_sharding = NamedSharding(self.mesh, token_spec(self.mesh))
            self.replicated = NamedSharding(self.mesh, P())

    def context(self):
        """``jax.set_mesh(mesh)`` (tracing under it makes the dMoE expert-parallel)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def init_state(self, make: Callable[[], object]):
        """``(graphdef, state)`` of ``make()`` (e.g. ``(model, optimizer)``), the state
        created directly in its shardings on a mesh (every process computes the same)."""
        if self.mesh is None:
            return nnx.split(make())
        graphdef, abstract = nnx.split(nnx.eval_shape(make))
        self.state_sharding = state_shardings(abstract, self.mesh, fsdp=self.fsdp)
        with self.context():
            state = jax.jit(lambda: nnx.split(make())[1], out_shardings=self.state_sharding)()
        return graphdef, state

    def jit_step(self, fn: Callable, **kw):
        """``jax.jit(fn)`` of ``fn(state, batch) -> (state, metrics)``; on a mesh the
        state keeps its shardings and the metrics are replicated."""
        if self.mesh is None:
            return jax.jit(fn, **kw)
        return jax.jit(
            fn,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self.replicated),
            **kw,
        )

    def jit_eval(self, fn: Callable):
        """``jax.jit(fn)`` of ``fn(state, batch) -> scalar`` (replicated on a mesh)."""
        if self.mesh is None:
            return jax.jit(fn)
        return jax.jit(
            fn,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=self.replicated,
        )

    def batch(self, read: Callable[[slice], np.ndarray], shape: tuple[int, int]):
        """The global batch ``[batch, seq + 1]``; ``read(rows)`` returns those rows.

        On a mesh every process reads only the rows of its own devices.
        """
        if self.mesh is None:
            return read(slice(None))
        return jax.make_array_from_callback(
            shape, self.batch_sharding, lambda index: read(index[0])
        )


def _training_mesh(axes: dict[str, int], num_experts: int | None, batch_size: int):
    """The mesh of ``axes``, after checking it against devices, experts and batch."""
    flag, count = mesh_flag(axes), math.prod(axes.values())
    devices, processes = jax.device_count(), jax.process_count()
    if count > devices or (processes > 1 and count != devices):
        raise ValueError(
            f"{flag} needs {count} devices, but {processes} process(es) have "
            f"{devices}{' (a multi-process mesh must use all of them)' if processes > 1 else ''}; "
            "on CPU set --host-devices"
        )
    expert = axes.get(EXPERT, 1)
    if num_experts is not None and num_experts % expert:
        raise ValueError(
            f"{flag}: the {num_experts} experts are not divisible by the expert axis {expert}"
        )
    if batch_size % count:
        raise ValueError(
            f"--batch-size {batch_size} is not divisible by {' x '.join(axes)} = {count} ({flag})"
        )
    return make_named_mesh(axes)
