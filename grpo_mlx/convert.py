"""Old path of `grpo_mlx.model.convert`, kept for plug-ins and scripts: the same module object."""
import sys

from .model import convert as _module

sys.modules[__name__] = _module
