"""Old path of `grpo_mlx.rewards.answers`, kept for plug-ins and scripts: the same module object."""
import sys

from .rewards import answers as _module

sys.modules[__name__] = _module
