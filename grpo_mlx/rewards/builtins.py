"""The built-in reward functions (`--rewards accuracy,format,...`), each registered by name."""

from __future__ import annotations

import math
import re

from .answers import answers_equal
from .registry import completion_texts, register_reward

# Cosine length scaling (Yeo et al. 2025, "Demystifying Long Chain-of-Thought
# Reasoning in LLMs", Eq. 1): value at length 0 -> value at max length.
COSINE_CORRECT = (1.0, 0.5)  # short correct answers are worth most
COSINE_WRONG = (-0.5, 0.0)  # short wrong answers are punished most
COSINE_MAX_LENGTH = 1000  # characters, when no token counts are given

REPETITION_NGRAM = 3  # words
REPETITION_MAX_PENALTY = -1.0

OVERLONG_MAX_LENGTH = 1024  # DAPO's L_max, tokens


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

