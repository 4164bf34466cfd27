"""Start a multi-process JAX run on this machine, as a multi-host run would start.

    python -m experiments.launch_local --processes 2 -- \\
        experiments.train --mesh 2x4 --host-devices 4

Runs ``python -m <module> <args> --coordinator 127.0.0.1:<free port>
--num-processes N --process-id I`` for ``I = 0 .. N-1``, prints their output
line by line prefixed with ``[I]``, and exits with the first non-zero exit
status (terminating the other processes), or 0 when all succeed.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _forward(index: int, stream):
    for line in stream:
        sys.stdout.write(f"[{index}] {line}")
        sys.stdout.flush()


def launch(processes: int, module: str, args: list[str], *, poll_s: float = 0.2) -> int:
    """Runs the ``processes`` copies of ``module``; returns the exit status (see module doc)."""
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"--processes must be a positive int, got {processes!r}")
    address = f"127.0.0.1:{free_port()}"
    children, threads = [], []
    for index in range(processes):
        command = [
            sys.executable,
            "-u",
            "-m",
            module,
            *args,
            "--coordinator",
            address,
            "--num-processes",
            str(processes),
            "--process-id",
            str(index),
        ]
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        thread = threading.Thread(target=_forward, args=(index, child.stdout), daemon=True)
        thread.start()
        children.append(child)
        threads.append(thread)
    try:
        while True:
            codes = [child.poll() for child in children]  # None while running
            status = next((code for code in codes if code), 0)
            if status or all(code is not None for code in codes):
                break
            time.sleep(poll_s)
    finally:
        for index, child in enumerate(children):
            if child.poll() is None:
                print(f"[launch_local] terminating process {index}", flush=True)
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for thread in threads:
            thread.join(timeout=5)
    if status:
        print(f"[launch_local] a process failed with exit status {status}", flush=True)
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.launch_local",
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s --processes N -- MODULE [ARGS ...]",
    )
    parser.add_argument("--processes", type=int, required=True, help="number of processes")
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- MODULE [ARGS ...], e.g. -- experiments.train --mesh 2x4",
    )
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the module to run after --, e.g. -- experiments.train")
    return launch(args.processes, command[0], command[1:])


if __name__ == "__main__":
    sys.exit(main())
