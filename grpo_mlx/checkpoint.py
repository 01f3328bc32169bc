"""Old path of the checkpoints, kept for plug-ins and scripts: checkpoints live in `grpo_mlx.train.checkpoint`,
the run directory's marker, lock and file list (here before) in `grpo_mlx.train.run_dir`."""

from .core.atomic import atomic_write  # noqa: F401
from .train.checkpoint import (  # noqa: F401
    BEST, BEST_RECORD, CHECKPOINT_FILES, CHECKPOINTS, OPTIMIZER_STATE, TRAINER_STATE, checkpoint_dirs, load_checkpoint,
    load_latest_checkpoint, read_best, save_best, save_checkpoint,
)
from .train.run_dir import (  # noqa: F401
    RUN_FILES, RUN_LOCK, RUN_MARKER, SYSTEM_FILES, TRACKER_DIRS, RunLock, foreign_entries, remove_run_files, run_entries,
)
