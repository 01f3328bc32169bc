"""Measuring the embedded demo models on their tasks without the trainer: greedy accuracy on addition,
and the tool task played turn by turn (`tool_episode_accuracy`). Used by the tests and
`scripts/build_demo_model.py`."""

from __future__ import annotations

import mlx.core as mx

from ..data.examples import Example
from ..envs.environments import FENCED_FORMAT, Episode, ToolEnvironment, initial_messages
from ..envs.tools import get_tools
from ..rewards.answers import answers_equal


def greedy_answers(model, tokenizer, prompts: list[str], max_tokens: int = 6) -> list[str]:
    """Greedy completions of single-turn user `prompts`, stopping at an EOS token.

    Prompts of equal token length are decoded together without a KV cache: the demo's
    prompts are ~20 tokens and its answers at most 4, so recomputing is cheap and simple.
    """
    encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    eos = set(tokenizer.eos_token_ids)
    answers = [""] * len(prompts)
    for rows in by_length.values():
        x = mx.array([encoded[i] for i in rows])
        for _ in range(max_tokens):
            x = mx.concatenate([x, mx.argmax(model(x)[:, -1], axis=-1)[:, None]], axis=1)
        for i, ids in zip(rows, x[:, len(encoded[rows[0]]):].tolist()):
            stop = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            answers[i] = tokenizer.decode(ids[:stop])
    return answers


def greedy_accuracy(model, tokenizer, examples) -> float:
    """Fraction of `examples` whose greedy completion is exactly the gold answer."""
    answers = greedy_answers(model, tokenizer, [ex.prompt for ex in examples])
    return sum(a.strip() == ex.answer for a, ex in zip(answers, examples)) / len(examples)


# ---------------------------------------------------------------- measuring the tool demo

def decode_turns(model, tokenizer, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
    """One model turn per token-id prompt: greedy (temperature 0) or sampled, stopping at an EOS token.

    Prompts of equal length decode together with a KV cache (the tool demo's prompts
    mostly share a length: one token per digit), so no padding or mask is needed.
    """
    from mlx_lm.models.cache import make_prompt_cache

    eos = sorted(tokenizer.eos_token_ids)
    key = mx.random.key(seed)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    turns = [""] * len(prompts)
    for rows in by_length.values():
        cache = make_prompt_cache(model)
        logits = model(mx.array([prompts[i] for i in rows]), cache=cache)[:, -1].astype(mx.float32)
        generated, finished = [], mx.zeros(len(rows), dtype=mx.bool_)
        for _ in range(max_tokens):
            if temperature > 0:
                key, step_key = mx.random.split(key)
                token = mx.random.categorical(logits / temperature, key=step_key)
            else:
                token = mx.argmax(logits, axis=-1)
            generated.append(token)
            finished = finished | mx.any(token[:, None] == mx.array(eos)[None], axis=1)
            if finished.all().item():
                break
            logits = model(token[:, None], cache=cache)[:, -1].astype(mx.float32)
        columns = mx.stack(generated, axis=1).tolist()
        for i, ids in zip(rows, columns):
            stop = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            turns[i] = tokenizer.decode(ids[:stop])
    return turns


def tool_episodes(model, tokenizer, examples: list[Example], max_turns: int = 3, max_tokens: int = 32,
                  temperature: float = 0.0, seed: int = 0, tools: tuple[str, ...] = ("calculator",)):
    """Play each example as a fenced-format ToolEnvironment trajectory, all turn by turn together.

    The same conversation `environments.run_episode` builds, with the model writing the
    turns (each prompt re-rendered and prefilled: a measuring tool, not the training rollout).
    """
    tool_list = get_tools(list(tools))
    envs = [ToolEnvironment(tool_list, FENCED_FORMAT) for _ in examples]
    episodes = []
    for env, example in zip(envs, examples):
        env.reset(example)
        episodes.append(Episode(messages=initial_messages(example, env)))
    active = list(range(len(examples)))
    for turn in range(max_turns):
        if not active:
            break
        prompts = [tokenizer.apply_chat_template(episodes[i].messages, add_generation_prompt=True) for i in active]
        texts = decode_turns(model, tokenizer, prompts, max_tokens, temperature, seed=seed * 1000 + turn)
        still_going = []
        for i, text in zip(active, texts):
            if episodes[i].take_turn(envs[i], text, max_turns):
                still_going.append(i)
        active = still_going
    return episodes


def tool_episode_accuracy(model, tokenizer, examples: list[Example], **episode_options) -> dict:
    """Accuracy and tool use of `tool_episodes` on `examples`.

    An episode is right when it ended by itself (a turn without a tool call) and that
    last turn gives the gold answer. Keys: accuracy, tool_rate (episodes with at least
    one call), accuracy_with_tool / accuracy_without_tool (None where no episode),
    episodes, episodes_with_tool.
    """
    episodes = tool_episodes(model, tokenizer, examples, **episode_options)
    right = [ep.done and answers_equal(ep.messages[-1]["content"], ex.answer) for ep, ex in zip(episodes, examples)]
    used = [ep.tool_calls > 0 for ep in episodes]

    def mean(flags):
        return sum(flags) / len(flags) if flags else None

    return {
        "accuracy": mean(right),
        "tool_rate": mean(used),
        "accuracy_with_tool": mean([r for r, u in zip(right, used) if u]),
        "accuracy_without_tool": mean([r for r, u in zip(right, used) if not u]),
        "episodes": len(episodes),
        "episodes_with_tool": sum(used),
    }
