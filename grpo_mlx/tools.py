"""Old path of `grpo_mlx.envs.tools`, kept for plug-ins and scripts: the same module object."""
import sys

from .envs import tools as _module

sys.modules[__name__] = _module
