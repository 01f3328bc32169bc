"""Multi-turn rollouts: G trajectories per prompt where the model's turns alternate with an environment's answers.

All B*G trajectories decode together in one mlx-lm `BatchGenerator`. When a model turn
ends (a stop token, --max-tokens for the turn, or the trajectory's token budget), the
environments of every trajectory that ended a turn at that decode step answer
together (`environments.step_all`: their tool calls run concurrently in threads), and
each trajectory that goes on is inserted back into the generator with its own KV cache,
the one the generator hands back with a finished sequence (`Response.prompt_cache`,
mlx-lm 0.31.3+): only the new tokens between the turns (`text_between_turns`: the
end-of-turn marker when the model did not write it, the observation, the next
generation prompt) are prefilled, never the transcript again. Finished trajectories
leave the batch; the others keep decoding while new ones are prefilled (the
generator's continuous batching).

Choices, and why:
1. The environments answer at the decode step the turn ended, and decoding waits for
   them: which trajectories share a decode step, and so the sampled tokens, do not
   depend on how fast a tool was, so a run is as reproducible as a single-turn one. A
   slow Python call holds up decoding for at most its sandbox timeout; the calls of one
   step run side by side. `time/tools` is the wall time spent waiting.
2. A row's tokens after the prompt are the model's turns and the tokens between them;
   `Rollout.completion_masks` marks the model's own (1) and the rest (0): the loss
   trains on the model's tokens only, the others are context.
3. Bounds: at most `max_turns` model turns, each at most `max_tokens` tokens, and at
   most `max_trajectory_tokens` tokens after the prompt in all (turns and
   observations). An observation that does not fit ends the trajectory ("length").
4. A row's finish reason: "stop" when the environment ended it after a turn the model
   stopped itself, "length" when its last turn or the budget ran out of tokens,
   "turns" when the environment answered the last allowed turn (the answer is counted
   in the tool metrics, not appended). Anything but "stop" counts as truncated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx

from ..core.config import default_trajectory_tokens
from ..data.examples import Example
from ..data.prompts import _apply_chat_template, _plain_prompt
from ..envs.environments import Environment, add_tool_counts, initial_messages, step_all, text_between_turns
from ..model.logprobs import lm_head_split, lm_head_split_matches
from .batch import Rollout

# Tokens allowed per observation (and the template text around it) in the default trajectory bound.
def render_messages(tokenizer, messages: list[dict], tool_schemas: list[dict] | None = None) -> list[int]:
    """The prompt's token ids, rendered as `text_between_turns` renders the conversation (tools included)."""
    if getattr(tokenizer, "chat_template", None):
        return _apply_chat_template(tokenizer, messages, tools=tool_schemas or None)
    return list(tokenizer.encode(_plain_prompt(messages)))


def trajectory_prompts(tokenizer, examples: list[Example], make_env: Callable[[], Environment],
                       system_prompt: str | None = None) -> list[list[int]]:
    """Each example's prompt ids as a multi-turn rollout renders them: the environment's system text and tools in."""
    env = make_env()
    return [render_messages(tokenizer, initial_messages(ex, env, system_prompt), env.tool_schemas) for ex in examples]


@dataclass
class _Trajectory:
    """One row's state during the rollout."""

    env: Environment
    messages: list[dict]  # the conversation so far, the prompt's messages first
    tokens: list[int] = field(default_factory=list)  # after the prompt: turns and observations
    mask: list[int] = field(default_factory=list)  # 1: the model's own token
    turn: list[int] = field(default_factory=list)  # the current turn's tokens
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0
    finish: str = "length"
    final_turn: str = ""  # the last model turn's text, without its stop token


def generate_multiturn_rollout(model, tokenizer, examples: list[Example], group_size: int, max_tokens: int, sampler,
                               make_env: Callable[[], Environment], max_turns: int,
                               max_trajectory_tokens: int | None = None, system_prompt: str | None = None,
                               prefill_step_size: int = 2048) -> Rollout:
    """`group_size` trajectories for each example, all decoded in one batch (see the module docstring).

    Each trajectory gets a fresh environment from `make_env`, reset with its example.
    """
    modes = [(name, m, m.training) for name, m in model.named_modules()]
    model.eval()  # sample the policy itself: LoRA dropout acts in the training forward only
    try:
        return _generate(model, tokenizer, examples, group_size, max_tokens, sampler, make_env, max_turns,
                         max_trajectory_tokens or default_trajectory_tokens(max_tokens, max_turns), system_prompt,
                         prefill_step_size)
    finally:  # each module's own mode back; train() sets a whole subtree, so parents go first
        for _, m, mode in sorted(modes, key=lambda entry: (entry[0] != "", entry[0].count("."))):
            m.train(mode)


