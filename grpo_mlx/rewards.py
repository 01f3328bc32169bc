"""Reward functions: the built-ins, the registry, plug-ins and checked, combined scoring.

Pure Python, no MLX: rewards run on decoded text, and a user's plug-in should be
testable without a model.

A reward function scores a whole batch in one call:

    fn(completions: list[str], answers: list[str | None], **example_fields) -> list[float | None]

one value per completion, None where the reward does not apply (accuracy with no
gold answer). Rows are grouped as the rollout lays them out: prompt j owns rows
j*G .. j*G+G-1, so group-relative rewards (`length`) take `group_size`.
Keyword arguments the trainer passes where the function accepts them:
`completion_lengths` (token counts), `group_size`, `max_completion_length`, and
each field of `Example.meta` as a list over the batch.

Choices, and why:
1. Answer extraction and math equivalence (what `accuracy`, `length` and
   `cosine` count as correct) live in `answers`, shared with `eval`.
2. Every reward function, built-in or plug-in, is wrapped so a failure names the
   reward and the completion it failed on, and a malformed return value is caught
   here rather than as a shape error deep in the loss.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
from pathlib import Path
from typing import Callable

from .answers import answers_equal
from .errors import UserError

RewardFn = Callable[..., list]

# Cosine length scaling (Yeo et al. 2025, "Demystifying Long Chain-of-Thought
# Reasoning in LLMs", Eq. 1): value at length 0 -> value at max length.
COSINE_CORRECT = (1.0, 0.5)  # short correct answers are worth most
COSINE_WRONG = (-0.5, 0.0)  # short wrong answers are punished most
COSINE_MAX_LENGTH = 1000  # characters, when no token counts are given

REPETITION_NGRAM = 3  # words
REPETITION_MAX_PENALTY = -1.0

OVERLONG_MAX_LENGTH = 1024  # DAPO's L_max, tokens


class RewardError(UserError):
    """A reward function failed or returned something that is not one score per completion."""


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str, needs_answer: bool = False):
    """Decorator: make a reward function available by `name` (the first docstring line describes it).

    `needs_answer`: the function scores against the gold answer and does not apply
    (None) to examples without one; the trainer refuses a data set with no answers
    when every reward needs them. Kept as the function's `needs_answer` attribute.
    """

    def decorate(fn: RewardFn) -> RewardFn:
        fn.needs_answer = needs_answer
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_rewards() -> dict[str, str]:
    """Built-in and registered reward names, each with a one-line description."""
    return {name: _first_line(fn) for name, fn in sorted(_REGISTRY.items())}


def _first_line(fn) -> str:
    doc = inspect.getdoc(fn) or ""
    return doc.splitlines()[0] if doc else ""


def get_reward(name: str) -> RewardFn:
    """The reward function called `name`: a registered name, `path/to/file.py:fn` or `package.module:fn`.

    The returned callable checks its result and raises RewardError naming the
    reward when the function fails or returns the wrong thing.
    """
    name = name.strip()
    if name in _REGISTRY:
        return checked_reward(_REGISTRY[name], name)
    if ":" in name:
        return checked_reward(_load_plugin(name), name)
    raise UserError(
        f"unknown reward {name!r}: use one of {', '.join(sorted(_REGISTRY))}, "
        "or a plug-in path/to/file.py:function or package.module:function"
    )


# ---------------------------------------------------------------- plug-ins


def _load_plugin(spec: str) -> RewardFn:
    """Import `file.py:fn` by path or `package.module:fn` by name and return fn."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise UserError(f"reward plug-in {spec!r}: write it as path/to/file.py:function or package.module:function")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = _import_file(spec, Path(where).expanduser())
    else:
        module = _import_module(spec, where)
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise UserError(
            f"reward plug-in {spec!r}: {where} has no function {attr!r} "
            f"(functions there: {', '.join(defined) or 'none'}); fix the name after the colon"
        )
    return fn


def _import_file(spec: str, path: Path, label: str = "reward plug-in", example: str = "my_rewards.py:my_reward"):
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


def _import_module(spec: str, module_name: str, label: str = "reward plug-in", example: str = "path/to/file.py:function"):
    try:
        return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too
        raise UserError(
            f"{label} {spec!r}: cannot import module {module_name!r} ({exception_text(exc)}); "
            f"install it or put it on PYTHONPATH, or give a file path like {example}"
        ) from exc


# ---------------------------------------------------------------- checked calls


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


