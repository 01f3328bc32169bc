"""Old path of `grpo_mlx.core.openblas`, kept for plug-ins and scripts: the same module object."""
import sys

from .core import openblas as _module

sys.modules[__name__] = _module
