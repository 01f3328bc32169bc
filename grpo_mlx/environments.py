"""Old path of `grpo_mlx.envs.environments`, kept for plug-ins and scripts: the same module object."""
import sys

from .envs import environments as _module

sys.modules[__name__] = _module
