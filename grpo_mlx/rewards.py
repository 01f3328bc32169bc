"""Reward functions: answer extraction, math equivalence, the registry and plug-ins.

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
1. Answer extraction follows what models actually write: an R1 `<answer>` tag
   beats `\\boxed{}` beats a GSM8K `####` line beats the last number in the text.
2. Numbers compare by value (integers exactly, others within a relative
   tolerance of 1e-6), after removing what does
   not change the value: thousands commas, `$`, `%`, units, a trailing period.
3. Every reward function, built-in or plug-in, is wrapped so a failure names the
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

from .errors import UserError

RewardFn = Callable[..., list]

REL_TOL = 1e-6  # numeric answers equal within this relative tolerance

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


# ---------------------------------------------------------------- numbers

# A plain number: optional sign (not after a word or digit, so "3-5" is not -5),
# thousands commas only in groups of three, optional decimals.
_NUM = r"(?:(?<![\w.)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.)\]}])-)?\.\d+"
_TEX_FRAC = rf"-?\\[dt]?frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}|-?\\[dt]?frac(\d)(\d)"
_SLASH_FRAC = rf"({_NUM})\s*/\s*({_NUM})"
# Numbers as they appear in running text: fractions first, so "3/4" is one number.
_NUMBER_IN_TEXT = re.compile(rf"{_TEX_FRAC}|(?:{_NUM})/(?:{_NUM})(?![\d/])|{_NUM}")

_UNIT = r"[A-Za-z][A-Za-z/^.²³]*\d?"
_DECORATIONS = [
    (re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}"), r" \1 "),  # unwrap \text{ dollars}
    (re.compile(r"\^\s*\{?\\circ\}?|°"), ""),  # degrees
    (re.compile(r"\\[!,]"), ""),  # thin spaces: 1\,000
    (re.compile(r"\{,\}"), ","),  # 1{,}000
    (re.compile(r"\\[;: ]|\\left|\\right"), " "),  # LaTeX spacing
    (re.compile(r"\\?[$%€£¥]"), ""),  # currency, percent
    (re.compile(r"[−–]"), "-"),  # unicode minus and en dash
]


def _strip_decorations(text: str) -> str:
    s = text
    for pattern, repl in _DECORATIONS:
        s = pattern.sub(repl, s)
    s = s.strip().strip("*").strip()  # markdown bold: **18**
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    s = re.sub(r"^(?:[A-Za-z]\w*\s*)?=\s*", "", s)  # "x = 5" -> "5"
    return s.rstrip(".!").strip()


def _plain_value(token: str) -> float:
    return float(token.replace(",", ""))


def to_number(text: str | None) -> float | None:
    """The value of an answer that is one number, or None.

    Accepts what does not change the value: `$`, `%`, thousands commas, units
    after the number ("18 dollars", "5 km/h"), a trailing period, `x = `
    before it, and fractions `3/4`, `\\frac{3}{4}`, `\\dfrac34`. Text that is
    more than one number ("1, 2", "2\\sqrt{3}") is not a number.
    """
    if text is None:
        return None
    s = _strip_decorations(text)
    match = re.fullmatch(rf"({_TEX_FRAC}|{_SLASH_FRAC}|{_NUM})(?:\s*{_UNIT}(?:\s+{_UNIT})*)?", s)
    return None if match is None else _token_value(match.group(1))


def _token_value(token: str) -> float | None:
    """Value of one number token: plain, a/b, or \\frac{a}{b}; None for division by zero."""
    token = token.strip()
    if "frac" in token:
        sign = -1.0 if token.startswith("-") else 1.0
        m = re.search(rf"frac\s*\{{\s*({_NUM})\s*\}}\s*\{{\s*({_NUM})\s*\}}|frac(\d)(\d)", token)
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        value = _divide(_plain_value(num), _plain_value(den))
        return None if value is None else sign * value
    if re.search(r"\d\s*/", token):
        num, den = token.split("/")
        return _divide(_plain_value(num), _plain_value(den))
    return _plain_value(token)


def _divide(num: float, den: float) -> float | None:
    return None if den == 0 else num / den


def last_number(text: str) -> str | None:
    """The last number in running text, as written ("1,234", "3/4", "\\frac{1}{2}", "-5")."""
    matches = list(_NUMBER_IN_TEXT.finditer(text.replace("−", "-")))
    return matches[-1].group(0) if matches else None


# ---------------------------------------------------------------- answer extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)\b")


def _answer_tag(text: str) -> str | None:
    """Content of the last <answer>…</answer>; an unclosed last tag runs to the end (truncated output)."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    matches = _ANSWER_TAG.findall(text)
    if "</answer>" not in text[start:]:
        return text[start + len("<answer>"):].strip() or None
    return matches[-1].strip() if matches else None


def _boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{…} (braces nested), or of `\\boxed 5`."""
    for match in reversed(list(_BOXED.finditer(text))):
        rest = text[match.end():].lstrip()
        if not rest.startswith("{"):
            token = re.match(r"[^\s$]+", rest)
            if token:
                return token.group(0)
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                content = rest[1:i].strip()
                if content:
                    return content
                break
    return None


def _hash_line(text: str) -> str | None:
    """The rest of the line after the last GSM8K `####`."""
    start = text.rfind("####")
    if start < 0:
        return None
    return text[start + 4:].split("\n", 1)[0].strip() or None


def marked_answer(text: str) -> str | None:
    """The raw text the completion marks as its answer: <answer> tag > \\boxed{} > ####, else None."""
    tag = _answer_tag(text)
    if tag is not None:
        return _boxed(tag) or tag
    return _boxed(text) or _hash_line(text)


