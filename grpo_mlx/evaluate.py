"""Old path of `grpo_mlx.eval.evaluate`, kept for plug-ins and scripts: the same module object."""
import sys

from .eval import evaluate as _module

sys.modules[__name__] = _module
