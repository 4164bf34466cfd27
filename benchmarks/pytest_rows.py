"""pytest plugin of `benchmarks.gpu_check`'s ``tests`` step (``-p benchmarks.pytest_rows``).

* Each test's outcome is appended to ``$JMOE_GPU_CHECK_ROWS`` the moment it is known
  (``{"key": "test/<nodeid>", "status": "passed" | "failed" | "error" | "skipped",
  "seconds", "reason"}``), by the controlling process (with pytest-xdist, the workers'
  reports arrive there), so a step cut short still has every finished test.
* Without the pytest-timeout plugin, ``JMOE_GPU_TEST_TIMEOUT`` seconds bound each test:
  `faulthandler` dumps the stacks and ends the process (the way pytest-timeout's
  ``thread`` method does, and the only one that stops a hung CUDA call); under xdist
  the controller records that test as failed and starts a new worker.
"""

from __future__ import annotations

import faulthandler
import os

import pytest

from benchmarks.gpu_rows import RowWriter

TIMEOUT_ENV = "JMOE_GPU_TEST_TIMEOUT"
# The stderr of before pytest's capture (``-p`` plugins are imported before it starts):
# a hung test's stacks must outlive the capture file, which dies with the process.
_STDERR = os.fdopen(os.dup(2), "w")


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config):
    if not _is_worker(config):
        config.pluginmanager.register(_Recorder(RowWriter()), "jmoe_gpu_rows")
    timeout = float(os.environ.get(TIMEOUT_ENV, 0))
    if timeout and not config.pluginmanager.hasplugin("timeout"):
        config.pluginmanager.register(_Deadline(timeout), "jmoe_gpu_deadline")


class _Recorder:
    def __init__(self, writer: RowWriter):
        self.writer = writer

    def pytest_runtest_logreport(self, report):
        if report.failed:  # "???": a test whose xdist worker died
            status = "failed" if report.when in ("call", "???") else "error"
            reason = str(report.longrepr).strip().splitlines()[-1][:300]
        elif report.when == "call" or (report.skipped and report.when == "setup"):
            status = report.outcome
            skipped = report.skipped and isinstance(report.longrepr, tuple)
            reason = str(report.longrepr[2])[:300] if skipped else ""
        else:
            return
        key = f"test/{report.nodeid}"
        self.writer.row(key, status, seconds=round(report.duration, 2), reason=reason)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item):
        faulthandler.dump_traceback_later(self.seconds, exit=True, file=_STDERR)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
