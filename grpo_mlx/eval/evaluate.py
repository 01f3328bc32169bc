"""Evaluation: greedy accuracy, pass@k and maj@k on a data set with gold answers.

Choices, and why:
1. Accuracy is greedy (temperature 0, one completion per problem), scored by the
   `accuracy` reward, so an evaluation agrees with the reward training optimised.
2. With K > 1 samples per problem (at --temperature), pass@k is the unbiased
   estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on
   Code", Eq. 1), averaged over problems: 1 - C(n-c, k) / C(n, k) for n samples
   of which c are correct, reported for k = 1, 2, 4, ... < K and K.
3. maj@K is a majority vote over the K extracted answers (`answers.extract_answer`),
   answers counted as equal by `answers.same_answer`: by value when both are
   numbers, else as normalised text. Completions with no answer do not vote;
   a tie goes to the answer that appeared first among the samples; with no vote
   at all the problem counts as wrong.
4. Decoding goes through the training rollout (`rollout.generate_rollout`):
   `batch_size` prompts per batch, all K samples of a prompt in the same batch
   with one shared prefill. Sampling reseeds MLX's generator per batch from
   (seed, batch index), so a run is reproducible for a given seed and batch size.
5. With --tools or --env the rollouts are multi-turn, as in training
   (`multiturn.generate_multiturn_rollout`): accuracy is read from each
   trajectory's last model turn (never from a tool's output), and each record
   keeps the trajectory's messages, turns and tool calls.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..core.atomic import atomic_write
from ..core.config import DEMO_PRESET, DEMO_TOOLS_PRESET, EvalConfig, TrainConfig
from ..core.errors import UserError
from ..rewards.answers import extract_answer, parse_gold
from .passk import k_values, majority_vote, pass_at_k
# The progress bar and the summary table live in `table`; named here too, as the old path grpo_mlx.evaluate had them.
from ..rewards.builtins import accuracy_reward
from .table import EvalProgress, summary_table  # noqa: F401


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield start // size, items[start:start + size]


def decode_all(model, tokenizer, prompts: list, group_size: int, max_tokens: int, sampler,
               batch_size: int, seed: int | None = None, on_batch=None, turns: dict | None = None):
    """The Rollout of group_size completions of each prompt, prompt i's at rows i*G .. i*G+G-1.

    `seed` (for sampling) reseeds MLX before each batch; `on_batch(num_prompts)` reports progress.
    `turns`: multi-turn rollouts, `generate_multiturn_rollout`'s keyword arguments (make_env,
    max_turns, ...); `prompts` are then the examples.
    """
    import mlx.core as mx

    from ..rollout.multiturn import generate_multiturn_rollout
    from ..rollout.batch import Rollout, generate_rollout

    rollouts = []
    for index, batch in _batches(prompts, batch_size):
        if seed is not None:
            mx.random.seed(seed * 1_000_003 + index)
        # No log-probs: eval needs none, and keeping them holds each step's [N, V] log-softmax alive.
        if turns is None:
            rollouts.append(generate_rollout(model, tokenizer, batch, group_size, max_tokens, sampler))
        else:
            rollouts.append(generate_multiturn_rollout(model, tokenizer, batch, group_size, max_tokens, sampler, **turns))
        if on_batch is not None:
            on_batch(len(batch))
    return Rollout.concatenate(rollouts)


def _score(rollout, golds: list[str]) -> tuple[list[str | None], list[bool]]:
    """The extracted answers and their correctness: a multi-turn row's answer is in its last model turn."""
    texts = rollout.final_turns if rollout.multi_turn else rollout.texts
    correct = [score == 1.0 for score in accuracy_reward(texts, golds)]
    return [extract_answer(t) for t in texts], correct


def _turn_record(rollout, row: int) -> dict:
    """A multi-turn row's trajectory for the result file: its messages after the prompt, turns and tool calls."""
    return {"messages": rollout.messages[row], "turns": rollout.turns[row], "tool_calls": rollout.tool_calls[row],
            "tool_errors": rollout.tool_errors[row]}


