"""Old path of `grpo_mlx.train.grpo`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import grpo as _module

sys.modules[__name__] = _module
