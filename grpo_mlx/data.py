"""Prompts for training and evaluation: `Example`s from data sets and built-in tasks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Example:
    """One prompt with its gold answer.

    `prompt` is the question as plain text or a list of chat messages
    ({"role", "content"}); `answer` is the gold final answer (None when the
    data set has none); `meta` holds the example's other fields, passed on to
    reward functions.
    """

    prompt: str | list[dict]
    answer: str | None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- built-in tasks

def arithmetic_examples(n: int, seed: int = 0, max_operand: int = 99) -> list[Example]:
    """Integer addition asked in words: "What is 37 plus 48?" -> "85".

    Deterministic in `seed`; the embedded demo trains on this task.
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        examples.append(Example(prompt=f"What is {a} plus {b}?", answer=str(a + b), meta={"a": a, "b": b}))
    return examples