def _prefill(model, run, prompt: list[int], prefill_step_size: int):
    """A KV cache holding all of `prompt` but its last token (the generator's first input), computed by
    `run`: the model's body alone where that split is exact, since the LM head's logits would be thrown away."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    for start in range(0, len(prompt) - 1, prefill_step_size):
        run(mx.array(prompt[start : min(start + prefill_step_size, len(prompt) - 1)])[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def _generate(model, tokenizer, examples, group_size, max_tokens, sampler, make_env, max_turns, budget, system_prompt,
              prefill_step_size) -> Rollout:
    from mlx_lm.generate import BatchGenerator

    eos = set(tokenizer.eos_token_ids)
    trajectories, prompts, prompt_messages = [], [], []
    for example in examples:
        envs = [make_env() for _ in range(group_size)]
        messages = initial_messages(example, envs[0], system_prompt)
        prompts.append(render_messages(tokenizer, messages, envs[0].tool_schemas))
        prompt_messages.append(len(messages))
        for env in envs:
            env.reset(example)
            trajectories.append(_Trajectory(env, [dict(m) for m in messages]))
    n = len(trajectories)
    generator = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in sorted(eos)], sampler=sampler,
                               completion_batch_size=n, prefill_batch_size=n, prefill_step_size=prefill_step_size)
    caches = []
    body = lm_head_split(model)[0] if lm_head_split_matches(model) else model
    for prompt in prompts:  # each prompt prefilled once for its G rows: merging them into the batch copies it
        caches += [_prefill(model, body, prompt, prefill_step_size)] * group_size
    first_turn = min(max_tokens, budget)
    uids = generator.insert([[p[-1]] for p in prompts for _ in range(group_size)], [first_turn] * n, caches=caches)
    row_of = dict(zip(uids, range(n)))
    tool_time = 0.0
    try:
        while responses := generator.next_generated():
            ended = []
            for r in responses:
                row = row_of[r.uid]
                trajectories[row].turn.append(r.token)
                if r.finish_reason is not None:
                    ended.append((row, r))
                    del row_of[r.uid]
            if not ended:
                continue
            tic = time.perf_counter()
            resumed = _end_turns(tokenizer, trajectories, ended, eos, max_tokens, max_turns, budget)
            tool_time += time.perf_counter() - tic
            if resumed:
                rows, observations, turn_limits, caches, contexts = zip(*resumed)
                uids = generator.insert(list(observations), list(turn_limits), caches=list(caches),
                                        all_tokens=list(contexts))
                row_of.update(zip(uids, rows))
    finally:
        generator.close()

    row_prompts = [p for p in prompts for _ in range(group_size)]
    first_message = [k for k in prompt_messages for _ in range(group_size)]
    texts = [tokenizer.decode(t.tokens[:-1] if t.tokens and t.tokens[-1] in eos else t.tokens) for t in trajectories]
    return Rollout(
        row_prompts, [t.tokens for t in trajectories], texts, [t.finish for t in trajectories], group_size,
        completion_masks=[t.mask for t in trajectories],
        turns=[t.turns for t in trajectories],
        tool_calls=[t.tool_calls for t in trajectories],
        tool_errors=[t.tool_errors for t in trajectories],
        tool_seconds=[t.tool_seconds for t in trajectories],
        messages=[t.messages[k:] for t, k in zip(trajectories, first_message)],
        final_turns=[t.final_turn for t in trajectories],
        tool_time=tool_time,
    )


def _end_turns(tokenizer, trajectories, ended, eos, max_tokens, max_turns, budget) -> list[tuple]:
    """Close the turns that just ended, let their environments answer, and return what to insert for each
    trajectory that goes on: (row, tokens to prefill, turn length limit, KV cache, tokens in the cache)."""
    texts, stopped = [], []
    for row, r in ended:
        t = trajectories[row]
        ended_by_stop = r.finish_reason == "stop" and t.turn[-1] in eos
        texts.append(tokenizer.decode(t.turn[:-1] if ended_by_stop else t.turn))
        stopped.append(ended_by_stop)
        t.tokens += t.turn
        t.mask += [1] * len(t.turn)
        t.turn = []
        t.turns += 1
        t.final_turn = texts[-1]
    rows = [trajectories[row] for row, _ in ended]
    observations = step_all([t.env for t in rows], [t.messages for t in rows], texts)
    resumed = []
    for (row, r), t, text, by_stop, observation in zip(ended, rows, texts, stopped, observations):
        before = list(t.messages)
        t.messages.append({"role": "assistant", "content": text})
        t.finish = "stop" if by_stop else "length"
        if observation is None:
            continue
        add_tool_counts(t, observation)
        if t.turns >= max_turns:
            t.finish = "turns" if by_stop else "length"
            continue
        between = text_between_turns(tokenizer, before, text, observation, t.env.tool_schemas)
        stop_text = tokenizer.decode([r.token]) if by_stop else ""
        if stop_text and between.startswith(stop_text):  # the model wrote the end-of-turn marker itself
            between = between[len(stop_text):]
        added = list(tokenizer.encode(between, add_special_tokens=False))
        room = budget - len(t.tokens) - len(added)
        if not added or room < 1:  # no room for the observation and one more token
            t.finish = "length"
            continue
        t.tokens += added
        t.mask += [0] * len(added)
        t.messages.extend(observation.messages)
        resumed.append((row, added, min(max_tokens, room), r.prompt_cache, r.all_tokens))
    return resumed
