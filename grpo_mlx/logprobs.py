"""Old path of `grpo_mlx.model.logprobs`, kept for plug-ins and scripts: the same module object."""
import sys

from .model import logprobs as _module

sys.modules[__name__] = _module