def checked_reward(fn: RewardFn, name: str) -> RewardFn:
    """Wrap a reward function so that failures and malformed results raise RewardError naming it.

    Keyword arguments the function does not accept are dropped, so a plug-in
    need not take **kwargs. Results become a list of float | None.
    """
    if getattr(fn, "_grpo_reward_name", None) is not None:
        return fn
    label = f"reward plug-in {name!r}" if ":" in name else f"reward {name!r}"

    @functools.wraps(fn)
    def reward(completions: list[str], answers: list, **kwargs) -> list[float | None]:
        kwargs = accepted_kwargs(fn, kwargs)
        try:
            values = fn(completions, answers, **kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: argparse or click in a scoring helper call sys.exit()
            raise RewardError(_failure_message(fn, label, completions, answers, kwargs, exc)) from exc
        return _check_values(values, len(completions), label)

    reward._grpo_reward_name = name
    return reward


def first_failing_rows(score: Callable[[slice], object], num_rows: int, block: int = 1) -> slice | None:
    """Re-run `score(rows)` on each `block` consecutive rows in turn: the first rows it fails on alone, or None.

    How a failure on a whole batch is pinned down: one row at a time names the
    completion (`checked_reward`), one group of G at a time names the example (the trainer).
    """
    for start in range(0, num_rows, block):
        rows = slice(start, start + block)
        try:
            score(rows)
        except KeyboardInterrupt:
            raise
        except BaseException:  # SystemExit from a plug-in too
            return rows
    return None


def _failure_message(fn, label, completions, answers, kwargs, exc) -> str:
    """Name the first completion that fails on its own, by re-running the function one row at a time."""
    detail = exception_text(exc)
    n = len(completions)

    def score_rows(rows: slice):
        row_kwargs = {k: (v[rows] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in kwargs.items()}
        if "group_size" in row_kwargs:
            row_kwargs["group_size"] = 1
        fn(completions[rows], answers[rows], **row_kwargs)

    rows = first_failing_rows(score_rows, n)
    if rows is None:
        return f"{label} failed on a batch of {n} completions: {detail}"
    return f"{label} failed on completion {rows.start} ({str(completions[rows.start])[:60]!r}): {detail}"


def exception_text(exc: BaseException) -> str:
    """What a plug-in's exception says, in a few words: "KeyError: 'gold'", "it called sys.exit(0)"."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _check_values(values, n: int, label: str) -> list[float | None]:
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"{label} returned {type(values).__name__}; return a list of {n} floats (None where it does not apply)")
    if len(values) != n:
        raise RewardError(f"{label} returned {len(values)} values for {n} completions; return one per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, numbers.Real) and math.isfinite(v):
            out.append(float(v))
        else:
            raise RewardError(f"{label} returned {v!r} for completion {i}; return finite floats or None")
    return out


# ---------------------------------------------------------------- combining


def combine_rewards(columns: dict[str, list], weights: dict[str, float]) -> tuple[list[float], list[bool]]:
    """Weighted sum of reward columns per completion, and which rows any reward applies to.

    rewards[i] = sum over columns of weights[name] * columns[name][i], where a
    None (the reward does not apply) contributes 0 and a column without a
    weight gets 1.0. applicable[i] is False when every column is None on row i:
    the trainer keeps such rows out of the group statistics instead of
    treating them as reward 0.
    """
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"reward columns differ in length: {lengths}")
    n = next(iter(lengths.values()), 0)
    rewards, applicable = [], []
    for i in range(n):
        row = [(weights.get(name, 1.0), col[i]) for name, col in columns.items()]
        rewards.append(float(sum(w * v for w, v in row if v is not None)))
        applicable.append(any(v is not None for _, v in row))
    return rewards, applicable


def score_completions(
    reward_fns: dict[str, RewardFn],
    weights: dict[str, float],
    completions: list[str],
    answers: list,
    example_fields: list[dict] | None = None,
    **kwargs,
) -> tuple[list[float], list[bool], dict[str, list]]:
    """Score a batch with every reward function once: (rewards, applicable, columns).

    `example_fields[i]` is row i's `Example.meta`; each field reaches the
    functions as one list over the batch (meta {"a": 1} per row -> a=[1, …]).
    `kwargs` (completion_lengths, group_size, max_completion_length) take
    precedence over fields of the same name. Each function gets only the
    keyword arguments its signature accepts.
    """
    n = len(completions)
    if len(answers) != n:
        raise ValueError(f"{n} completions but {len(answers)} answers")
    rows = [row or {} for row in (example_fields if example_fields is not None else [{}] * n)]
    if len(rows) != n:
        raise ValueError(f"{n} completions but {len(rows)} example_fields")
    names = dict.fromkeys(k for row in rows for k in row if k not in ("completions", "answers"))
    call_kwargs = {k: [row.get(k) for row in rows] for k in names}
    call_kwargs.update(kwargs)
    columns = {name: checked_reward(fn, name)(completions, answers, **call_kwargs) for name, fn in reward_fns.items()}
    rewards, applicable = combine_rewards(columns, weights)
    return rewards, applicable, columns


# ---------------------------------------------------------------- built-in rewards


def _lengths(completions: list[str], completion_lengths) -> list[int]:
    """Token counts when given, else characters."""
    if completion_lengths is None:
        return [len(c) for c in completions]
    if len(completion_lengths) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(completion_lengths)} completion_lengths")
    return [int(x) for x in completion_lengths]


@register_reward("accuracy", needs_answer=True)
def accuracy_reward(completions, answers, **example_fields):
    """1 if the extracted final answer equals the gold answer, else 0; skipped without a gold answer."""
    return [None if a is None else float(answers_equal(c, a)) for c, a in zip(completions, answers)]


_THINK_ANSWER_SOFT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"  # content that opens or closes no tag
_THINK_ANSWER_STRICT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


@register_reward("format")
def format_reward(completions, answers, **example_fields):
    """1 if <think>…</think> then <answer>…</answer> appear in that order anywhere (soft R1 format)."""
    return [float(bool(_THINK_ANSWER_SOFT.search(c))) for c in completions]


@register_reward("format_strict")
def format_strict_reward(completions, answers, **example_fields):
    """1 if the whole completion is exactly <think>…</think> <answer>…</answer> (strict R1 format)."""
    return [float(bool(_THINK_ANSWER_STRICT.fullmatch(c))) for c in completions]


@register_reward("tag_count")
def tag_count_reward(completions, answers, **example_fields):
    """0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once."""
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return [0.25 * sum(c.count(t) == 1 for t in tags) for c in completions]


_STEP_MARKERS = re.compile(r"Step \d+:|^\s*\d+\.\s|^\s*[-*]\s|\b(?:First|Second|Third|Next|Then|Finally),", re.MULTILINE)


@register_reward("reasoning_steps")
def reasoning_steps_reward(completions, answers, **example_fields):
    """Step markers ("Step 1:", "1.", "- ", "First,", "Finally,"): min(1, count / 3)."""
    return [min(1.0, len(_STEP_MARKERS.findall(c)) / 3) for c in completions]


@register_reward("length", needs_answer=True)
def length_reward(completions, answers, group_size=None, completion_lengths=None, **example_fields):
    """Kimi k1.5 length reward within each group: shorter correct answers score higher."""
    # Kimi k1.5 (arXiv:2501.12599) §2.3.3: lam = 0.5 - (len - min_len) / (max_len - min_len);
    # correct -> lam, wrong -> min(0, lam). A group of equal lengths gets lam = 0.
    n = len(completions)
    g = n if group_size is None else int(group_size)
    if g < 1 or n % g:
        raise ValueError(f"{n} completions do not split into groups of {group_size}")
    lengths = _lengths(completions, completion_lengths)
    out = []
    for start in range(0, n, g):
        group = lengths[start:start + g]
        lo, hi = min(group), max(group)
        for i in range(start, start + g):
            if answers[i] is None:
                out.append(None)
                continue
            lam = 0.0 if hi == lo else 0.5 - (lengths[i] - lo) / (hi - lo)
            out.append(lam if answers_equal(completions[i], answers[i]) else min(0.0, lam))
    return out


@register_reward("cosine", needs_answer=True)
def cosine_reward(completions, answers, max_completion_length=COSINE_MAX_LENGTH, completion_lengths=None, **example_fields):
    """Correctness scaled by length on a cosine: correct 1.0 -> 0.5, wrong -0.5 -> 0.0 as length grows."""
    # Yeo et al. 2025 (arXiv:2502.03373) Eq. 1:
    #   r = r_T + 0.5 (r_0 - r_T) (1 + cos(pi t / T)), t = length clipped to T.
    T = max(1, int(max_completion_length))
    out = []
    for c, a, t in zip(completions, answers, _lengths(completions, completion_lengths)):
        if a is None:
            out.append(None)
            continue
        r0, rT = COSINE_CORRECT if answers_equal(c, a) else COSINE_WRONG
        out.append(rT + 0.5 * (r0 - rT) * (1.0 + math.cos(math.pi * min(t, T) / T)))
    return out


@register_reward("repetition")
def repetition_reward(completions, answers, **example_fields):
    """Word 3-gram repetition penalty: -1 * (1 - unique / total 3-grams); 0 for short texts."""
    n = REPETITION_NGRAM
    out = []
    for c in completions:
        words = c.lower().split()
        if len(words) < n:
            out.append(0.0)
            continue
        grams = list(zip(*(words[i:] for i in range(n))))
        out.append(REPETITION_MAX_PENALTY * (1 - len(set(grams)) / len(grams)) + 0.0)  # + 0.0: no -0.0
    return out


@register_reward("overlong")
def overlong_reward(completions, answers, completion_lengths=None, max_completion_length=OVERLONG_MAX_LENGTH,
                    overlong_buffer=None, **example_fields):
    """DAPO soft overlong punishment in tokens: 0, then linear to -1 over the last L_max/4, -1 beyond."""
    # DAPO (arXiv:2503.14476) Eq. 13, with L_cache = overlong_buffer:
    #   0 if |y| <= L_max - L_cache; (L_max - L_cache - |y|) / L_cache up to L_max; -1 beyond.
    if completion_lengths is None:
        raise ValueError("overlong needs completion_lengths (token counts); the trainer passes them, "
                         "pass completion_lengths=[...] when calling it yourself")
    L_max = int(max_completion_length)
    L_cache = L_max // 4 if overlong_buffer is None else int(overlong_buffer)
    out = []
    for length in _lengths(completions, completion_lengths):
        if length <= L_max - L_cache:
            out.append(0.0)
        elif length <= L_max:
            out.append((L_max - L_cache - length) / L_cache)
        else:
            out.append(-1.0)
    return out
