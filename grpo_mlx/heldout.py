"""Old path of `grpo_mlx.eval.heldout`, kept for plug-ins and scripts: the same module object."""
import sys

from .eval import heldout as _module

sys.modules[__name__] = _module
