"""Old path of `grpo_mlx.ui.run_log`, kept for plug-ins and scripts: the same module object."""
import sys

from .ui import run_log as _module

sys.modules[__name__] = _module
