"""Atomic checkpoints: adapters, optimizer state, step and data position.

A checkpoint is a directory `RUN_DIR/checkpoints/step-NNNNNN/` written whole
under a temporary name, every file fsynced, then renamed into place: a crash,
a full disk or Ctrl-C mid-write leaves the previous checkpoints untouched.
The latest adapters are also copied to `RUN_DIR/adapters.safetensors` +
`adapter_config.json`, where mlx-lm's `--adapter-path RUN_DIR` finds them.

The run directory around them (its marker, lock and which files a run writes): `run_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..core.atomic import atomic_write, fsync
from ..core.errors import UserError
from ..model.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_weights

CHECKPOINTS = "checkpoints"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "state.json"
BEST = "best"  # the best evaluated step's adapters (--eval-every), written by save_best
BEST_RECORD = "eval.json"  # in BEST: its step and eval metrics
CHECKPOINT_FILES = {ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_STATE, TRAINER_STATE}


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def save_checkpoint(run_dir: Path, model, optimizer, adapter_config: dict, state: dict, keep: int = 3) -> Path:
    """Write checkpoint `state["step"]` atomically, refresh the run's adapters, prune old ones.

    A failed write (disk full, permissions) raises UserError and leaves every
    earlier checkpoint, and the run's previous adapters, as they were.
    """
    try:
        return _save_checkpoint(Path(run_dir), model, optimizer, adapter_config, state, keep)
    except OSError as e:
        raise UserError(
            f"could not save checkpoint step {state['step']} in {run_dir} ({e.strerror or e}); "
            "the previous checkpoints are intact: free disk space, then continue with --resume"
        ) from e


def _save_checkpoint(run_dir: Path, model, optimizer, adapter_config: dict, state: dict, keep: int) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:06d}"
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_arrays(tmp / ADAPTER_WEIGHTS, adapter_weights(model))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        _save_arrays(tmp / OPTIMIZER_STATE, dict(tree_flatten(optimizer.state)))
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        for f in tmp.iterdir():
            fsync(f)
        if final.exists():  # re-saving a step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    atomic_write(run_dir / ADAPTER_WEIGHTS, lambda p: shutil.copyfile(final / ADAPTER_WEIGHTS, p))
    atomic_write(run_dir / ADAPTER_CONFIG, lambda p: shutil.copyfile(final / ADAPTER_CONFIG, p))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_arrays(path: Path, arrays: dict) -> None:
    # MLX reports a failed write (e.g. a full disk) as RuntimeError: make it the OSError it is.
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as e:
        raise OSError(f"writing {path.name} failed: {e}") from e


def load_checkpoint(path: Path):
    """Read one checkpoint: (adapter weights, optimizer state tree, trainer state, adapter config); raises if damaged."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    adapter_config = json.loads((path / ADAPTER_CONFIG).read_text())
    weights = mx.load(str(path / ADAPTER_WEIGHTS))
    optimizer_state = tree_unflatten(list(mx.load(str(path / OPTIMIZER_STATE)).items()))
    return weights, optimizer_state, state, adapter_config


def load_latest_checkpoint(run_dir: Path, warn=None):
    """The newest readable checkpoint, falling back past damaged ones with `warn(message)`.

    Returns (weights, optimizer_state, state, adapter_config, path) or None when there is none.
    `warn` defaults to warnings.warn.
    """
    warn = warn or warnings.warn
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            return (*load_checkpoint(path), path)
        except Exception as e:  # damaged files: any parser error
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warn(f"warning: checkpoint {path.name} is unreadable ({type(e).__name__}: {detail}); using the one before it")
    return None


# ---------------------------------------------------------------- the best evaluated adapters


def _best_paths(run_dir: Path) -> tuple[Path, Path, Path]:
    """(best/, its temporary name, the name the previous best/ has while the new one moves in)."""
    return run_dir / BEST, run_dir / f".tmp-{BEST}", run_dir / f".old-{BEST}"


def save_best(run_dir: Path, model, adapter_config: dict, record: dict) -> Path:
    """Write RUN_DIR/best/ (adapters, adapter_config.json, eval.json = `record`) whole, replacing the old one.

    Written under a temporary name, then swapped in by two renames; a crash between them
    leaves the previous best as .old-best, which `read_best` still finds.
    """
    run_dir = Path(run_dir)
    best, tmp, old = _best_paths(run_dir)
    try:
        if old.exists() and not best.exists():  # a swap cut short: the old one is still the best
            os.replace(old, best)
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir()
        _save_arrays(tmp / ADAPTER_WEIGHTS, adapter_weights(model))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        (tmp / BEST_RECORD).write_text(json.dumps(record, indent=2))
        for f in tmp.iterdir():
            fsync(f)
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        fsync(run_dir)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        raise UserError(f"could not save the best adapters in {best} ({e.strerror or e}): free disk space, then continue with --resume") from e
    return best


def read_best(run_dir: Path) -> dict | None:
    """The record (eval.json) of the run's best adapters, or None when there are none (or it is unreadable)."""
    best, _, old = _best_paths(Path(run_dir))
    for path in (best, old):
        try:
            record = json.loads((path / BEST_RECORD).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            return record
    return None
