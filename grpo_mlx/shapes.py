"""Old path of `grpo_mlx.model.shapes`, kept for plug-ins and scripts: the same module object."""
import sys

from .model import shapes as _module

sys.modules[__name__] = _module
