"""A run's metrics: ``metrics.jsonl`` (one JSON record a line) and, optionally,
TensorBoard event files (tensorboardX) under ``tensorboard/``.

Records are dicts with ``kind`` (``"train"`` or ``"val"``) and ``step``; every other
number in a record becomes the TensorBoard scalar ``<kind>/<key>`` at that step.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Logbook:
    """Appends records to ``out/metrics.jsonl`` (and TensorBoard with ``tensorboard``).

    Opening keeps the records up to ``resume_step`` (0: a fresh run keeps none)
    and purges later TensorBoard events, so a resumed run logs each step once.
    """

    def __init__(self, out: str | Path, resume_step: int, *, tensorboard: bool):
        out = Path(out)
        path = out / "metrics.jsonl"
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if path.exists() else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(path, "a")
        self.writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # only runs that ask for it need it

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and math.isfinite(value):
                self.writer.add_scalar(f"{record['kind']}/{key}", value, record["step"])
        self.writer.flush()

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()
