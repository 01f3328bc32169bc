"""The GRPO training loop: rollout -> rewards -> advantages -> updates -> checkpoint.

Choices, and why:
1. One rollout per step: B prompts x G completions, decoded in one batch.
2. Advantages are group-relative (DeepSeekMath outcome supervision), one per
   completion, broadcast over its tokens.
3. mu = num_iterations updates per rollout. The first update's policy is the
   sampling one, so its old log-probs are the stop-gradient of the current ones
   and cost no extra forward; with mu > 1 that forward's log-probs are kept for
   the later updates' ratios.
4. The reference policy is the same model with adapters bypassed; beta = 0
   skips the reference forward entirely. The log-prob passes take the cheapest
   path that two numerical probes at start-up show to give the plain forward's
   numbers (LOGPROB_PATHS: one prompt pass per group, or logits on completion
   positions only); the path is logged and recorded in config.yaml.
5. Micro-batches accumulate gradients; each loss is normalised by the whole
   batch's counts (`loss_normaliser`), so accumulating gives the full batch's
   gradient for every loss_type. The gradient step can be compiled
   (`--compile`); batches are padded to LENGTH_BUCKET multiples so it traces
   few shapes.
6. A non-finite loss or gradient skips the update, and an update that makes an
   adapter non-finite is undone; several in a row stop the run, the last finite
   adapters kept.
   A non-finite reward is not skipped: it is an error naming the reward (None is
   how a reward says "does not apply"), so a NaN never reaches the advantages.
7. Every reward function is tried before the model loads; one failing mid-run
   stops the run with the last completed step saved. A failed step restores the
   data position, so --resume redoes it with the same prompts.
8. Under `mlx.launch` (several ranks) each rank takes its slice of the batch's
   groups and normalises by the global counts; gradients are summed across
   ranks before clipping, metrics reduced, and rank 0 alone writes (distributed.py).

`train` is a generator of (metrics, sample) pairs and prints nothing;
`runner.run_training` wires it to the run directory, checkpoints and the dashboard.
Sampling and scoring live in sampling.py, the loss closure and micro-batches in
gradients.py, the metrics in step_metrics.py.
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from ..core.config import TrainConfig, multi_turn, trajectory_tokens
from ..core.errors import UserError
from ..data.examples import Example, load_examples_with_stats
from ..data.prompts import context_length, drop_long_prompts, prompt_length_limit, prompt_token_range, resolve_system_prompt
from ..envs.environments import environment_factory, load_environment
from ..memory.planner import apply_memory_limit, memory_budget, plan_training
from ..model.frozen_prefix import PrefixStates, frozen_blocks, prefix_sharing_matches, states_for_passes
from ..model.logprobs import lm_head_split_matches, supports_shared_prompt
from ..model.policy import attach_adapters, demo_name, load_config_and_tokenizer, load_model, reference_mode
from ..rewards.scoring import get_reward
from ..rollout.batch import Rollout, pad_batch
from . import distributed
from .gradients import (
    LENGTH_BUCKET,
    accumulate_gradients,
    enable_grad_checkpoint,
    forward_logprobs,
    make_grad_step,
    groups_by_length,
    micro_batch_widths,
    plan_micro_batches,
)
from .grpo import group_advantages, loss_normaliser
from .run_state import Run
from .sampling import check_answers, sample_groups, try_rewards
from .step_metrics import batch_metrics, make_sample, reduce_update_metrics

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops
# How the log-prob passes run (Run.logprob_path), as logged at start-up and recorded in config.yaml.
LOGPROB_PATHS = {
    "shared-prompt": "each group's prompt runs once, logits on completion positions only",
    "split-head": "row by row, LM head on completion positions only",
    "full-forward": "row by row, the model's whole forward (logits at every position)",
}


# ---------------------------------------------------------------- setup


def setup(config: TrainConfig, log=lambda msg: None) -> Run:
    local_batch = distributed.local_batch_size(config.batch_size, distributed.world().size())  # fail before loading anything
    reward_fns = {name: get_reward(name) for name in config.reward}
    weights = config.reward_weights or [1.0] * len(config.reward)
    examples = load_data(config, reward_fns, log)
    if config.env is not None:  # a broken plug-in fails before the model loads
        load_environment(config.env)
    # The config and tokenizer alone (no weights): prompt lengths and the memory plan come before the model loads.
    model_config, tokenizer = load_config_and_tokenizer(config.model, tools=bool(config.tools))
    system_prompt = resolve_system_prompt(config.system_prompt)
    # A multi-turn prompt needs room for the whole trajectory after it.
    after_prompt = trajectory_tokens(config) if multi_turn(config) else config.max_tokens
    prompt_limit = prompt_length_limit(config.max_prompt_length, context_length(model_config), after_prompt)
    examples, too_long = drop_long_prompts(tokenizer, examples, system_prompt, prompt_limit, config.dataset)
    if too_long:
        log(f"skipped {too_long} prompts longer than {prompt_limit} tokens")
    shortest_prompt, prompt_tokens = prompt_token_range(tokenizer, examples, system_prompt)
    # refuses here when nothing fits
    plan = plan_training(config, model_config, prompt_tokens, local_batch, shortest_prompt=shortest_prompt)
    budget_source = memory_budget(config.memory_limit)[1]
    log(f"memory plan ({budget_source}, prompts of {shortest_prompt}-{prompt_tokens} tokens): {plan.describe()}")
    apply_memory_limit(plan.budget)
    log(f"loading model {config.model or ('embedded tool demo' if config.tools else 'embedded demo')}"
        + (" and quantizing" if config.quantize else ""))
    model, tokenizer, _ = load_model(config.model, config.quantize, config.q_bits, config.q_group_size, tools=bool(config.tools))
    mx.random.seed(config.seed)  # LoRA A matrices start from this seed
    adapter_config = attach_adapters(
        model, config.lora_rank, config.lora_layers, config.lora_scale, config.lora_dropout, config.dora, config.lora_keys
    )
    adapter_config["model"] = config.model or demo_name(tools=bool(config.tools))  # eval, fuse and generate load this base
    if config.quantize:  # fuse and generate must rebuild the same quantized base
        adapter_config["quantized_on_load"] = {"bits": config.q_bits, "group_size": config.q_group_size}
    # The same seed gives every rank the same LoRA init; taking rank 0's makes sure of it.
    model.update(distributed.broadcast_from_main(model.trainable_parameters()))
    mx.eval(model.parameters())
    shared_prompt = supports_shared_prompt(model)
    if not shared_prompt:  # the plan assumed each group's prompt runs once; this model runs it per row
        plan = plan_training(config, model_config, prompt_tokens, local_batch, shared_prompt=False,
                             shortest_prompt=shortest_prompt)
        log(f"memory plan (no shared-prompt pass for this model): {plan.describe()}")
    if plan.grad_checkpoint:
        enable_grad_checkpoint(model)
    run = Run(
        config=config,
        model=model,
        tokenizer=tokenizer,
        adapter_config=adapter_config,
        examples=examples,
        reward_fns=reward_fns,
        reward_weights=dict(zip(config.reward, weights)),
        optimizer=make_optimizer(config),
        system_prompt=system_prompt,
        prompt_limit=prompt_limit,
        plan=plan,
        split_head=lm_head_split_matches(model),
        shared_prompt=shared_prompt,
        make_env=environment_factory(config.env, config.tools or [], tokenizer, config.tool_sandbox) if multi_turn(config) else None,
    )
    log(f"log-probs: {LOGPROB_PATHS[run.logprob_path]}")
    # The rollout keeps the frozen blocks' output for the log-prob passes: only where there is a
    # reference pass, the graph is not compiled (the step would trace a changing body), and it checks out.
    if config.beta != 0 and not config.compile and run.split_head and prefix_sharing_matches(model):
        run.prefix = PrefixStates(frozen_blocks(model))
        log(f"log-probs: the frozen blocks before the first adapter ({run.prefix.blocks} of {len(model.layers)}) run once "
            f"a step, while generating; the reference and policy passes start after them")
    return run


def load_data(config: TrainConfig, reward_fns: dict, log) -> list[Example]:
    """The data set's examples, checked against the rewards (which are tried on them) before the model loads."""
    log(f"loading data set {config.dataset} ({config.split})")
    examples, skipped = load_examples_with_stats(
        config.dataset,
        split=config.split,
        dataset_config=config.dataset_config,
        prompt_field=config.prompt_field,
        answer_field=config.answer_field,
        seed=config.seed,
    )
    if skipped:
        log(f"skipped {skipped} bad rows of {len(examples) + skipped} (empty prompt, or an answer that is not text or a number)")
    check_answers(reward_fns, examples, config.dataset, log)
    try_rewards(reward_fns, examples, config)
    return examples


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    """AdamW on the --lr-schedule (`learning_rate_schedule`), which sees training steps: the optimizer
    counts updates, mu = num_iterations per step, so update u belongs to step u // mu (0-based).

    The update count is part of the optimizer state a checkpoint saves, so --resume continues the
    schedule where it stopped.
    """
    schedule, mu = learning_rate_schedule(config), config.num_iterations
    if callable(schedule):
        return optim.AdamW(learning_rate=lambda update: schedule((update // mu).astype(mx.int32)), weight_decay=config.weight_decay)
    return optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)


def learning_rate_schedule(config: TrainConfig):
    """The learning rate as a function of the 0-based training step t, built from MLX's schedules
    (a plain number for a constant rate without warm-up).

    Warm-up: with N warm-up steps, step t < N trains at learning_rate * (t + 1) / N, so the first
    step already trains (1/N, not 0) and step N reaches the full rate. Then `constant` stays there;
    `cosine` and `linear` decay from it to 0 one step after the last (--steps), so the last step
    still trains.
    """
    lr, warmup = config.learning_rate, config.warmup_steps
    ramp = max(warmup - 1, 0)  # steps before the first at the full rate
    ramp_schedule = optim.linear_schedule(lr / warmup, lr, ramp) if ramp else None
    decay_steps = max(config.steps - ramp, 1)
    decay = {"constant": None, "cosine": optim.cosine_decay(lr, decay_steps),
             "linear": optim.linear_schedule(lr, 0.0, decay_steps)}[config.lr_schedule]
    if ramp_schedule is not None and decay is not None:
        return optim.join_schedules([ramp_schedule, decay], [ramp])
    return ramp_schedule or decay or lr


# ---------------------------------------------------------------- one step


def grpo_step(run: Run, step: int):
    """One GRPO step; returns (metrics, sample)."""
    c = run.config
    step_start = time.perf_counter()
    # Sampling depends on (seed, step, rank) only: exact resume; ranks draw different noise.
    mx.random.seed((c.seed * 1_000_003 + step) * distributed.world().size() + distributed.world().rank())
    mx.reset_peak_memory()

    rollout, examples, rewards, applicable, columns, timing = sample_groups(run, step)
    n = rollout.num_rows
    metrics = batch_metrics(rollout, rewards, applicable, columns, c)
    metrics["time/generation"] = timing["time/generation"]
    metrics["time/rewards"] = timing["time/rewards"]
    metrics.update(timing["reward_timeouts"])
    metrics["tokens_per_sec/generation"] = timing["generated_tokens"] / max(timing["time/generation"], 1e-9)
    if rollout.multi_turn:
        metrics["time/tools"] = timing["time/tools"]
    if c.dynamic_sampling:
        metrics["sampling_rounds"] = timing["sampling_rounds"]
    sample = make_sample(step, rollout, examples, rewards) if examples else None

    mask_rows = rollout.truncated if c.mask_truncated_completions else None
    # Multi-turn rows: observation tokens are context, never targets (completion_masks).
    tokens, completion_mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, LENGTH_BUCKET, mask_rows,
                                        rollout.completion_masks) if n else (None, None)
    batch_tokens = float(completion_mask.sum().item()) if n else 0.0
    # The global batch's counts, summed over ranks: every rank normalises by them, so
    # the ranks' gradients add up to the one-process gradient.
    num_sequences, num_tokens, ranks_with_rows = distributed.sum_across([n, batch_tokens, n > 0])
    if num_sequences == 0:  # dynamic sampling found no informative group
        metrics.update(step=step, skipped_update=1.0, step_time=time.perf_counter() - step_start)
        return metrics, sample
    if n == 0:  # only this rank found none: it joins the others' updates with zero gradients
        for _ in range(c.num_iterations):
            metrics.update(apply_update(run, None, 0.0, []))
        metrics["learning_rate"] = float(np.array(run.optimizer.learning_rate))
        metrics.update(step=step, step_time=time.perf_counter() - step_start)
        return metrics, sample

    # bnpo across ranks: the mean over ranks of each rank's token-mean loss.
    max_length = trajectory_tokens(c) if run.make_env is not None else c.max_tokens  # Dr. GRPO's constant
    normaliser = loss_normaliser(c.loss_type, num_sequences, num_tokens, batch_tokens * ranks_with_rows, max_length)
    metrics.update(update_policy(run, rollout, rewards, applicable, tokens, completion_mask, normaliser))
    trained_tokens = float(tokens.size) * c.num_iterations
    metrics["tokens_per_sec/train"] = trained_tokens / max(metrics["time/train"], 1e-9)
    metrics["learning_rate"] = float(np.array(run.optimizer.learning_rate))
    metrics["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    metrics["step"] = step
    metrics["step_time"] = time.perf_counter() - step_start
    return metrics, sample


def update_policy(run: Run, rollout: Rollout, rewards, applicable, tokens, completion_mask, normaliser: float) -> dict:
    """Advantages, the reference pass, then mu = num_iterations updates on this rank's rows; returns
    their metrics: the first update's view (ratios of 1 for mu = 1) and the last one's ratios."""
    c = run.config
    advantages = group_advantages(mx.array(rewards), c.group_size, scale=c.scale_rewards, applicable=mx.array(applicable))
    # Groups of similar length share micro-batches, each cut to its own longest row (micro_batch_widths):
    # the gradient is a sum over micro-batches, whatever their order.
    order = groups_by_length(rollout.prompt_tokens, rollout.completion_tokens, c.group_size)
    if order != sorted(order):
        rows = mx.array([g * c.group_size + j for g in order for j in range(c.group_size)])
        rollout, sampled = rollout.select_groups(order), rollout
        sampled.prefix_states = None  # the ordered copy holds them
        tokens, completion_mask, advantages = tokens[rows], completion_mask[rows], advantages[rows]
    # Each group's prompt runs once in the log-prob passes when run.shared_prompt, not G times.
    start, batches, batch_groups = plan_micro_batches(rollout.prompt_tokens, run.plan.micro_batch_size, run.shared_prompt)
    widths = micro_batch_widths(rollout.prompt_tokens, rollout.completion_tokens, batches, LENGTH_BUCKET if c.compile else 1)
    chunk = run.plan.logits_chunk
    metrics = {}
    tic = time.perf_counter()
    ref_logprobs = None
    # Set only with beta != 0: the reference and policy passes replay the frozen blocks' output, kept by the
    # rollout where it could (generate_rollout's record_blocks), else recorded by the reference pass.
    prefix = run.prefix
    if c.beta != 0.0:
        if prefix is not None and rollout.prefix_states is not None:
            prefix.load(states_for_passes(rollout.prefix_states, widths, batches, batch_groups))
            rollout.prefix_states = None  # held once, by `prefix`
        elif prefix is not None:
            prefix.record()
        with reference_mode(run.model):
            ref_logprobs = forward_logprobs(run.model, tokens, c.temperature, batches, start, run.split_head, batch_groups,
                                            chunk, prefix, widths)
    metrics["time/logprobs"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if run.grad_step is None:
        run.grad_step = make_grad_step(run.model, c, run.split_head, chunk, run.prefix)
    update_metrics = []
    old_logprobs = None  # the first update's policy is the sampling one: its forward gives the old log-probs
    for _ in range(c.num_iterations):
        if prefix is not None:
            prefix.replay()
        grads, loss, micro_batch_stats, logprobs = accumulate_gradients(
            run.grad_step, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, batches, normaliser, start,
            batch_groups, widths,
        )
        old_logprobs = logprobs if old_logprobs is None else old_logprobs
        update_metrics.append(apply_update(run, grads, loss, micro_batch_stats))
    if prefix is not None:
        prefix.clear()  # the states are this step's: free them before the next rollout
    metrics["time/train"] = time.perf_counter() - tic
    metrics.update(update_metrics[0])
    if len(update_metrics) > 1:
        last = update_metrics[-1]
        for k in ("ratio/mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "loss"):
            metrics[k] = last[k]
    return metrics


def apply_update(run: Run, grads, loss: float, micro_batch_stats) -> dict:
    """Sum over ranks, clip, check for non-finite values, step the optimizer; returns update metrics.

    `grads` None: this rank has no rows and adds nothing. The clip, the finiteness
    check and the update see the global gradient, so every rank takes the same step.
    """
    c = run.config
    if grads is None:
        grads = tree_map(mx.zeros_like, run.model.trainable_parameters())
    grads = distributed.sum_gradients(grads)
    loss, metrics = reduce_update_metrics(loss, micro_batch_stats)
    if c.beta == 0:
        del metrics["kl"]  # no reference pass: a KL of 0 would only say it was not measured
    if c.max_grad_norm > 0:
        grads, grad_norm = optim.clip_grad_norm(grads, c.max_grad_norm)
    else:
        grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
    grad_norm = float(grad_norm.item())
    metrics.update(loss=loss, grad_norm=grad_norm, skipped_update=0.0)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        # Keep the last finite adapters and optimizer state (small LoRA tensors; the
        # update replaces arrays, never changes them in place): an update that turns
        # a parameter non-finite (e.g. a learning rate that overflows float32) is undone.
        before = tree_map(lambda x: x, (run.model.trainable_parameters(), run.optimizer.state))
        run.optimizer.update(run.model, grads)
        mx.eval(run.model.parameters(), run.optimizer.state)
        if all_finite(run.model.trainable_parameters()):
            run.bad_steps = 0
            return metrics
        run.model.update(before[0])
        run.optimizer.state = before[1]
    run.bad_steps += 1
    metrics["skipped_update"] = 1.0
    if run.bad_steps >= MAX_BAD_STEPS:
        raise NonFiniteError(
            f"training stopped: {run.bad_steps} steps in a row had a non-finite loss, gradient or update; "
            "lower --learning-rate or check the rewards"
        )
    return metrics


def all_finite(tree) -> bool:
    """Whether every array in `tree` is finite: one reduction, one sync."""
    flags = [mx.isfinite(x).all() for _, x in tree_flatten(tree)]
    return bool(mx.stack(flags).all().item()) if flags else True


class NonFiniteError(UserError):
    """Too many consecutive non-finite steps."""


# ---------------------------------------------------------------- the loop


def train(run: Run, stop_requested=lambda: False):
    """Yield (metrics, sample) for each step from run.step + 1 to config.steps."""
    while run.step < run.config.steps and not stop_requested():
        step = run.step + 1
        position = run.data_position
        try:
            metrics, sample = grpo_step(run, step)
        except Exception:
            # A failed step is redone whole on --resume: it must draw the same prompts again.
            run.data_position = position
            raise
        run.step = step
        yield metrics, sample