def evaluate_examples(model, tokenizer, examples, samples: int = 1, system_prompt: str | None = None,
                      max_tokens: int = TrainConfig.max_tokens, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0, min_p: float = 0.0, seed: int = 0, batch_size: int = 8, on_progress=None,
                      turns: dict | None = None) -> dict:
    """Metrics and per-example records for a loaded model on `examples` (each with a gold answer).

    `on_progress(phase, num_prompts)` is called after each batch, phase "greedy" or "sampled".
    `turns`: multi-turn rollouts with these `generate_multiturn_rollout` keywords (make_env, max_turns,
    max_trajectory_tokens); the result then also has "turns/mean" and "tools/calls_per_trajectory".
    Returns {"accuracy", "correct", "num_examples", "greedy_truncated", ["pass@k", "maj@K"], "examples"}.
    """
    from ..data.prompts import render_prompt, resolve_system_prompt
    from ..rollout.batch import make_sampler

    golds = [ex.answer for ex in examples]
    system = resolve_system_prompt(system_prompt)
    if turns is None:
        prompts = [render_prompt(tokenizer, ex, system) for ex in examples]
    else:
        prompts, turns = examples, {**turns, "system_prompt": system}

    def report(phase):  # on_batch callback for one phase, or None
        return None if on_progress is None else (lambda prompts: on_progress(phase, prompts))

    greedy = decode_all(model, tokenizer, prompts, 1, max_tokens, make_sampler(0.0), batch_size,
                        on_batch=report("greedy"), turns=turns)
    texts, finish = greedy.texts, greedy.finish_reasons
    extracted, correct = _score(greedy, golds)
    records = [
        {"index": i, "prompt": ex.prompt, "gold": ex.answer, "gold_answer": parse_gold(ex.answer),
         "completion": texts[i], "extracted": extracted[i], "correct": correct[i], "finish_reason": finish[i],
         **(_turn_record(greedy, i) if greedy.multi_turn else {})}
        for i, ex in enumerate(examples)
    ]
    n = len(examples)
    result = {
        "accuracy": sum(correct) / n,
        "correct": sum(correct),
        "num_examples": n,
        "greedy_truncated": sum(r != "stop" for r in finish),
    }
    if greedy.multi_turn:
        result["turns/mean"] = sum(greedy.turns) / n
        result["tools/calls_per_trajectory"] = sum(greedy.tool_calls) / n
    if samples > 1:
        sampler = make_sampler(temperature, top_p, top_k, min_p)
        sampled = decode_all(model, tokenizer, prompts, samples, max_tokens, sampler, batch_size,
                             seed=seed, on_batch=report("sampled"), turns=turns)
        sample_texts = sampled.texts
        sample_answers, sample_correct = _score(sampled, [g for g in golds for _ in range(samples)])
        for i, record in enumerate(records):
            rows = slice(i * samples, (i + 1) * samples)
            answers, flags = sample_answers[rows], sample_correct[rows]
            winner = majority_vote(answers)
            record.update(samples=sample_texts[rows], sample_answers=answers, sample_correct=flags,
                          num_correct=sum(flags), majority_answer=None if winner is None else answers[winner],
                          majority_correct=winner is not None and flags[winner])
        for k in k_values(samples):
            result[f"pass@{k}"] = sum(pass_at_k(samples, r["num_correct"], k) for r in records) / n
        result[f"maj@{samples}"] = sum(r["majority_correct"] for r in records) / n
    result["examples"] = records
    return result


# ---------------------------------------------------------------- the `grpo-mlx eval` entry point


