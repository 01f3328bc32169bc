"""Reward plug-ins for tests: signals that vary even on a random model's output."""


def text_length(completions, answers, **example_fields):
    """Characters in the completion / 10: random byte-level tokens decode to varied lengths."""
    return [len(c) / 10 for c in completions]


def constant_one(completions, answers, **example_fields):
    """The same reward for every completion: every group has zero variance."""
    return [1.0] * len(completions)


def char_codes(completions, answers, **example_fields):
    """Sum of character codes: differs between completions of even a single token."""
    return [float(sum(map(ord, c))) for c in completions]


def constant_on_two(completions, answers, **example_fields):
    """1 for every row whose answer is "2" (a constant group), else the row's place in its group of 4."""
    return [1.0 if a == "2" else float(i % 4) for i, a in enumerate(answers)]
