"""The run directory: check --output against --resume/--overwrite, create and lock it,
clear an old run once the new one has loaded, and write config.yaml.

It carries a marker file (RUN_MARKER), written when `train` creates the run, and a lock
file (RUN_LOCK) that a live run holds with flock: `--overwrite` removes only a marked
directory holding nothing but RUN_FILES, and never one that a live run holds.

Nothing the user keeps is removed: only a directory marked as a grpo-mlx run
(RUN_MARKER), holding only what a run writes, is ever emptied.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

from ..core.atomic import atomic_write, tmp_name
from ..core.config import ONE_SHOT_ACTIONS, TrainConfig, config_to_dict
from ..core.errors import UserError
from ..model.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .checkpoint import BEST, CHECKPOINT_FILES, CHECKPOINTS, checkpoint_dirs

RUN_MARKER = ".grpo-mlx-run"
RUN_LOCK = ".grpo-mlx-lock"
# Folders the experiment trackers write into (trackers.py, --report-to).
TRACKER_DIRS = ("wandb", "swanlog", "tensorboard")
# Everything `train` writes at the top of a run directory, and so all that `--overwrite` removes (the marker
# and the lock stay): this module writes the marker and config.yaml, ui/run_log.py the two .jsonl files,
# ui/trackers.py TRACKER_DIRS, checkpoint.py the rest.
RUN_FILES = (RUN_MARKER, RUN_LOCK, "config.yaml", "metrics.jsonl", "completions.jsonl", ADAPTER_WEIGHTS, ADAPTER_CONFIG, CHECKPOINTS,
             BEST, *TRACKER_DIRS)
SYSTEM_FILES = (".DS_Store",)  # Finder writes it into any folder it shows: neither the user's nor the run's


def prepare_run_dir(config: TrainConfig):
    """Check --output, create and lock it: (run_dir, lock). Nothing is removed here.

    A run directory is one `train` created: it holds RUN_MARKER. A new run needs a
    new or empty directory; --resume a run with a checkpoint; --overwrite a marked
    run holding only what a run writes, which `clear_old_run` empties once the new
    run has loaded. A live run's lock refuses every second `train` on it.
    """
    run_dir = Path(config.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {run_dir} is a file, not a directory: choose another --output")
    lock = RunLock(run_dir)
    try:
        if lock.path.exists() and not lock.acquire():
            raise UserError(
                f"{run_dir} is in use by a running grpo-mlx train (pid {lock.holder()}): "
                "wait for it to end or stop it, or choose another --output"
            )
        check_run_dir(config, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume and not (run_dir / RUN_MARKER).exists():  # a new run in a new or empty directory
            (run_dir / RUN_MARKER).write_text("written by grpo-mlx train: --overwrite may replace this run\n")
        if not lock.acquire():  # another train created it in the meantime
            raise UserError(f"{run_dir} is in use by a running grpo-mlx train (pid {lock.holder()}): choose another --output")
    except OSError as e:
        lock.release()
        raise UserError(f"cannot prepare run directory {run_dir} ({e.strerror or e}): choose another --output")
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def check_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Refuse an --output the requested action does not fit; see prepare_run_dir."""
    if not run_dir.is_dir():
        if config.resume:
            raise UserError(f"nothing to resume in {run_dir}: it does not exist; drop --resume to start a run")
        return
    marked = (run_dir / RUN_MARKER).exists()
    written = run_entries(run_dir)
    foreign = foreign_entries(run_dir)
    if config.resume:
        if not written:
            raise UserError(f"nothing to resume in {run_dir}: it holds no run; drop --resume to start one")
        check_same_adapters(config, run_dir)
        if not checkpoint_dirs(run_dir):
            raise UserError(
                f"no checkpoint in {run_dir}: --resume has nothing to continue from; "
                "restore its checkpoints/ folder, or pass --overwrite to start over"
            )
        return
    # Files grpo-mlx did not write: a user's folder, or a run with the user's files in it. Only a plain
    # `train` on a run of ours goes on, to the "already holds a run" message below.
    if foreign and (config.overwrite or not (marked and written)):
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        action = "--overwrite removes only a grpo-mlx run's own files" if config.overwrite else "a run needs a new or empty folder"
        raise UserError(
            f"--output {run_dir} holds files grpo-mlx did not write ({shown}): {action}; choose another --output"
        )
    if written and not config.overwrite:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, or another --output")
    if written and not marked:
        raise UserError(
            f"{run_dir} has no {RUN_MARKER} marker (made by an older grpo-mlx, or not by grpo-mlx), so --overwrite "
            "will not delete it: delete it by hand, or choose another --output"
        )


