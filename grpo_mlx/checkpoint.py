"""Old path of `grpo_mlx.train.checkpoint`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import checkpoint as _module

sys.modules[__name__] = _module
