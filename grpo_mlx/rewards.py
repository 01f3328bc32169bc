"""Reward functions: the built-ins, the registry, plug-ins, the calling rule, timeouts, combined scoring.

Pure Python, no MLX: rewards run on decoded text, and a user's plug-in should be
testable without a model.

A reward function scores a whole batch in one call and returns one value per
completion, None where the reward does not apply (accuracy with no gold answer).
Rows are grouped as the rollout lays them out: prompt j owns rows j*G .. j*G+G-1.

How a reward is called (TRL's way, so reward functions written for TRL run unchanged):
every argument is a keyword list over the batch, and a function gets those its
signature names (all of them with **kwargs):

    fn(prompts=..., completions=..., answer=..., solution=..., trainer_state=..., **kwargs)

- `prompts`: each row's prompt as the data set holds it: text, or a list of chat
  messages for conversational data (without --system-prompt, which is ours).
- `completions`: text; for a conversational prompt, as TRL passes it,
  [{"role": "assistant", "content": text}].
- every column of the data set row under its own name (`answer`, `solution`,
  `level`, ...), as read; for a built-in task its fields, and `answer`.
- `trainer_state`: `TrainerState` with TRL's `global_step` (updates done before
  this batch: 0 on the first step) and `max_steps`.
- ours: `answers` (the gold answer per row, from --answer-field, None where there is
  none), `completion_lengths` (tokens), `group_size`, `max_completion_length`.
  Where a column has one of our names, ours wins.
- multi-turn rollouts (--tools, --env): `completions` is the whole trajectory after
  the prompt: its text as the chat template renders it (turns and observations), or
  for a conversational prompt its messages with their roles ("assistant", "tool",
  "user"); `completion_lengths` count every token after the prompt, and
  `max_completion_length` is the trajectory bound. `final_turns` holds each row's
  last model turn: the built-ins that check the answer (accuracy, length, cosine)
  read it, so a number in a tool's output never counts as the model's answer.

The classic grpo-mlx form `fn(completions, answers, **fields)` still works, with
text completions: a function is called positionally, `fn(texts, answers, **the
keywords it takes)`, when its second positional parameter is a required `answers`, or
when it takes *args or positional-only parameters, or when a positional parameter
without a default names nothing above (`fn(texts, golds)`), unless its first
parameter is `prompts` (which the classic form never had).

Choices, and why:
1. Answer extraction and math equivalence (what `accuracy`, `length` and
   `cosine` count as correct) live in `answers`, shared with `eval`.
2. Every reward function, built-in or plug-in, is wrapped so a failure names the
   reward and the completion it failed on, and a malformed return value is caught
   here rather than as a shape error deep in the loss.
3. With a timeout (the trainer's --reward-timeout) every call runs in one worker
   process (`RewardWorker`), a fresh Python that loads the reward by its name: a
   call that runs past the timeout is cut off by killing that process (and
   anything it started) and reaping it; the next call starts a new one. Threads
   cannot be stopped in Python, and forking the trainer (MLX threads, Metal) is
   unsafe. After a timed-out batch call, each group of G rows is scored alone,
   then each row of a group that timed out: rows that still time out score None
   and are counted; a reward that times out on every row is an error.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import inspect
import math
import numbers
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
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


# ---------------------------------------------------------------- the calling rule


@dataclass
class TrainerState:
    """The `trainer_state` a reward receives: TRL's names for what a schedule or curriculum needs."""

    global_step: int = 0  # updates done before this batch: 0 while the first step is scored, as in TRL
    max_steps: int = 0


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


