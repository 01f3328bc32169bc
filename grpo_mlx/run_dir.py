"""Old path of `grpo_mlx.train.run_dir`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import run_dir as _module

sys.modules[__name__] = _module
