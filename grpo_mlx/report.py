"""Old path of `grpo_mlx.ui.report`, kept for plug-ins and scripts: the same module object."""
import sys

from .ui import report as _module

sys.modules[__name__] = _module
