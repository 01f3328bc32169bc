"""Old path of `grpo_mlx.core.config`, kept for plug-ins and scripts: the same module object."""
import sys

from .core import config as _module

sys.modules[__name__] = _module
