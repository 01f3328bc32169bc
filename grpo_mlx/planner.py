"""Old path of `grpo_mlx.memory.planner`, kept for plug-ins and scripts: the same module object."""
import sys

from .memory import planner as _module

sys.modules[__name__] = _module