def extract_answer(text: str | None) -> str | None:
    """The final answer a completion gives, as written, or None if it gives none.

    Priority: `<answer>` tag > last `\\boxed{}` > `####` line > last number in
    the text. The content of an answer tag or `####` line that is not itself a
    number is reduced to the last number inside it ("The answer is 72." -> "72"),
    when there is one; \\boxed{} content is kept as is, since it is often an
    expression.
    """
    if text is None:
        return None
    tag = _answer_tag(text)
    if tag is not None:
        boxed = _boxed(tag)
        return boxed if boxed is not None else _number_inside(tag)
    boxed = _boxed(text)
    if boxed is not None:
        return boxed
    line = _hash_line(text)
    if line is not None:
        return _number_inside(line)
    return last_number(text)


def _number_inside(content: str) -> str:
    if to_number(content) is not None:
        return content
    return last_number(content) or content


def parse_gold(answer: str | None) -> str | None:
    """The final answer in a gold field: a full GSM8K solution ("…\\n#### 72") gives "72".

    A gold field with a `####` line, a \\boxed{} or an <answer> tag is reduced
    to it; anything else is taken whole, since gold fields are usually the
    answer itself (and may be non-numeric, like "(1, 2)").
    """
    if answer is None:
        return None
    answer = str(answer)
    if "####" in answer:
        return _hash_line(answer)
    return marked_answer(answer) or answer.strip()


def normalize_text(text: str) -> str:
    """Non-numeric answers compare after: strip, lowercase, drop surrounding $, spaces, trailing period."""
    s = text.strip().lower()
    s = re.sub(r"^\$+|\$+$", "", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


def numbers_equal(a: float, b: float) -> bool:
    """Equal within REL_TOL, but integers exactly: 1e-6 of 1,450,000 is more than 1."""
    if a.is_integer() and b.is_integer():
        return a == b
    return math.isclose(a, b, rel_tol=REL_TOL)


def answers_equal(predicted: str | None, gold: str | None) -> bool:
    """Whether a completion (or an answer) gives the gold answer.

    Both sides are reduced to their final answer first (`extract_answer` for the
    prediction, `parse_gold` for the gold). Numbers compare by value, integers
    exactly and others within a relative tolerance of 1e-6: 0.5 = 1/2 = \\frac{1}{2}, 1,000 = 1000,
    $18 = 18.00, 50% = 50. A non-numeric gold compares with `normalize_text`,
    against the extracted answer or the raw marked answer (so `<answer>(1, 2)</answer>`
    matches gold "(1, 2)"). None and an empty gold equal nothing.
    """
    if predicted is None or gold is None:
        return False
    gold_answer = parse_gold(gold)
    if not gold_answer or not normalize_text(gold_answer):  # an empty gold matches nothing
        return False
    answer = extract_answer(predicted)
    gold_value = to_number(gold_answer)
    if gold_value is not None:
        value = to_number(answer) if answer is not None else None
        return value is not None and numbers_equal(value, gold_value)
    target = normalize_text(gold_answer)
    candidates = [answer, marked_answer(predicted), predicted]
    return any(c is not None and normalize_text(c) == target for c in candidates)


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: make a reward function available by `name` (the first docstring line describes it)."""

    def decorate(fn: RewardFn) -> RewardFn:
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


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise UserError(f"reward plug-in {spec!r}: file {path} not found; give the path of a .py file, e.g. my_rewards.py:my_reward")
    module_name = "grpo_mlx_plugin_" + re.sub(r"\W", "_", path.stem)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"reward plug-in {spec!r}: cannot load {path} as Python; give a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too: a module may call sys.exit() at import
        sys.modules.pop(module_name, None)
        raise UserError(f"reward plug-in {spec!r}: importing {path} failed ({exception_text(exc)}); fix the file") from exc
    return module


def _import_module(spec: str, module_name: str):
    try:
        return importlib.import_module(module_name)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit too
        raise UserError(
            f"reward plug-in {spec!r}: cannot import module {module_name!r} ({exception_text(exc)}); "
            "install it or put it on PYTHONPATH, or give a file path like path/to/file.py:function"
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


def _failure_message(fn, label, completions, answers, kwargs, exc) -> str:
    """Name the first completion that fails on its own, by re-running the function one row at a time."""
    detail = exception_text(exc)
    n = len(completions)
    for i in range(n):
        row_kwargs = {k: (v[i:i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in kwargs.items()}
        if "group_size" in row_kwargs:
            row_kwargs["group_size"] = 1
        try:
            fn(completions[i:i + 1], answers[i:i + 1], **row_kwargs)
        except KeyboardInterrupt:
            raise
        except BaseException:
            return f"{label} failed on completion {i} ({str(completions[i])[:60]!r}): {detail}"
    return f"{label} failed on a batch of {n} completions: {detail}"


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


@register_reward("accuracy")
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


@register_reward("length")
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


@register_reward("cosine")
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
