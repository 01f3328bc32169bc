"""Experiment trackers (`--report-to wandb,tensorboard,trackio,swanlab`): the metrics.jsonl lines,
the run's config and the sampled completions, sent where the user already looks.

Choices, and why:
1. Each tracker is an optional extra (`pip install "grpo-mlx[wandb]"`), imported only when named;
   `check_trackers` imports them before the run directory is made or the model loads, so a missing
   package is one line at start-up, not a traceback after the first step.
2. Every tracker gets exactly what metrics.jsonl gets, under the same names (TRL's), at the
   step in the line: `runner` calls `Trackers.log` right after `MetricsLogger.log`.
3. Offline unless asked otherwise: wandb and swanlab run in their offline mode unless WANDB_MODE /
   SWANLAB_MODE say otherwise (`wandb sync` / `swanlab sync` upload later); trackio keeps its
   local SQLite store (TRACKIO_DIR) unless TRACKIO_SPACE_ID names a Space; tensorboard writes event
   files. Their files go in the run directory (wandb/, swanlog/, tensorboard/) unless WANDB_DIR /
   SWANLAB_LOG_DIR say otherwise; trackio's store is shared by all runs, as trackio intends.
4. Sampled completions go as a table where the tracker has one (wandb.Table, trackio.Table), as
   swanlab.Text items in swanlab, and as a text summary (a table of strings) in tensorboard.
5. Only rank 0 reports (runner builds no Trackers elsewhere). Each is finished on every exit:
   a failed run is marked failed where the tracker can say so.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..core.config import TRACKER_NAMES
from ..core.errors import UserError
from .display import is_number

# The module each tracker needs; the pip extra carries the tracker's own name.
TRACKER_MODULES = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "swanlab": "swanlab"}
assert set(TRACKER_MODULES) == set(TRACKER_NAMES)
PROJECT = "grpo-mlx"  # the project name where the tracker's own variable (WANDB_PROJECT, ...) is unset
SAMPLE_COLUMNS = ["step", "prompt", "answer", "completion", "reward"]
# How a run ends (swanlab's words), as a process exit status for wandb: an interrupted run is resumable.
EXIT_CODES = {"success": 0, "aborted": 130, "crashed": 1}


def check_trackers(names) -> None:
    """Import each named tracker's package, or stop with the pip command that installs it."""
    for name in names or []:
        try:
            importlib.import_module(TRACKER_MODULES[name])
        except ImportError as e:
            raise UserError(f"--report-to {name} needs the {TRACKER_MODULES[name]} package ({e}): "
                            f'pip install "grpo-mlx[{name}]"') from e


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The metric dict less `step`, numbers only (as floats)."""
    return {k: float(v) for k, v in metrics.items() if k != "step" and is_number(v)}


def sample_rows(sample: dict) -> list[list]:
    """One row per completion of a sample: SAMPLE_COLUMNS. A multi-turn completion is its trajectory."""
    from .dashboard import trajectory_text

    completions = sample.get("completions") or []
    if sample.get("trajectories"):
        completions = [trajectory_text(messages) for messages in sample["trajectories"]]
    answer = "" if sample.get("answer") is None else str(sample["answer"])
    return [[int(sample["step"]), str(sample.get("prompt", "")), answer, text, float(reward)]
            for text, reward in zip(completions, sample.get("rewards") or [])]


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        mode = None if os.environ.get("WANDB_MODE") else "offline"  # None: wandb reads WANDB_MODE
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name, config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), mode=mode, job_type="train",
                              settings=wandb.Settings(console="off", silent=True))  # the dashboard owns the terminal

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def log_sample(self, step: int, rows: list[list]) -> None:
        self.run.log({"completions": self.wandb.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)

    def close(self, outcome: str) -> None:
        self.run.finish(exit_code=EXIT_CODES[outcome])


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard, written with tensorboard's own writer and protos (no TensorFlow)."""

    def __init__(self, run_dir: Path, config: dict):
        import yaml
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.event_pb2, self.summary_pb2, self.text_pb = event_pb2, summary_pb2, text_pb
        self.writer = EventFileWriter(str(run_dir / "tensorboard"))
        config_text = "```\n" + yaml.safe_dump(config, sort_keys=False) + "```"
        self._write(0, text_pb("config", config_text))

    def _write(self, step: int, summary) -> None:
        import time

        self.writer.add_event(self.event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # a killed run keeps every step it logged

    def log(self, step: int, values: dict) -> None:
        summary = self.summary_pb2.Summary(value=[self.summary_pb2.Summary.Value(tag=k, simple_value=v)
                                                  for k, v in values.items()])
        self._write(step, summary)

    def log_sample(self, step: int, rows: list[list]) -> None:
        import numpy as np

        table = np.array([SAMPLE_COLUMNS] + [[str(cell) for cell in row] for row in rows], dtype=object)
        self._write(step, self.text_pb("completions", table))

    def close(self, outcome: str) -> None:
        self.writer.close()


class TrackioTracker:
    def __init__(self, run_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_dir.name, config=config,
                                space_id=os.environ.get("TRACKIO_SPACE_ID"), auto_log_cpu=False, auto_log_gpu=False,
                                embed=False)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def log_sample(self, step: int, rows: list[list]) -> None:
        self.run.log({"completions": self.trackio.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)

    def close(self, outcome: str) -> None:
        self.run.finish()


class SwanlabTracker:
    def __init__(self, run_dir: Path, config: dict):
        import swanlab

        self.swanlab = swanlab
        mode = None if os.environ.get("SWANLAB_MODE") else "offline"  # None: swanlab reads SWANLAB_MODE
        log_dir = None if os.environ.get("SWANLAB_LOG_DIR") or os.environ.get("SWANLAB_LOGDIR") else str(run_dir / "swanlog")
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT", PROJECT), name=run_dir.name, config=config,
                                mode=mode, log_dir=log_dir)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def log_sample(self, step: int, rows: list[list]) -> None:
        # swanlab has no table: one Text per completion, its reward in the caption.
        texts = [self.swanlab.Text(f"prompt: {prompt}\n\ncompletion: {completion}", caption=f"reward {reward:g}")
                 for _, prompt, _, completion, reward in rows]
        self.run.log({"completions": texts}, step=step)

    def close(self, outcome: str) -> None:
        self.run.finish(state=outcome)


TRACKER_CLASSES = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker, "trackio": TrackioTracker,
                   "swanlab": SwanlabTracker}


