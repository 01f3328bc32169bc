"""Loading a user's plug-in (a reward function, an environment class) from `file.py:name` or `module:name`.

Shared by `rewards.registry` and `envs.environments`; the label and example word each error.
No MLX.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from typing import Callable

from .errors import UserError


def import_file(spec: str, path: Path, label: str = "reward plug-in", example: str = "my_rewards.py:my_reward"):
    """The module in the file `path`; `label` and `example` word the errors (environment plug-ins share this)."""
    if not path.is_file():
        raise UserError(f"{label} {spec!r}: file {path} not found; give the path of a .py file, e.g. {example}")
    module_name = "grpo_mlx_plugin_" + re.sub(r"\W", "_", path.stem)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"{label} {spec!r}: cannot load {path} as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a module may call sys.exit() at import
        sys.modules.pop(module_name, None)
        raise UserError(f"{label} {spec!r}: importing {path} failed ({exception_text(exc)}); fix the file") from exc
    return module


def import_module(spec: str, module_name: str, label: str = "reward plug-in", example: str = "path/to/file.py:function"):
    try:
        return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too
        raise UserError(
            f"{label} {spec!r}: cannot import module {module_name!r} ({exception_text(exc)}); "
            f"install it or put it on PYTHONPATH, or give a file path like {example}"
        ) from exc


def exception_text(exc: BaseException) -> str:
    """What a plug-in's exception says, in a few words: "KeyError: 'gold'", "it called sys.exit(0)"."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"



def accepted_kwargs(fn: Callable, kwargs: dict) -> dict:
    """The subset of `kwargs` that `fn`'s signature takes (all of them if it has **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some C callables have no signature: pass everything
        return dict(kwargs)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in kwargs.items() if k in names}
