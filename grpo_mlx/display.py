"""Old path of `grpo_mlx.ui.display`, kept for plug-ins and scripts: the same module object."""
import sys

from .ui import display as _module

sys.modules[__name__] = _module
