"""Running `benchmarks.gpu_check`'s steps: one subprocess each, a hard timeout, a report
refreshed as rows arrive (standard library only: nothing here can be taken down by jax).

`run_step` starts a step's command in its own process group, copies its output
line by line to stdout and to ``log`` (unbuffered), calls ``progress`` whenever the
step's rows change, and ends it at its timeout: SIGINT first (pytest then writes its
junit XML), SIGKILL after a grace period. A step that dies (abort, segfault) while
measuring a row gets that row recorded as failed and, if it is ``restartable`` and time
is left, is started again: it skips every row already started (`benchmarks.gpu_rows`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from benchmarks.gpu_rows import ATTEMPT_ENV, ROWS_ENV, STEP_ENV, read_rows

MAX_ATTEMPTS = 3
POLL_SECONDS = 0.25


@dataclasses.dataclass
class Step:
    """A step of the check.

    Attributes:
      name: its key in the report's ``steps``.
      what: one line for ``--plan``.
      command: its argv.
      estimate_s: planned seconds on one H100 / H200 (its weight in the budget).
      kernels: Pallas (Mosaic / Triton) kernels it compiles, for ``--plan``.
      xla_programs: XLA programs it compiles besides, for ``--plan``.
      env: extra environment variables.
      rows: reads its rows (default: its rows file).
      stop: given its rows, True once it has measured enough (then it is stopped: ok).
      restartable: started again after a crash, skipping the rows it already started.
      ok_returncodes: exit codes of a run that went to its end.
    """

    name: str
    what: str
    command: list[str]
    estimate_s: float
    kernels: int = 0
    xla_programs: int = 0
    env: dict = dataclasses.field(default_factory=dict)
    rows: Callable[[], list[dict]] | None = None
    stop: Callable[[list[dict]], bool] | None = None
    restartable: bool = True
    ok_returncodes: tuple[int, ...] = (0,)


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _in_flight(rows: list[dict]) -> str | None:
    """The row a step had started but not finished, if any."""
    started = [row["start"] for row in rows if "start" in row]
    finished = {row.get("key") for row in rows}
    pending = [key for key in started if key not in finished]
    return pending[-1] if pending else None


def _append(path: pathlib.Path, row: dict) -> None:
    """Appends ``row`` on a line of its own (after a line a kill may have cut short)."""
    text = path.read_text() if path.exists() else ""
    cut = bool(text) and not text.endswith("\n")
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps(row) + "\n")


def _copy_output(stream, log, tail: collections.deque) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()
        if line.strip():
            tail.append(line.strip())


def _stop(process: subprocess.Popen, grace: float) -> None:
    """SIGINT to the step's process group, SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _attempt(step, env, timeout, log, rows_of, progress) -> tuple[str, int | None, str]:
    """One run of ``step``: ``("done" | "stopped" | "timeout", returncode, last line)``."""
    process = subprocess.Popen(
        step.command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    tail = collections.deque(maxlen=1)
    reader = threading.Thread(target=_copy_output, args=(process.stdout, log, tail), daemon=True)
    reader.start()
    deadline, seen = time.monotonic() + timeout, None
    outcome = "done"
    while process.poll() is None:
        time.sleep(POLL_SECONDS)
        rows = rows_of()
        if len(rows) != seen:
            seen = len(rows)
            progress()
            if step.stop is not None and step.stop(rows):
                outcome = "stopped"
                break
        if time.monotonic() >= deadline:
            outcome = "timeout"
            break
    if process.poll() is None:
        _stop(process, grace=min(10.0, max(1.0, timeout / 10)))
    reader.join(timeout=5)
    return outcome, process.returncode, tail[0][-300:] if tail else ""


def run_step(
    step: Step, timeout: float, rows_path, log_path, progress: Callable[[], None], why_cut: str
) -> dict:
    """Runs ``step`` for at most ``timeout`` seconds (plus the SIGINT grace); returns its
    ``{"status", "seconds", "reason", "timeout_s", "attempts"}``. ``why_cut`` says what
    a timeout means here (its share of the budget, or the budget's end)."""
    rows_of = step.rows or (lambda: read_rows(rows_path))
    start = time.monotonic()
    crashes = []
    with open(log_path, "a") as log:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            env = {
                **os.environ,
                **step.env,
                "PYTHONUNBUFFERED": "1",
                ROWS_ENV: str(rows_path),
                STEP_ENV: step.name,
                ATTEMPT_ENV: str(attempt),
            }
            left = timeout - (time.monotonic() - start)
            outcome, returncode, last = _attempt(step, env, left, log, rows_of, progress)
            if outcome != "done" or returncode in step.ok_returncodes:
                break
            died = _in_flight(rows_of())
            where = f" during {died}" if died else f": {last}"
            crashes.append(_signal_name(returncode) + where)
            if died is not None:  # the row in flight failed; the rest may still run
                _append(rows_path, {"key": died, "status": "failed", "reason": crashes[-1]})
            left = timeout - (time.monotonic() - start)
            if not (step.restartable and died is not None and left > 1):
                break
            print(f"[{step.name}] {crashes[-1]}; starting it again", flush=True)
    if outcome == "timeout" and (cut := _in_flight(rows_of())) is not None:
        _append(rows_path, {"key": cut, "status": "timeout", "reason": why_cut})
    progress()
    seconds = round(time.monotonic() - start, 1)
    result = {"seconds": seconds, "timeout_s": round(timeout, 1), "attempts": attempt}
    if outcome == "timeout":
        reason = f"cut after {seconds:.0f} s: {why_cut}"
        if crashes:
            reason += f" (earlier: {'; '.join(crashes)})"
        return {"status": "timeout", "reason": reason, **result}
    if crashes:
        rerun = "; started again" if attempt > len(crashes) else ""
        return {"status": "failed", "reason": "; ".join(crashes) + rerun, **result}
    if outcome == "stopped":
        return {"status": "ok", "reason": "stopped once it had measured enough", **result}
    return {"status": "ok", "reason": "", **result}
