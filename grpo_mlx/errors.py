"""Old path of `grpo_mlx.core.errors`, kept for plug-ins and scripts: the same module object."""
import sys

from .core import errors as _module

sys.modules[__name__] = _module