def clear_old_run(run_dir: Path, log=lambda msg: None) -> None:
    """--overwrite: remove the old run's files, once the new run has loaded everything it needs."""
    if not run_entries(run_dir):
        return
    try:
        remove_run_files(run_dir)
    except OSError as e:
        raise UserError(f"cannot remove the old run in {run_dir} ({e.strerror or e}): remove it by hand or choose another --output")
    log(f"removed the previous run in {run_dir} (--overwrite)")


# Fields that shape the model and its adapters: a run resumed with others would load mismatched weights.
RESUME_MUST_MATCH = ("model", "quantize", "q_bits", "q_group_size", "lora_rank", "lora_layers", "lora_scale", "dora", "lora_keys")


def check_same_adapters(config: TrainConfig, run_dir: Path) -> None:
    """Compare with the run's config.yaml, before the model loads (`resume` checks the checkpoint itself)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return  # written atomically by us; unreadable only if edited by hand: the checkpoint decides
    if not isinstance(saved, dict):
        return
    ours = config_to_dict(config)
    changed = [f"{k} {saved[k]!r} -> {ours[k]!r}" for k in RESUME_MUST_MATCH if k in saved and saved[k] != ours[k]]
    if changed:
        raise UserError(
            f"{run_dir} holds a different run ({', '.join(changed)}): resume it with its own settings, "
            "pass --overwrite to replace it, or choose another --output"
        )


def write_config(config: TrainConfig, run_dir: Path, logprob_path: str | None = None, memory_plan: str | None = None) -> None:
    """config.yaml: the run's settings, reusable as --config; `logprob_path` (how the log-probs
    were computed, trainer.LOGPROB_PATHS) and `memory_plan` (planner.Plan.describe) go in comments,
    recorded but never read back: a reused config plans again for its own machine."""
    # --resume and --overwrite act once: a config.yaml reused as --config must not replay them.
    values = {k: v for k, v in config_to_dict(config).items() if k not in ONE_SHOT_ACTIONS}
    text = yaml.safe_dump(values, sort_keys=False)
    recorded = [f"# {name}: {value}" for name, value in (("logprob_path", logprob_path), ("memory_plan", memory_plan))
                if value is not None]
    if recorded:
        text = "# recorded by grpo-mlx train, not read back:\n" + "\n".join(recorded) + "\n" + text
    atomic_write(run_dir / "config.yaml", lambda p: Path(p).write_text(text))


# ---------------------------------------------------------------- which files a run writes


# The names a run writes at the top of its directory, with atomic_write's leftovers of them.
_RUN_NAMES = set(RUN_FILES) | {tmp_name(name) for name in RUN_FILES} | {f".tmp-{BEST}", f".old-{BEST}"}
_CHECKPOINT_NAME = re.compile(r"(\.tmp-)?step-\d{6,}")


def foreign_entries(run_dir: Path) -> list[str]:
    """Paths in `run_dir` that no run writes: at the top (RUN_FILES and their atomic_write
    leftovers), and inside checkpoints/ (step-NNNNNN folders holding a checkpoint's files)."""
    foreign = [p.name for p in Path(run_dir).iterdir() if p.name not in _RUN_NAMES | set(SYSTEM_FILES)]
    root = Path(run_dir) / CHECKPOINTS
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        foreign.append(CHECKPOINTS)
    elif root.is_dir():
        for step in root.iterdir():
            if not (_CHECKPOINT_NAME.fullmatch(step.name) and step.is_dir() and not step.is_symlink()):
                foreign.append(f"{CHECKPOINTS}/{step.name}")
                continue
            foreign += [f"{CHECKPOINTS}/{step.name}/{p.name}" for p in step.iterdir()
                        if p.name not in CHECKPOINT_FILES or not p.is_file() or p.is_symlink()]
    return sorted(foreign)


def run_entries(run_dir: Path) -> list[Path]:
    """What a run wrote in `run_dir`, less the marker and the lock, which stay with the directory."""
    ours = _RUN_NAMES - {RUN_MARKER, RUN_LOCK}
    return sorted(p for p in Path(run_dir).iterdir() if p.name in ours)


def remove_run_files(run_dir: Path) -> None:
    """Delete the run's own files, leaving the directory, its marker and its (held) lock."""
    for path in run_entries(run_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunLock:
    """An flock on RUN_DIR/RUN_LOCK, held while a run trains.

    The OS releases it when the process ends, however it ends: a SIGKILL leaves
    no stale lock. Where flock does not exist (Windows) it locks nothing.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RUN_LOCK
        self._file = None

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        if self._file is not None:
            return True
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return True
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")  # says who holds it, for the refusal message
        f.flush()
        self._file = f
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None
