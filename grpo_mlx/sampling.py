"""Old path of `grpo_mlx.train.sampling`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import sampling as _module

sys.modules[__name__] = _module
