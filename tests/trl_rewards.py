"""Reward functions written the TRL way (keyword arguments, open-r1 style), for tests/test_trl_rewards.py.

Each reads what TRL passes: `prompts`, `completions` (text, or [{"role": "assistant", "content": ...}]
for conversational data), the data set's columns by name, and `trainer_state`.
"""

import re
import time

# "Never returns" within any test's --reward-timeout; still bounded, so a timeout that is not enforced
# fails the tests that rely on it (a None reward, a slow call) instead of hanging the suite.
HANG_SECONDS = 60


def _content(completion):
    """A completion's text: TRL passes conversational completions as one assistant message."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def _prompt_text(prompt):
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def format_reward(completions, **kwargs):
    """open-r1's format reward: the whole completion is <think>…</think> then <answer>…</answer>."""
    pattern = r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$"
    return [1.0 if re.match(pattern, _content(c), re.DOTALL | re.MULTILINE) else 0.0 for c in completions]


def accuracy_reward(completions, **kwargs):
    """1 if the last number of the completion is the gold's: the `solution` column (its \\boxed{}), else `answer`."""
    golds = kwargs["solution"] if "solution" in kwargs else kwargs["answer"]
    out = []
    for completion, gold in zip(completions, golds):
        boxed = re.search(r"\\boxed\{([^}]*)\}", str(gold))
        gold_number = boxed.group(1) if boxed else str(gold)
        numbers = re.findall(r"-?\d+", _content(completion))
        out.append(float(bool(numbers) and numbers[-1] == gold_number.strip()))
    return out


def length_curriculum(completions, trainer_state, **kwargs):
    """A length schedule: the target length grows from 10 to 50 characters over training."""
    progress = trainer_state.global_step / trainer_state.max_steps
    target = 10 + 40 * progress
    return [-abs(len(_content(c)) - target) / 50 for c in completions]


def prompt_length(prompts, completions, **kwargs):
    """Characters in the prompt's text: it must be the prompt, not the completion."""
    return [float(len(_prompt_text(p))) for p in prompts]


def hangs_on_marked_prompts(prompts, completions, **kwargs):
    """Characters of the completion / 10; never returns when a prompt of the call holds HANG."""
    if any("HANG" in _prompt_text(p) for p in prompts):
        time.sleep(HANG_SECONDS)
    return [len(_content(c)) / 10 for c in completions]


def hangs_after_first_step(completions, trainer_state, **kwargs):
    """Scores like text_length on the trial and step 1; from step 2 on it never returns."""
    if trainer_state.global_step >= 1:
        time.sleep(HANG_SECONDS)
    return [len(_content(c)) / 10 for c in completions]


def always_hangs(completions, **kwargs):
    """Never returns."""
    time.sleep(HANG_SECONDS)
