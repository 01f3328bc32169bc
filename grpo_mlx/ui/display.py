"""Showing numbers to a person: the formatting shared by the dashboard, `report` and `eval`.

- `format_value` and `format_duration` turn metrics into short text.
- `reward_functions` gives each `rewards/<name>/mean` metric a one-word label.
- `wants_plain_lines` decides, once for every command, whether a console gets a
  live rich display or plain lines (files, pipes, CI logs, dumb terminals).

Nothing here imports rich or MLX: `report` and `eval` load it cheaply.
"""

from __future__ import annotations

import math


def wants_plain_lines(console) -> bool:
    """True where a live display would garble the output: not a terminal, or a dumb one."""
    return not console.is_terminal or console.is_dumb_terminal


def is_number(value) -> bool:
    """A real number, or something float() reads as one (numpy and mlx scalars); not text."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


UNIT_SUFFIX = {"num": "", "pct": "%", "s": "s", "gb": " GB"}


def format_value(value, kind: str = "num") -> str:
    """Compact numbers: 3 significant digits, no exponent above 1, units by kind.

    kind: "num", "pct" (a fraction shown as a percentage), "s" (seconds), "gb".
    """
    if isinstance(value, int) and kind != "pct":  # bool is an int too; a count stays exact
        text = str(int(value))
    elif not is_number(value):
        return str(value)
    else:
        number = float(value) * (100 if kind == "pct" else 1)
        if not math.isfinite(number):
            text = str(number)
        elif number == 0:
            text = "0"
        elif abs(number) >= 999.5:  # "%.3g" would switch to 1.23e+03
            text = f"{number:.0f}"
        else:
            text = f"{number:.3g}"
    return text + UNIT_SUFFIX[kind]


def format_duration(seconds) -> str:
    """`m:ss`, or `h:mm:ss` past an hour; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def reward_functions(metrics: dict) -> list[tuple[str, str]]:
    """(label, key) for each `rewards/<name>/mean`, in the trainer's order."""
    keys = [k for k in metrics if k.startswith("rewards/") and k.endswith("/mean")]
    names = [k[len("rewards/") : -len("/mean")] for k in keys]
    labels = [reward_label(name) for name in names]
    # Two plug-ins with the same function name keep their full names, so no label hides another.
    labels = [label if labels.count(label) == 1 else one_word(name) for label, name in zip(labels, names)]
    return list(zip(labels, keys))


def reward_label(name: str) -> str:
    """A reward function's short name: `path/to/file.py:fn` and `pkg.mod:fn` show as `fn`."""
    return one_word(name.rpartition(":")[2] or name)


def one_word(text: str) -> str:
    """`text` as one word with no `|`: a plain-line label never contains the " | " separator."""
    return "_".join(str(text).replace("|", "_").split()) or "_"
