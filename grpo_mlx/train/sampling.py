"""Sampling and scoring a batch of GRPO groups: B prompts x G completions, every reward.

Rewards are also tried here before the model loads (`try_rewards`, `check_answers`),
and a reward that fails mid-run is traced to the example it failed on (`failing_example`).
"""

from __future__ import annotations

import time
import numpy as np

from ..core.config import TrainConfig, multi_turn, trajectory_tokens, turn_limit
from ..core.errors import UserError
from ..data.examples import take_examples
from ..data.prompts import check_prompt_lengths, render_prompt
from ..rewards.registry import RewardError, TrainerState
from ..rewards.scoring import RewardTimeoutError, first_failing_rows, score_completions
from ..rollout.batch import Rollout, make_sampler
from ..rollout.multiturn import trajectory_prompts
from . import distributed
from .grpo import informative_groups
from .run_state import Run
from .step_metrics import prompt_text

TRIAL_EXAMPLES = 2  # examples a reward function is tried on before training


def check_answers(reward_fns: dict, examples: list, dataset: str, log) -> None:
    """Refuse data with no gold answer when every reward needs one (all rows would score "does not
    apply": zero signal); warn when most examples lack one."""
    needing = [name for name, fn in reward_fns.items() if getattr(fn, "needs_answer", False)]
    missing = sum(ex.answer is None for ex in examples)
    if not needing or not examples or missing * 2 <= len(examples):
        return
    if missing == len(examples) and len(needing) == len(reward_fns):
        raise UserError(
            f"no example of {dataset} has a gold answer, and every reward asked for ({', '.join(needing)}) "
            "scores against one, so none would apply: "
            "name the answer field with --answer-field, or use a reward that needs none (e.g. format)"
        )
    log(f"warning: {missing} of {len(examples)} examples have no gold answer; {', '.join(needing)} "
        "does not apply to them")


def try_rewards(reward_fns: dict, examples: list, config: TrainConfig) -> None:
    """Call every reward function once before the model loads, so a broken plug-in fails in seconds.

    The trial completions are the gold answers themselves (empty text where there
    is none), laid out as a rollout would be: G rows per example. A trial call that
    runs past --reward-timeout is an error at once, not scored row by row.
    """
    trial = examples[:TRIAL_EXAMPLES]
    texts = [ex.answer or "" for ex in trial for _ in range(config.group_size)]
    # Multi-turn rewards get the trajectory's messages and last turns too: a one-turn trajectory here.
    turn_columns = turn_reward_columns(texts, [[{"role": "assistant", "content": t}] for t in texts]) \
        if multi_turn(config) else None
    failure = None
    for name, fn in reward_fns.items():
        try:
            score_groups({name: fn}, {}, config, trial, texts, [len(t) for t in texts], split_on_timeout=False,
                         turn_columns=turn_columns)
        except RewardError as e:
            failure = RewardError(f"{e} (in a trial call before training, with the gold answers as completions); fix the function")
            failure.__cause__ = e
            break
    # A plug-in may fail on one rank only (its own files, its own machine): every rank stops.
    distributed.agree_on_failure(failure, RewardError)


def sample_groups(run: Run, step: int):
    """Draw prompts, roll out G completions each, score them.

    With dynamic sampling (DAPO) groups whose rewards are all equal are dropped
    and more prompts are drawn, up to `max_sampling_rounds` extra rounds.

    With R ranks each round draws the prompts all ranks still need from the one
    data stream, as a single process would, and rank r keeps its share in rank
    order: the first round gives rank r prompts r*B/R .. (r+1)*B/R-1. Every rank
    runs the same rounds and advances `data_position` alike.
    """
    c = run.config
    G = c.group_size
    rank = distributed.world().rank()
    local_batch = distributed.local_batch_size(c.batch_size, distributed.world().size())
    sampler = make_sampler(c.temperature, c.top_p, c.top_k, c.min_p)
    kept_rollouts, kept_examples, kept_rewards, kept_applicable, kept_columns = [], [], [], [], []
    timeouts = dict.fromkeys(run.reward_fns, 0)
    gen_time = reward_time = tool_time = 0.0
    gen_tokens = rounds = 0
    for _ in range(1 + (c.max_sampling_rounds if c.dynamic_sampling else 0)):
        needs = distributed.gather_counts(local_batch - len(kept_examples))  # every rank's shortfall
        if sum(needs) == 0:
            break
        drawn = take_examples(run.examples, c.seed, run.data_position, sum(needs))
        run.data_position += sum(needs)
        rounds += 1
        examples = drawn[sum(needs[:rank]) : sum(needs[: rank + 1])]
        if not examples:  # this rank is full; the others draw more
            distributed.agree_on_failure(None, RewardError)  # joins the others' reward check below
            continue
        rollout, rewards, applicable, columns, round_timeouts, (seconds_generating, seconds_scoring) = \
            sample_round(run, step, examples, sampler)
        for name, count in round_timeouts.items():
            timeouts[name] += count
        gen_time += seconds_generating
        tool_time += rollout.tool_time
        reward_time += seconds_scoring
        gen_tokens += sum(rollout.model_token_counts)

        # The advantages' own rule: a group kept here never gets all-zero advantages.
        keep = np.array(informative_groups(rewards, G, applicable)) if c.dynamic_sampling else np.ones(len(examples), bool)
        informative = [g for g in range(len(examples)) if keep[g]]
        for g in informative:
            rows = slice(g * G, (g + 1) * G)
            kept_examples.append(examples[g])
            kept_rewards += rewards[rows]
            kept_applicable += applicable[rows]
            kept_columns.append({k: v[rows] for k, v in columns.items()})
        kept_rollouts.append(rollout.select_groups(informative))

    rollout = Rollout.concatenate(kept_rollouts)
    columns = {k: [x for col in kept_columns for x in col[k]] for k in columns}
    timing = {"time/generation": gen_time, "time/rewards": reward_time, "time/tools": tool_time,
              "generated_tokens": gen_tokens, "sampling_rounds": rounds,
              "reward_timeouts": timeout_metrics(timeouts)}
    return rollout, kept_examples, kept_rewards, kept_applicable, columns, timing


