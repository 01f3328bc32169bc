"""Old path of `grpo_mlx.envs.sandbox`, kept for plug-ins and scripts: the same module object."""
import sys

from .envs import sandbox as _module

sys.modules[__name__] = _module
