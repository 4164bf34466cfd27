"""Running a module in 2 JAX processes of 4 host devices each, for the multi-process
tests: ``python -m experiments.launch_local --processes 2 -- MODULE ARGS --host-devices 4``
with ``tests/`` on ``PYTHONPATH``."""

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launch_two_processes(module: str, *args: str, timeout: int = 600) -> str:
    """The combined output (each line prefixed ``[process]``) of a successful run.

    The launcher runs in its own session, so a timeout stops it and both workers.
    ``XLA_FLAGS=""``: ``--host-devices``, not conftest's 8 devices, sets each
    process's 4."""
    command = [sys.executable, "-m", "experiments.launch_local", "--processes", "2", "--"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "XLA_FLAGS": ""}
    launcher = subprocess.Popen(
        [*command, module, *args, "--host-devices", "4"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, _ = launcher.communicate()
    assert launcher.returncode == 0, stdout[-6000:]
    return stdout
