"""Reward functions: the registry, plug-ins and the calling rule (the built-ins: `builtins`; calls, timeouts and
combined scoring: `scoring`, through the worker process of `worker`).

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

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.errors import UserError
from ..core.plugins import accepted_kwargs, import_file, import_module

RewardFn = Callable[..., list]


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


# ---------------------------------------------------------------- plug-ins


def _load_plugin(spec: str) -> RewardFn:
    """Import `file.py:fn` by path or `package.module:fn` by name and return fn."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise UserError(f"reward plug-in {spec!r}: write it as path/to/file.py:function or package.module:function")
    if where.endswith(".py") or "/" in where or "\\" in where:
        module = import_file(spec, Path(where).expanduser())
    else:
        module = import_module(spec, where)
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        defined = sorted(k for k, v in vars(module).items() if inspect.isfunction(v) and not k.startswith("_"))
        raise UserError(
            f"reward plug-in {spec!r}: {where} has no function {attr!r} "
            f"(functions there: {', '.join(defined) or 'none'}); fix the name after the colon"
        )
    return fn


# ---------------------------------------------------------------- the calling rule


@dataclass
class TrainerState:
    """The `trainer_state` a reward receives: TRL's names for what a schedule or curriculum needs."""

    global_step: int = 0  # updates done before this batch: 0 while the first step is scored, as in TRL
    max_steps: int = 0


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