class Trackers:
    """The trackers of `--report-to`, fed together. An empty list reports nowhere."""

    def __init__(self, names, run_dir, config: dict):
        self.trackers = []
        for name in names or []:
            try:
                self.trackers.append(TRACKER_CLASSES[name](Path(run_dir), config))
            except Exception as e:
                self.close("crashed")  # those already started are finished, not left running
                detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"--report-to {name} could not start ({detail}); drop it from --report-to, "
                                "or see the tracker's own settings (its *_MODE variable: offline needs no account)") from e

    def log(self, metrics: dict) -> None:
        values = scalar_metrics(metrics)
        for tracker in self.trackers:
            tracker.log(int(metrics["step"]), values)

    def log_sample(self, sample: dict) -> None:
        rows = sample_rows(sample)
        if rows:
            for tracker in self.trackers:
                tracker.log_sample(int(sample["step"]), rows)

    def close(self, outcome: str = "success") -> None:
        """Finish every tracker with the run's outcome (EXIT_CODES); one failing to finish does not keep the others from it."""
        errors = []
        for tracker in self.trackers:
            try:
                tracker.close(outcome)
            except Exception as e:  # a tracker's own shutdown problem
                errors.append(f"{type(tracker).__name__}: {e}")
        self.trackers = []
        if errors and outcome == "success":
            raise UserError(f"could not finish the experiment trackers ({'; '.join(errors)}); metrics.jsonl is complete")
