"""Scoring a batch: checked calls of each reward (a failure names the reward and the completion, a malformed
result is caught here), timeouts through the worker process, and the weighted combination of the columns."""

from __future__ import annotations

import functools
from typing import Callable

from ..core.errors import UserError
from .registry import _REGISTRY, RewardError, RewardFn, _load_plugin, reward_arguments
from .worker import _WORKER, RewardTimeout, _registering_module, run_reward_call

# ---------------------------------------------------------------- checked calls

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



class RewardTimeoutError(RewardError):
    """A reward ran past its time limit on every row of a batch."""


class _CallFailed(Exception):
    """The reward function raised; the message says what."""


def checked_reward(fn: RewardFn, name: str) -> RewardFn:
    """Wrap a reward function so that failures and malformed results raise RewardError naming it.

    The wrapper is called `reward(completions, answers=None, **keywords)` with text completions
    and calls `fn` by the calling rule; keyword arguments `fn` does not accept are dropped, so a
    plug-in need not take **kwargs. Results become a list of float | None.
    """
    if getattr(fn, "_grpo_reward_name", None) is not None:
        return fn

    @functools.wraps(fn)
    def reward(completions: list[str], answers: list | None = None, **keywords) -> list[float | None]:
        answers = [None] * len(completions) if answers is None else answers
        return score_column(name, fn, list(completions), list(answers), keywords)[0]

    reward._grpo_reward_name = name
    reward._grpo_reward_fn = fn
    return reward


def _label(name: str) -> str:
    return f"reward plug-in {name!r}" if ":" in name else f"reward {name!r}"


def score_column(name: str, fn: RewardFn, texts: list[str], answers: list, keywords: dict,
                 timeout: float | None = None, split_on_timeout: bool = True) -> tuple[list[float | None], int]:
    """One reward's values on a batch, and how many rows timed out.

    `keywords` are the keyword lists besides completions and answers (see `reward_arguments`).
    With `timeout` (seconds) the calls run in the worker process and are cut off past it: a batch
    that times out is scored group by group (`group_size` rows), a group that times out row by row,
    and rows that still time out score None; a timeout on every row, or on the batch when not
    `split_on_timeout`, raises RewardTimeoutError. A failure raises RewardError naming the first
    completion that fails on its own.
    """
    fn = getattr(fn, "_grpo_reward_fn", fn)
    label, n = _label(name), len(texts)
    if len(answers) != n:
        raise ValueError(f"{n} completions but {len(answers)} answers")
    group_size = int(keywords.get("group_size") or n)

    def call(rows: slice) -> list:
        size = rows.stop - rows.start
        part = {k: (v[rows] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in keywords.items()}
        if "group_size" in part and size < group_size:  # a row scored alone is its own group
            part["group_size"] = size
        args, kwargs = reward_arguments(fn, texts[rows], answers[rows], part)
        return _call(name, fn, label, size, args, kwargs, timeout)

    def attempt(rows: slice) -> list:
        try:
            return call(rows)
        except _CallFailed as exc:
            raise RewardError(_failure_message(label, texts, call, rows, str(exc))) from None

    try:
        return attempt(slice(0, n)), 0
    except RewardTimeout:
        if not split_on_timeout:
            raise RewardTimeoutError(f"{label} timed out (--reward-timeout {timeout:g} s) on a batch of {n} completions, "
                                     f"the first {str(texts[0])[:60]!r}; make it faster or raise --reward-timeout") from None
    column, timeouts = [None] * n, 0
    for start in range(0, n, group_size):
        group = slice(start, min(start + group_size, n))
        if group_size < n:  # a group alone; a batch of one group has timed out already
            try:
                column[group] = attempt(group)
                continue
            except RewardTimeout:
                pass
        for i in range(group.start, group.stop):
            try:
                column[i] = attempt(slice(i, i + 1))[0]
            except RewardTimeout:
                timeouts += 1
    if timeouts == n:
        raise RewardTimeoutError(f"{label} timed out (--reward-timeout {timeout:g} s) on every one of its {n} completions, "
                                 f"the first {str(texts[0])[:60]!r}; make it faster or raise --reward-timeout")
    return column, timeouts


def _call(name: str, fn: RewardFn, label: str, n: int, args: tuple, kwargs: dict, timeout: float | None) -> list:
    """One call of a reward on n rows: its checked values. RewardError for a malformed result,
    _CallFailed when it raised, RewardTimeout past `timeout` seconds. Without a timeout, or for a
    function the worker cannot load by its name (one passed as an object), in this process, unbounded."""
    if timeout is None or not (name in _REGISTRY or ":" in name):
        kind, value = run_reward_call(fn, label, n, args, kwargs)
    else:
        kind, value = _WORKER.call((name, _registering_module(name, fn), label, n, args, kwargs), timeout)
    if kind == "bad":
        raise RewardError(value)
    if kind == "raised":
        raise _CallFailed(value)
    return value


def first_failing_rows(score: Callable[[slice], object], num_rows: int, block: int = 1) -> slice | None:
    """Re-run `score(rows)` on each `block` consecutive rows in turn: the first rows it fails on alone, or None.

    How a failure on a whole batch is pinned down: one row at a time names the
    completion (`score_column`), one group of G at a time names the example (the trainer).
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


def _failure_message(label: str, texts: list, call: Callable[[slice], object], rows: slice, detail: str) -> str:
    """Name the first completion of `rows` that fails on its own, by re-running the function one row at a time."""

    def alone(one: slice):
        try:
            call(slice(rows.start + one.start, rows.start + one.stop))
        except RewardTimeout:  # a row that hangs is not the one that failed
            pass

    failing = first_failing_rows(alone, rows.stop - rows.start)
    if failing is None:
        return f"{label} failed on a batch of {rows.stop - rows.start} completions: {detail}"
    i = rows.start + failing.start
    return f"{label} failed on completion {i} ({str(texts[i])[:60]!r}): {detail}"



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
    timeout: float | None = None,
    split_on_timeout: bool = True,
    **kwargs,
) -> tuple[list[float], list[bool], dict[str, list], dict[str, int]]:
    """Score a batch with every reward function: (rewards, applicable, columns, timeouts per reward).

    `completions` are text; `example_fields[i]` is row i's data set columns, each reaching the
    functions as one list over the batch ({"a": 1} per row -> a=[1, …]). `kwargs` (prompts,
    trainer_state, completion_lengths, group_size, max_completion_length) take precedence over
    columns of the same name. Each function gets only the keyword arguments its signature
    accepts, by the calling rule. `timeout`: see `score_column`.
    """
    n = len(completions)
    if len(answers) != n:
        raise ValueError(f"{n} completions but {len(answers)} answers")
    rows = [row or {} for row in (example_fields if example_fields is not None else [{}] * n)]
    if len(rows) != n:
        raise ValueError(f"{n} completions but {len(rows)} example_fields")
    names = dict.fromkeys(k for row in rows for k in row if k not in ("completions", "answers"))
    keywords = {k: [row.get(k) for row in rows] for k in names}
    keywords.update(kwargs)
    columns, timeouts = {}, {}
    for name, fn in reward_fns.items():
        columns[name], timeouts[name] = score_column(name, fn, list(completions), list(answers), keywords,
                                                     timeout, split_on_timeout)
    rewards, applicable = combine_rewards(columns, weights)
    return rewards, applicable, columns, timeouts