def calls_by_keyword(fn: Callable, offered: dict) -> bool:
    """Whether `fn` is called TRL's way, every argument by keyword, rather than the classic
    `fn(completions, answers, **fields)`; `offered` holds the keywords a call has. The rule is in
    the module docstring."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (some C callables): the classic call
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0].name == "prompts":
        return True
    if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params):
        return False
    if len(positional) >= 2 and positional[1].name == "answers" and positional[1].default is positional[1].empty:
        return False
    return all(p.name in offered for p in positional if p.default is p.empty)


def reward_arguments(fn: Callable, texts: list[str], answers: list, keywords: dict) -> tuple[tuple, dict]:
    """(args, kwargs) that call `fn` on a batch: `texts` are the completions' text, `answers` the gold
    answers, `keywords` the other keyword lists (prompts, data set columns, trainer_state, ...)."""
    keywords = dict(keywords)
    conversations = keywords.pop("completion_messages", None)  # multi-turn: each row's messages after the prompt
    prompts = keywords.get("prompts")
    completions = list(texts) if prompts is None else [
        # TRL's conversational form: the assistant's message, or a multi-turn row's messages with their roles
        (conversations[i] if conversations is not None else [{"role": "assistant", "content": text}])
        if isinstance(prompt, list) else text
        for i, (text, prompt) in enumerate(zip(texts, prompts))
    ]
    offered = {**keywords, "completions": completions, "answers": list(answers)}
    if calls_by_keyword(fn, offered):
        return (), accepted_kwargs(fn, offered)
    rest = {k: v for k, v in keywords.items() if k not in ("completions", "answers")}
    return (list(texts), list(answers)), accepted_kwargs(fn, rest)


def completion_texts(completions: list) -> list[str]:
    """Completions as text: TRL's conversational form [{"role": "assistant", "content": ...}] gives its content."""
    return [c if isinstance(c, str) else "".join(str(m.get("content", "")) for m in c) for c in completions]


# ---------------------------------------------------------------- checked calls


class RewardTimeoutError(RewardError):
    """A reward ran past its time limit on every row of a batch."""


class RewardTimeout(Exception):
    """One reward call ran past its time limit (its rows are then scored alone)."""


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


def run_reward_call(fn: RewardFn, label: str, n: int, args: tuple, kwargs: dict) -> tuple[str, object]:
    """Call `fn`: ("ok", values), ("bad", message) for a malformed result, or ("raised", what it raised)."""
    try:
        values = fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: argparse or click in a scoring helper call sys.exit()
        return "raised", exception_text(exc)
    try:
        return "ok", _check_values(values, n, label)
    except RewardError as exc:
        return "bad", str(exc)


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


# ---------------------------------------------------------------- the worker process


ORPHAN_CHECK_SECONDS = 1.0  # how often a worker checks that its trainer is still alive


class RewardWorker:
    """A Python process that runs reward calls, so that one running past its time limit can be cut off.

    Started on the first call; a fresh interpreter (not a fork of the trainer, whose MLX threads a fork
    would copy) that loads each reward by its name and keeps it, so a plug-in's import runs once per
    worker. A call that times out, is interrupted or finds the worker dead has the worker and all it
    started killed and reaped (`stop`); the next call starts a new one. A worker whose trainer is gone
    exits by itself.
    """

    def __init__(self):
        self.process = None
        self.requests = self.replies = None

    def call(self, request: tuple, timeout: float) -> tuple[str, object]:
        """Send `request` (name, module, label, n, args, kwargs); the reply, or RewardTimeout."""
        label = request[2]
        try:
            message = pickle.dumps(request)
        except Exception as exc:  # a data set column pickle cannot carry
            return "bad", f"{label}: its arguments cannot be sent to the reward worker process ({exception_text(exc)})"
        if self.process is not None and self.process.poll() is not None:  # died between calls (OOM killer, kill)
            self.stop()
        if self.process is None:
            self._start()
        try:
            self.requests.send_bytes(message)
            if not self.replies.poll(timeout):
                raise RewardTimeout(f"{label} ran past {timeout:g} s")
            return self.replies.recv()
        except (EOFError, OSError):  # the worker died: os._exit(), a signal, a crash
            return "raised", f"its worker process died ({_exit_text(self.stop())})"
        except BaseException:  # timed out or interrupted: the worker may be mid-call, so it goes
            self.stop()
            raise

    def _start(self) -> None:
        to_worker, from_trainer = os.pipe()
        to_trainer, from_worker = os.pipe()
        code = (f"import sys; sys.path[:] = {sys.path!r}; from grpo_mlx.rewards import serve_reward_calls; "
                f"serve_reward_calls({to_worker}, {from_worker})")
        try:
            # A session of its own: Ctrl-C reaches the trainer only, and stop() kills the whole group.
            self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_worker, from_worker),
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:
            os.close(from_trainer)
            os.close(to_trainer)
            raise
        finally:
            os.close(to_worker)
            os.close(from_worker)
        self.requests = Connection(from_trainer, readable=False)
        self.replies = Connection(to_trainer, writable=False)

    def stop(self) -> int | None:
        """Kill the worker and everything it started, reap it (no zombie); its exit status."""
        if self.process is None:
            return None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # before reaping: the group id is still ours
        except (ProcessLookupError, PermissionError):
            pass
        code = self.process.wait()
        self.requests.close()
        self.replies.close()
        self.process = self.requests = self.replies = None
        return code


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _registering_module(name: str, fn: RewardFn) -> str | None:
    """The module a worker imports to find `name` in the registry, for rewards registered outside this one."""
    if name not in _REGISTRY or fn.__module__ == __name__:
        return None
    if fn.__module__ == "__main__":
        raise RewardError(f"reward {name!r} is registered in __main__, which its worker process cannot import: "
                          "put it in a module or a file and name it as module:function or file.py:function")
    return fn.__module__


