"""Old path of `grpo_mlx.data.prompts`, kept for plug-ins and scripts: the same module object."""
import sys

from .data import prompts as _module

sys.modules[__name__] = _module
