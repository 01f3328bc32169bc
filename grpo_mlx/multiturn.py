"""Old path of `grpo_mlx.rollout.multiturn`, kept for plug-ins and scripts: the same module object."""
import sys

from .rollout import multiturn as _module

sys.modules[__name__] = _module