def serve_reward_calls(read_fd: int, write_fd: int) -> None:
    """The worker process's loop (see `RewardWorker`): load each reward by name once, answer each call."""
    requests = Connection(read_fd, writable=False)
    replies = Connection(write_fd, readable=False)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    functions = {}
    while True:
        try:
            name, module, label, n, args, kwargs = requests.recv()
        except EOFError:  # the trainer closed its end
            return
        try:
            if name not in functions:
                if module is not None:
                    importlib.import_module(module)
                functions[name] = _REGISTRY[name] if name in _REGISTRY else _load_plugin(name)
            reply = run_reward_call(functions[name], label, n, args, kwargs)
        except Exception as exc:  # loading it failed here, though it loaded in the trainer
            reply = ("bad", f"{label} cannot be loaded in its worker process: {exception_text(exc)}")
        replies.send(reply)


def _exit_when_orphaned(parent: int) -> None:
    while True:
        time.sleep(ORPHAN_CHECK_SECONDS)
        if os.getppid() != parent:
            os._exit(0)


_WORKER = RewardWorker()
atexit.register(_WORKER.stop)


def stop_reward_worker() -> None:
    """Kill and reap the reward worker process, if one runs (the next timed call starts a new one)."""
    _WORKER.stop()


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


# ---------------------------------------------------------------- built-in rewards


def _golds(answers, completions) -> list:
    """The gold answers; None for every row when none are given."""
    return [None] * len(completions) if answers is None else list(answers)


def _lengths(completions: list[str], completion_lengths) -> list[int]:
    """Token counts when given, else characters."""
    if completion_lengths is None:
        return [len(c) for c in completions]
    if len(completion_lengths) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(completion_lengths)} completion_lengths")
    return [int(x) for x in completion_lengths]


@register_reward("accuracy", needs_answer=True)
def accuracy_reward(completions, answers=None, final_turns=None, **kwargs):
    """1 if the extracted final answer equals the gold answer, else 0; skipped without a gold answer."""
    return [None if a is None else float(answers_equal(c, a)) for c, a in zip(_answer_texts(completions, final_turns), _golds(answers, completions))]


def _answer_texts(completions, final_turns=None) -> list[str]:
    """The text an answer is read from: each multi-turn row's last model turn, else the completion."""
    return completion_texts(completions) if final_turns is None else [str(t) for t in final_turns]


_THINK_ANSWER_SOFT = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"  # content that opens or closes no tag
_THINK_ANSWER_STRICT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


