"""The child side of `benchmarks.gpu_check`'s steps: one JSON line per event, flushed at once.

A step's process appends to the file named by ``JMOE_GPU_CHECK_ROWS``:

* ``{"start": key}`` before it measures a row (so a crash names the row in flight);
* ``{"key": key, "status": "ok" | "failed" | "skipped", ...}`` when the row is done;
* ``{"env": {...}}`` once: the platform, device and jax version the step ran on.

Keys are ``"shape/impl/op"`` (kernels), ``"test/<nodeid>"`` (pytest). A step started
again after a crash reads the file and skips every key already started (`RowWriter.done`).

Test-only fault injection: ``JMOE_GPU_CHECK_FAULT="step:mode@n,..."`` makes step ``step``
``hang`` (sleep forever, ignoring SIGINT as a stuck CUDA call would) or ``abort``
(`os.abort`) when it starts its ``n``-th row (0: the first), on its first attempt only
(``JMOE_GPU_CHECK_ATTEMPT`` is 1). The step runner's tests use it.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time

ROWS_ENV = "JMOE_GPU_CHECK_ROWS"
STEP_ENV = "JMOE_GPU_CHECK_STEP"
ATTEMPT_ENV = "JMOE_GPU_CHECK_ATTEMPT"
FAULT_ENV = "JMOE_GPU_CHECK_FAULT"


def read_rows(path: pathlib.Path) -> list[dict]:
    """The complete lines of a rows file (a line cut by a kill is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _fault(step: str) -> tuple[str, int] | None:
    """``(mode, row index)`` of this step's injected fault, if any (first attempt only)."""
    if os.environ.get(ATTEMPT_ENV, "1") != "1":
        return None
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        name, _, spec = item.partition(":")
        mode, _, index = spec.partition("@")
        if name == step:
            if mode not in ("hang", "abort"):
                raise ValueError(f"{FAULT_ENV}: mode must be hang or abort, got {item!r}")
            return mode, int(index or 0)
    return None


class RowWriter:
    """Appends rows to ``$JMOE_GPU_CHECK_ROWS`` (or only prints them when unset)."""

    def __init__(self, path: str | None = None, step: str | None = None):
        path = path or os.environ.get(ROWS_ENV)
        self.path = pathlib.Path(path) if path else None
        self.step = step or os.environ.get(STEP_ENV, "")
        rows = read_rows(self.path) if self.path else []
        self.done = {row.get("key") or row.get("start") for row in rows} - {None}
        self.started = 0
        self.fault = _fault(self.step)

    def _write(self, record: dict) -> None:
        line = json.dumps(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())

    def env(self, **fields) -> None:
        """The platform / device / versions this step ran on."""
        self._write({"env": fields})

    def start(self, key: str) -> bool:
        """Marks ``key`` in flight; False if an earlier attempt already started it."""
        if key in self.done:
            return False
        self._write({"start": key})
        if self.fault is not None and self.started == self.fault[1]:
            mode = self.fault[0]
            print(f"injected fault: {mode} at {key}", flush=True)
            if mode == "abort":
                os.abort()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            while True:
                time.sleep(60)
        self.started += 1
        return True

    def row(self, key: str, status: str, **fields) -> dict:
        """Records a finished row and prints it."""
        record = {"key": key, "status": status, **fields}
        self._write(record)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}
        print(f"{status:>7} {key} {json.dumps(shown)[:300]}", flush=True)
        return record
