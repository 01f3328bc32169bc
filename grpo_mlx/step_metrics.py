"""Old path of `grpo_mlx.train.step_metrics`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import step_metrics as _module

sys.modules[__name__] = _module
