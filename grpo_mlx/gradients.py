"""Old path of `grpo_mlx.train.gradients`, kept for plug-ins and scripts: the same module object."""
import sys

from .train import gradients as _module

sys.modules[__name__] = _module
