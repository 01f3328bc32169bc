"""The types and ranges of config values: whether a value has a field's declared type (`str | None`,
`list[float]`, ...), how that type reads in an error, and intervals written like "(0, 1]". No MLX."""

from __future__ import annotations

import types
import typing


def in_interval(value, interval: str) -> bool:
    """Whether `value` lies in an interval written like "(0, 1]"."""
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


def interval_text(interval: str) -> str:
    """"[1, inf)" reads ">= 1"; a bounded interval reads as itself."""
    low, high = interval[1:-1].split(", ")
    if high == "inf":
        return (">= " if interval[0] == "[" else "> ") + low
    return "in " + interval


def type_options(hint) -> tuple:
    """The types a hint allows: `int | None` -> (int, NoneType)."""
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def set_type(hint):
    """The type a hint holds when set: `int | None` -> int, `list[str]` stays."""
    return next(o for o in type_options(hint) if o is not type(None))


def has_type(value, hint) -> bool:
    for option in type_options(hint):
        if option is type(None):
            ok = value is None
        elif typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            ok = isinstance(value, list) and all(has_type(v, item) for v in value)
        elif option is float:  # an int is a number too
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif option is int:  # bool is an int subclass; true is not a count
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, option)
        if ok:
            return True
    return False


TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "unset (null)"}


def type_name(hint) -> str:
    names = []
    for option in type_options(hint):
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            names.append(f"a list of {TYPE_NAMES[item].split(' ', 1)[1]}s")
        else:
            names.append(TYPE_NAMES[option])
    return " or ".join(names)
