"""Old path of `grpo_mlx.train.distributed`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import distributed as _module

sys.modules[__name__] = _module
