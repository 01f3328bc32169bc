"""Old path of `grpo_mlx.ui.dashboard`, kept for plug-ins and scripts: the same module object."""
import sys

from .ui import dashboard as _module

sys.modules[__name__] = _module
