"""Old path of `grpo_mlx.train.runner`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import runner as _module

sys.modules[__name__] = _module
