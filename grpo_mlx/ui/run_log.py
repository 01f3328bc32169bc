"""A run's logs on disk: metrics.jsonl (one line per step) and completions.jsonl (samples).

1. `MetricsLogger` appends each dict as one JSON line, flushed and fsynced, so a
   run killed at any moment leaves every completed step readable.
2. `read_metrics` reads either file back, skipping the half-written last line a
   killed run may leave.
3. `keep_metrics_until` cuts metrics.jsonl back to a resumed checkpoint's step,
   so the steps redone after a resume are not logged twice.

The trainer writes these files, `report` reads them; neither needs the dashboard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.atomic import atomic_write
from ..core.errors import UserError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "completions.jsonl"


def _jsonable(value):
    # numpy / mlx scalars carry .item(); anything else is kept readable as text.
    return value.item() if hasattr(value, "item") else str(value)


class MetricsLogger:
    """Appends metric and sample dicts to RUN_DIR/metrics.jsonl and completions.jsonl.

    Every line is flushed and fsynced before `log` returns: a SIGKILL or power
    loss costs at most the line being written. NaN and Infinity are written as
    Python's json writes them (read back exactly by `read_metrics`).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = self._open(self.run_dir / METRICS_FILE)
        self._samples_file = None  # opened on the first sample: most short runs log none

    @staticmethod
    def _open(path: Path):
        # A run killed mid-line leaves a partial last line; appending after it would
        # glue the next good line onto it, so cut it off before resuming.
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        return open(path, "a", encoding="utf-8")

    @staticmethod
    def _write(f, record: dict) -> None:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def log(self, metrics: dict) -> None:
        self._write(self._metrics_file, metrics)

    def log_sample(self, sample: dict) -> None:
        if self._samples_file is None:
            self._samples_file = self._open(self.run_dir / SAMPLES_FILE)
        self._write(self._samples_file, sample)

    def close(self) -> None:
        for f in (self._metrics_file, self._samples_file):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_metrics(path) -> list[dict]:
    """The records of a JSONL file (metrics.jsonl, completions.jsonl, or a run directory).

    Lines that do not parse as a JSON object are skipped: the only way to get
    one is a run killed while writing its last line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise UserError(f"no metrics file at {path}: point at a run directory or its {METRICS_FILE}")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def keep_metrics_until(run_dir, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint: they will be redone."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return

    kept = [m for m in read_metrics(path) if m.get("step", 0) <= step]
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(m) + "\n" for m in kept)))
