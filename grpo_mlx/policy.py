"""Old path of `grpo_mlx.model.policy`, kept for plug-ins and scripts: the same module object."""
import sys

from .model import policy as _module

sys.modules[__name__] = _module
