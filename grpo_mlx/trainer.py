"""Old path of `grpo_mlx.train.trainer`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import trainer as _module

sys.modules[__name__] = _module