@register_reward("format")
def format_reward(completions, answers=None, **kwargs):
    """1 if <think>…</think> then <answer>…</answer> appear in that order anywhere (soft R1 format)."""
    return [float(bool(_THINK_ANSWER_SOFT.search(c))) for c in completion_texts(completions)]


@register_reward("format_strict")
def format_strict_reward(completions, answers=None, **kwargs):
    """1 if the whole completion is exactly <think>…</think> <answer>…</answer> (strict R1 format)."""
    return [float(bool(_THINK_ANSWER_STRICT.fullmatch(c))) for c in completion_texts(completions)]


@register_reward("tag_count")
def tag_count_reward(completions, answers=None, **kwargs):
    """0.25 for each of <think>, </think>, <answer>, </answer> that appears exactly once."""
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return [0.25 * sum(c.count(t) == 1 for t in tags) for c in completion_texts(completions)]


_STEP_MARKERS = re.compile(r"Step \d+:|^\s*\d+\.\s|^\s*[-*]\s|\b(?:First|Second|Third|Next|Then|Finally),", re.MULTILINE)


@register_reward("reasoning_steps")
def reasoning_steps_reward(completions, answers=None, **kwargs):
    """Step markers ("Step 1:", "1.", "- ", "First,", "Finally,"): min(1, count / 3)."""
    return [min(1.0, len(_STEP_MARKERS.findall(c)) / 3) for c in completion_texts(completions)]


@register_reward("length", needs_answer=True)
def length_reward(completions, answers=None, group_size=None, completion_lengths=None, final_turns=None, **kwargs):
    """Kimi k1.5 length reward within each group: shorter correct answers score higher."""
    # Kimi k1.5 (arXiv:2501.12599) §2.3.3: lam = 0.5 - (len - min_len) / (max_len - min_len);
    # correct -> lam, wrong -> min(0, lam). A group of equal lengths gets lam = 0.
    answer_texts = _answer_texts(completions, final_turns)
    completions, answers = completion_texts(completions), _golds(answers, completions)
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
            out.append(lam if answers_equal(answer_texts[i], answers[i]) else min(0.0, lam))
    return out


@register_reward("cosine", needs_answer=True)
def cosine_reward(completions, answers=None, max_completion_length=COSINE_MAX_LENGTH, completion_lengths=None,
                  final_turns=None, **kwargs):
    """Correctness scaled by length on a cosine: correct 1.0 -> 0.5, wrong -0.5 -> 0.0 as length grows."""
    # Yeo et al. 2025 (arXiv:2502.03373) Eq. 1:
    #   r = r_T + 0.5 (r_0 - r_T) (1 + cos(pi t / T)), t = length clipped to T.
    T = max(1, int(max_completion_length))
    answer_texts = _answer_texts(completions, final_turns)
    completions, answers = completion_texts(completions), _golds(answers, completions)
    out = []
    for c, a, t in zip(answer_texts, answers, _lengths(completions, completion_lengths)):
        if a is None:
            out.append(None)
            continue
        r0, rT = COSINE_CORRECT if answers_equal(c, a) else COSINE_WRONG
        out.append(rT + 0.5 * (r0 - rT) * (1.0 + math.cos(math.pi * min(t, T) / T)))
    return out


@register_reward("repetition")
def repetition_reward(completions, answers=None, **kwargs):
    """Word 3-gram repetition penalty: -1 * (1 - unique / total 3-grams); 0 for short texts."""
    n = REPETITION_NGRAM
    out = []
    for c in completion_texts(completions):
        words = c.lower().split()
        if len(words) < n:
            out.append(0.0)
            continue
        grams = list(zip(*(words[i:] for i in range(n))))
        out.append(REPETITION_MAX_PENALTY * (1 - len(set(grams)) / len(grams)) + 0.0)  # + 0.0: no -0.0
    return out


@register_reward("overlong")
def overlong_reward(completions, answers=None, completion_lengths=None, max_completion_length=OVERLONG_MAX_LENGTH,
                    overlong_buffer=None, **kwargs):
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
