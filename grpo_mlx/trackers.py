"""Old path of `grpo_mlx.ui.trackers`, kept for plug-ins and scripts: the same module object."""
import sys

from .ui import trackers as _module

sys.modules[__name__] = _module
