"""Old path of `grpo_mlx.model.fuse`, kept for plug-ins and scripts: the same module object."""
import sys

from .model import fuse as _module

sys.modules[__name__] = _module
