"""Reward plug-ins for tests: signals that vary even on a random model's output."""


def text_length(completions, answers, **example_fields):
    """Characters in the completion / 10: random byte-level tokens decode to varied lengths."""
    return [len(c) / 10 for c in completions]