def timeout_metrics(timeouts: dict) -> dict:
    """`rewards/<name>/timeouts`: rows of the global batch whose reward call was cut off, for the
    rewards that had any (every rank takes part: the same rewards on every rank)."""
    names = sorted(timeouts)
    totals = distributed.sum_across([timeouts[name] for name in names]) if names else []
    return {f"rewards/{name}/timeouts": int(total) for name, total in zip(names, totals) if total > 0}


def sample_round(run: Run, step: int, examples: list, sampler):
    """Roll out and score G completions for each of `examples`:
    (rollout, rewards, applicable, columns, timeouts per reward, (generation seconds, reward seconds)).

    A reward failing on any rank raises RewardError on every rank.
    """
    c = run.config
    G = c.group_size
    if run.make_env is None:
        prompts = [render_prompt(run.tokenizer, ex, run.system_prompt) for ex in examples]
    else:  # the environment's system text and tool schemas are part of the prompt
        prompts = trajectory_prompts(run.tokenizer, examples, run.make_env, run.system_prompt)
    check_prompt_lengths(prompts, run.prompt_limit)

    tic = time.perf_counter()
    if run.make_env is None:
        # The frozen blocks' output, kept while generating, spares the reference pass running them.
        record = {"record_blocks": run.prefix.blocks} if run.prefix is not None else {}
        rollout = run.rollout_fn(run.model, run.tokenizer, prompts, G, c.max_tokens, sampler, **record)
    else:
        rollout = run.multiturn_fn(run.model, run.tokenizer, examples, G, c.max_tokens, sampler, make_env=run.make_env,
                                   max_turns=turn_limit(c), max_trajectory_tokens=trajectory_tokens(c),
                                   system_prompt=run.system_prompt)
    gen_time = time.perf_counter() - tic

    tic = time.perf_counter()
    failure = None
    turn_columns = turn_reward_columns(rollout.final_turns, rollout.messages) if rollout.multi_turn else None
    try:
        rewards, applicable, columns, timeouts = score_groups(run.reward_fns, run.reward_weights, c, examples, rollout.texts,
                                                              rollout.completion_lengths, step, turn_columns=turn_columns)
    except RewardError as e:
        if isinstance(e, RewardTimeoutError):  # every row timed out: every example is one it failed on
            where = f"example {prompt_text(examples[0])[:80]!r} (answer {examples[0].answer!r})"
        else:
            where = failing_example(run, examples, rollout.texts, rollout.completion_lengths, step, turn_columns)
        failure = RewardError(f"{e}; at step {step}, {where}")
        failure.__cause__ = e
    reward_time = time.perf_counter() - tic
    # A reward failing on one rank stops every rank here, none left waiting in a collective.
    distributed.agree_on_failure(failure, RewardError)
    return rollout, rewards, applicable, columns, timeouts, (gen_time, reward_time)


def turn_reward_columns(final_turns: list[str], messages: list[list[dict]]) -> dict:
    """What multi-turn rows add to a reward call: each row's last model turn, and its messages after the
    prompt (the `completions` of a conversational prompt; see rewards.reward_arguments)."""
    return {"final_turns": list(final_turns), "completion_messages": list(messages)}


def score_groups(reward_fns, reward_weights, config: TrainConfig, examples, texts, completion_lengths, step: int = 1,
                 split_on_timeout: bool = True, turn_columns: dict | None = None):
    """Score G completions per example with every reward function at training step `step`:
    (rewards, applicable, columns, timeouts per reward). Calls are cut off after --reward-timeout.
    `turn_columns`: `turn_reward_columns` of a multi-turn rollout, else None."""
    G = config.group_size
    rows = [ex for ex in examples for _ in range(G)]
    return score_completions(
        reward_fns,
        reward_weights,
        texts,
        [ex.answer for ex in rows],
        [example_columns(ex) for ex in rows],
        timeout=config.reward_timeout,
        split_on_timeout=split_on_timeout,
        prompts=[ex.prompt for ex in rows],
        trainer_state=TrainerState(global_step=step - 1, max_steps=config.steps),
        completion_lengths=completion_lengths,
        group_size=G,
        max_completion_length=trajectory_tokens(config) if turn_columns is not None else config.max_tokens,
        **(turn_columns or {}),
    )


def example_columns(example) -> dict:
    """The data set columns a reward gets for an example: its row as read; a built-in task's prompt,
    answer and fields."""
    return example.row or {"prompt": example.prompt, "answer": example.answer, **example.meta}


def failing_example(run: Run, examples, texts, completion_lengths, step: int = 1, turn_columns: dict | None = None) -> str:
    """Name the example a reward failed on: the first group that also fails when scored alone."""
    G = run.config.group_size

    def score_group(rows: slice):
        g = rows.start // G
        group_columns = None if turn_columns is None else {k: v[rows] for k, v in turn_columns.items()}
        score_groups(run.reward_fns, run.reward_weights, run.config, examples[g:g + 1], texts[rows], completion_lengths[rows],
                     step, turn_columns=group_columns)

    rows = first_failing_rows(score_group, len(examples) * G, block=G)
    if rows is None:
        return f"a batch of {len(examples)} examples starting with {prompt_text(examples[0])[:80]!r}"
    ex = examples[rows.start // G]
    return f"example {prompt_text(ex)[:80]!r} (answer {ex.answer!r})"