def evaluate(config: EvalConfig, on_progress=None, on_start=None) -> dict:
    """Load the data set and the model (+ adapters), evaluate, and return the result dict.

    The config is validated here too, for callers from Python. No --model means the base
    model recorded in the adapters' config, else the embedded demo model (the tool demo's with
    --tools), whose max_tokens (and max_turns) defaults are its preset's. `seed`
    also draws a built-in task's problems, as in training.
    `on_start(total_prompts)` is called once before decoding, for a progress bar.
    Prompts longer than the model's context less `max_tokens` are skipped and counted
    (`skipped_long_prompts`); when none is short enough, evaluation is refused.
    """
    from ..core.config import default_trajectory_tokens, multi_turn, turn_limit
    from ..data.examples import load_examples
    from ..envs.environments import environment_factory, load_environment
    from ..data.prompts import context_length, drop_long_prompts, prompt_length_limit, resolve_system_prompt
    from ..model.fuse import load_with_adapters, trained_base_model, trained_on_tool_demo
    from ..model.policy import demo_name

    c = config.validate()
    model = trained_base_model(c.adapter_path) if c.model is None and c.adapter_path is not None else c.model
    # The embedded tool demo: adapters trained on it, or --tools with no model and no adapters.
    tool_demo = model is None and (trained_on_tool_demo(c.adapter_path) if c.adapter_path is not None else bool(c.tools))
    max_tokens = c.max_tokens
    if max_tokens is None:  # what training used: the demo presets' lengths for the demo models
        demo_tokens = (DEMO_TOOLS_PRESET if tool_demo else DEMO_PRESET)["max_tokens"]
        max_tokens = demo_tokens if model is None else TrainConfig.max_tokens
    max_turns = c.max_turns or (DEMO_TOOLS_PRESET["max_turns"] if tool_demo else turn_limit(c))
    examples = load_examples(c.dataset, split=c.split, dataset_config=c.dataset_config, prompt_field=c.prompt_field,
                             answer_field=c.answer_field, limit=c.limit, seed=c.seed)
    if any(ex.answer is None for ex in examples):
        raise UserError(f"{c.dataset} has no gold answers to score against: name the answer field with --answer-field")
    if c.env is not None:  # a broken plug-in fails before the model loads
        load_environment(c.env)
    model_obj, tokenizer, model_config = load_with_adapters(model, c.adapter_path, tools=tool_demo)
    turns = None
    if multi_turn(c):
        trajectory = c.max_trajectory_tokens or (DEMO_TOOLS_PRESET["max_trajectory_tokens"] if tool_demo
                                                 else default_trajectory_tokens(max_tokens, max_turns))
        turns = {"make_env": environment_factory(c.env, c.tools or [], tokenizer, c.tool_sandbox), "max_turns": max_turns,
                 "max_trajectory_tokens": trajectory}
    prompt_limit = prompt_length_limit(None, context_length(model_config), turns["max_trajectory_tokens"] if turns else max_tokens)
    examples, too_long = drop_long_prompts(tokenizer, examples, resolve_system_prompt(c.system_prompt), prompt_limit,
                                           c.dataset)

    if on_start is not None:
        on_start(len(examples) * (2 if c.samples > 1 else 1))
    tic = time.perf_counter()
    result = evaluate_examples(model_obj, tokenizer, examples, samples=c.samples, system_prompt=c.system_prompt,
                               max_tokens=max_tokens, temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                               min_p=c.min_p, seed=c.seed, batch_size=c.batch_size, on_progress=on_progress, turns=turns)
    settings = {key: value for key, value in asdict(c).items() if key != "output"}
    settings.update(model=model or demo_name(tool_demo), adapter_path=None if c.adapter_path is None else str(c.adapter_path),
                    max_tokens=max_tokens, temperature=c.temperature if c.samples > 1 else None,
                    seconds=round(time.perf_counter() - tic, 3), max_prompt_length=prompt_limit)
    if turns is not None:  # the bounds the trajectories ran under, defaults resolved
        settings.update(max_turns=max_turns, max_trajectory_tokens=turns["max_trajectory_tokens"])
    result["skipped_long_prompts"] = too_long
    examples_out = result.pop("examples")
    return {**result, "settings": settings, "examples": examples_out}


def check_result_path(path: str | Path) -> Path:
    """Refuse an --output that cannot be written, before the evaluation runs (and would be lost)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--output {path} is a folder: give a file name such as {path / 'result.json'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the folder write_result would create it in
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--output {path}: {parent} is a file, not a folder; choose another path for the results")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--output {path}: folder {parent} is not writable; choose another path for the results")
    if path.exists() and not is_eval_result(path):
        raise UserError(f"--output {path} exists and is not an earlier eval result: choose another path (eval replaces only its own results)")
    return path


def is_eval_result(path: Path) -> bool:
    """Whether `path` holds what write_result writes (so replacing it loses nothing of the user's)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and {"accuracy", "settings"} <= result.keys()


def write_result(result: dict, path: str | Path) -> Path:
    """Write the result as indented JSON, creating parent folders; a folder path is a user error."""
    path = check_result_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n"))
    except OSError as e:
        raise UserError(f"cannot write --output {path} ({e.strerror or e}): choose another path for the results")
    return path
