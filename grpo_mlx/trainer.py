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
   skips the reference forward entirely.
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
`run_training` wires it to the run directory, checkpoints and the dashboard.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .config import TrainConfig, config_to_dict
from . import distributed
from .errors import Interrupted, UserError
from .grpo import group_advantages, informative_groups, loss_normaliser, policy_loss
from .logprobs import group_token_logprobs, lm_head_split_matches, supports_shared_prompt, token_logprobs
from .policy import attach_adapters, load_model, reference_mode
from .rollout import Rollout, generate_rollout, make_sampler, pad_batch

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops
LENGTH_BUCKET = 32  # pad batches to multiples of this: few distinct shapes


@dataclass
class Run:
    """Everything a step needs, built once by `setup`."""

    config: TrainConfig
    model: nn.Module
    tokenizer: object
    adapter_config: dict
    examples: list
    reward_fns: dict
    reward_weights: dict
    optimizer: optim.Optimizer
    system_prompt: str | None
    prompt_limit: int | None = None  # longest prompt in tokens (data.prompt_length_limit)
    step: int = 0
    data_position: int = 0
    bad_steps: int = 0
    # Whether the model's body and LM head can run apart (logprobs.lm_head_split_matches):
    # then logits are formed for completion positions only.
    split_head: bool = False
    # Whether a group's prompt can run once for its G rows (logprobs.supports_shared_prompt).
    shared_prompt: bool = False
    # generate_rollout's signature; tests inject fixed completions through it
    rollout_fn: object = generate_rollout
    grad_step: object = None  # make_grad_step's function, built on the first step


# ---------------------------------------------------------------- setup


def setup(config: TrainConfig, log=lambda msg: None) -> Run:
    from .data import context_length, drop_long_prompts, load_examples_with_stats, prompt_length_limit, resolve_system_prompt
    from .rewards import get_reward

    distributed.local_batch_size(config.batch_size, distributed.world().size())  # fail before loading anything
    reward_fns = {name: get_reward(name) for name in config.reward}
    weights = config.reward_weights or [1.0] * len(config.reward)
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
    log(f"loading model {config.model or 'embedded demo'}" + (" and quantizing" if config.quantize else ""))
    model, tokenizer, model_config = load_model(config.model, config.quantize, config.q_bits, config.q_group_size)
    system_prompt = resolve_system_prompt(config.system_prompt)
    prompt_limit = prompt_length_limit(config.max_prompt_length, context_length(model_config), config.max_tokens)
    examples, too_long = drop_long_prompts(tokenizer, examples, system_prompt, prompt_limit, config.dataset)
    if too_long:
        log(f"skipped {too_long} prompts longer than {prompt_limit} tokens")
    mx.random.seed(config.seed)  # LoRA A matrices start from this seed
    adapter_config = attach_adapters(
        model, config.lora_rank, config.lora_layers, config.lora_scale, config.lora_dropout, config.dora
    )
    adapter_config["model"] = config.model or "embedded-demo"
    if config.quantize:  # fuse and generate must rebuild the same quantized base
        adapter_config["quantized_on_load"] = {"bits": config.q_bits, "group_size": config.q_group_size}
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    # The same seed gives every rank the same LoRA init; taking rank 0's makes sure of it.
    model.update(distributed.broadcast_from_main(model.trainable_parameters()))
    mx.eval(model.parameters())
    return Run(
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
        split_head=lm_head_split_matches(model),
        # Not under gradient checkpointing: a prompt's keys and values leave the checkpointed block
        # through the cache, and mx.checkpoint's backward pass does not carry their gradient.
        shared_prompt=supports_shared_prompt(model) and not getattr(type(model.layers[0]), "_grpo_mlx_checkpointed", False),
    )


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
    is none), laid out as a rollout would be: G rows per example.
    """
    from .rewards import RewardError

    trial = examples[:TRIAL_EXAMPLES]
    texts = [ex.answer or "" for ex in trial for _ in range(config.group_size)]
    failure = None
    for name, fn in reward_fns.items():
        try:
            score_groups({name: fn}, {}, config, trial, texts, [len(t) for t in texts])
        except RewardError as e:
            failure = RewardError(f"{e} (in a trial call before training, with the gold answers as completions); fix the function")
            failure.__cause__ = e
            break
    # A plug-in may fail on one rank only (its own files, its own machine): every rank stops.
    distributed.agree_on_failure(failure, RewardError)


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass.

    mlx-lm's grad_checkpoint patches the block *class* for the whole process;
    patching it twice would nest checkpoints, so it is done once per class.
    """
    from mlx_lm.tuner.trainer import grad_checkpoint

    block = type(model.layers[0])
    if not getattr(block, "_grpo_mlx_checkpointed", False):
        grad_checkpoint(model.layers[0])
        block._grpo_mlx_checkpointed = True


def make_optimizer(config: TrainConfig) -> optim.Optimizer:
    """AdamW; with N warm-up steps, training step k <= N updates at learning_rate * k / N.

    The schedule sees the optimizer's update count (mu = num_iterations per step);
    it starts at 1/N, not 0, so the first step already trains.
    """
    lr = config.learning_rate
    if config.warmup_steps > 0:
        warmup, mu = config.warmup_steps, config.num_iterations

        def lr(update):  # update: updates made before this one
            return config.learning_rate * mx.minimum(update // mu + 1, warmup).astype(mx.float32) / warmup

    return optim.AdamW(learning_rate=lr, weight_decay=config.weight_decay)


# ---------------------------------------------------------------- rollout and rewards


def sample_groups(run: Run, step: int):
    """Draw prompts, roll out G completions each, score them.

    With dynamic sampling (DAPO) groups whose rewards are all equal are dropped
    and more prompts are drawn, up to `max_sampling_rounds` extra rounds.

    With R ranks each round draws the prompts all ranks still need from the one
    data stream, as a single process would, and rank r keeps its share in rank
    order: the first round gives rank r prompts r*B/R .. (r+1)*B/R-1. Every rank
    runs the same rounds and advances `data_position` alike.
    """
    from .data import check_prompt_lengths, render_prompt, take_examples
    from .rewards import RewardError

    c = run.config
    G = c.group_size
    rank = distributed.world().rank()
    local_batch = distributed.local_batch_size(c.batch_size, distributed.world().size())
    sampler = make_sampler(c.temperature, c.top_p, c.top_k, c.min_p)
    kept_rollouts, kept_examples, kept_rewards, kept_valid, kept_columns = [], [], [], [], []
    gen_time = reward_time = 0.0
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
        prompts = [render_prompt(run.tokenizer, ex, run.system_prompt) for ex in examples]
        check_prompt_lengths(prompts, run.prompt_limit)

        tic = time.perf_counter()
        rollout = run.rollout_fn(run.model, run.tokenizer, prompts, G, c.max_tokens, sampler, with_logprobs=False)
        gen_time += time.perf_counter() - tic
        gen_tokens += sum(rollout.completion_lengths)

        tic = time.perf_counter()
        failure = None
        try:
            rewards, valid, columns = score_groups(run.reward_fns, run.reward_weights, c, examples, rollout.texts, rollout.completion_lengths)
        except RewardError as e:
            where = failing_example(run, examples, rollout.texts, rollout.completion_lengths)
            failure = RewardError(f"{e}; at step {step}, {where}")
            failure.__cause__ = e
        reward_time += time.perf_counter() - tic
        # A reward failing on one rank stops every rank here, none left waiting in a collective.
        distributed.agree_on_failure(failure, RewardError)

        # The advantages' own rule: a group kept here never gets all-zero advantages.
        keep = np.array(informative_groups(rewards, G, valid)) if c.dynamic_sampling else np.ones(len(examples), bool)
        informative = [g for g in range(len(examples)) if keep[g]]
        for g in informative:
            rows = slice(g * G, (g + 1) * G)
            kept_examples.append(examples[g])
            kept_rewards += rewards[rows]
            kept_valid += valid[rows]
            kept_columns.append({k: v[rows] for k, v in columns.items()})
        kept_rollouts.append(rollout.select_groups(informative))

    rollout = Rollout.concatenate(kept_rollouts)
    columns = {k: [x for col in kept_columns for x in col[k]] for k in columns}
    timing = {"time/generation": gen_time, "time/rewards": reward_time, "generated_tokens": gen_tokens, "sampling_rounds": rounds}
    return rollout, kept_examples, kept_rewards, kept_valid, columns, timing


def score_groups(reward_fns, reward_weights, config: TrainConfig, examples, texts, completion_lengths):
    """Score G completions per example with every reward function: (rewards, valid, columns)."""
    from .rewards import score_completions

    G = config.group_size
    return score_completions(
        reward_fns,
        reward_weights,
        texts,
        [ex.answer for ex in examples for _ in range(G)],
        [ex.meta for ex in examples for _ in range(G)],
        completion_lengths=completion_lengths,
        group_size=G,
        max_completion_length=config.max_tokens,
    )


def failing_example(run: Run, examples, texts, completion_lengths) -> str:
    """Name the example a reward failed on: the first group that also fails when scored alone."""
    from .rewards import first_failing_rows

    G = run.config.group_size

    def score_group(rows: slice):
        g = rows.start // G
        score_groups(run.reward_fns, run.reward_weights, run.config, examples[g:g + 1], texts[rows], completion_lengths[rows])

    rows = first_failing_rows(score_group, len(examples) * G, block=G)
    if rows is None:
        return f"a batch of {len(examples)} examples starting with {prompt_text(examples[0])[:80]!r}"
    ex = examples[rows.start // G]
    return f"example {prompt_text(ex)[:80]!r} (answer {ex.answer!r})"


# ---------------------------------------------------------------- loss


def make_loss_fn(config: TrainConfig, split_head: bool = False):
    """The loss of one micro-batch: (loss, (metrics, logprobs)), traceable by mx.compile.

    `normaliser` (0-d) is `grpo.loss_normaliser` of the whole batch's counts.
    Everything that changes from step to step is an array, so a new batch or
    token count reuses the compiled graph. `old_logprobs`
    None means the sampling policy is the current one (mu = 1, or the first of
    mu updates): its log-probs are the stop-gradient of this forward's, which
    the function also returns so later updates can reuse them.
    """
    def loss_fn(model, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, normaliser, start=0, groups=None):
        logprobs, entropy = policy_logprobs(model, tokens, config.temperature, start, split_head, groups, with_entropy=True)
        current = mx.stop_gradient(logprobs)
        loss, metrics = policy_loss(
            logprobs,
            current if old_logprobs is None else old_logprobs,
            ref_logprobs,
            advantages,
            completion_mask,
            normaliser=normaliser,
            epsilon_low=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            kl_estimator=config.kl_estimator,
            loss_type=config.loss_type,
            importance_level=config.importance_level,
        )
        mask = completion_mask.astype(mx.float32)
        metrics["entropy"] = (entropy * mask).sum() / mx.maximum(mask.sum(), 1.0)
        return loss, (metrics, current)

    return loss_fn


def policy_logprobs(model, tokens, temperature, start=0, split_head=False, groups=None, with_entropy=False):
    """Token log-probs of a padded batch: per prompt group when `groups` is given
    (`group_token_logprobs`: each prompt runs once), else row by row from `start`."""
    if groups is not None:
        return group_token_logprobs(model, tokens, groups, temperature, with_entropy=with_entropy)
    return token_logprobs(model, tokens, temperature, with_entropy=with_entropy, start=start, split_head=split_head)


def prompt_groups(prompt_tokens, rows: slice) -> tuple:
    """(first_row, end_row, prompt_length) of each run of rows sharing a prompt, within `rows`,
    counted from rows.start: a micro-batch's groups for `group_token_logprobs`."""
    groups, first = [], rows.start
    for i in range(rows.start + 1, rows.stop + 1):
        if i == rows.stop or prompt_tokens[i] != prompt_tokens[first]:
            groups.append((first - rows.start, i - rows.start, len(prompt_tokens[first])))
            first = i
    return tuple(groups)


def make_grad_step(model: nn.Module, config: TrainConfig, split_head: bool = False):
    """`grad_step(tokens, mask, advantages, old, ref, normaliser, start, groups) -> ((loss, (metrics, logprobs)), grads)`.

    `start` is the first scored position (see `token_logprobs`); `groups` the rows
    sharing a prompt (see `prompt_groups`), or None. A new value of either traces the
    compiled step once more, as a new shape does.

    With `config.compile` the step is compiled once; each new padded shape
    (LENGTH_BUCKET multiples) traces once more. The model's state goes in and
    out of the compiled function explicitly: a compiled closure over the model
    would capture its weights as constants, and later steps would differentiate
    stale weights (mlx-lm's tuner does the same).
    """
    loss_and_grad = nn.value_and_grad(model, make_loss_fn(config, split_head))

    def grad_step(tokens, completion_mask, advantages, old_logprobs, ref_logprobs, normaliser, start=0, groups=None):
        return loss_and_grad(model, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, normaliser, start, groups)

    if not config.compile:
        return grad_step
    state = [model.state, mx.random.state]  # random state: LoRA dropout draws inside the step
    return mx.compile(grad_step, inputs=state, outputs=state)


def accumulate_gradients(grad_step, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, batches, normaliser,
                         start=0, batch_groups=None):
    """Sum the micro-batches' gradients; returns (grads, loss, parts, logprobs).

    `parts` holds (completion tokens, metrics) per micro-batch for weighting;
    `logprobs` the current policy's, per micro-batch, for later updates' ratios.
    `batch_groups`: each micro-batch's `prompt_groups`, or None.
    """
    normaliser = mx.array(normaliser, dtype=mx.float32)
    grads, loss, parts, logprobs = None, 0.0, [], []
    for b, groups in zip(batches, batch_groups or [None] * len(batches)):
        (mb_loss, (m, lp)), g = grad_step(
            tokens[b],
            completion_mask[b],
            advantages[b],
            None if old_logprobs is None else old_logprobs[b],
            None if ref_logprobs is None else ref_logprobs[b],
            normaliser,
            start,
            groups,
        )
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(grads, mb_loss, m, lp)
        loss += mb_loss.item()
        parts.append((float(completion_mask[b].sum().item()), {k: v.item() for k, v in m.items()}))
        logprobs.append(lp)
    return grads, loss, parts, mx.concatenate(logprobs, axis=0)


def first_scored_position(prompt_tokens) -> int:
    """The first position whose next token is a completion token in some row, rounded down
    to a LENGTH_BUCKET multiple (few distinct shapes for a compiled step). Positions before
    it predict prompt tokens only: no logits are formed there."""
    first = min(len(p) for p in prompt_tokens) - 1
    return first // LENGTH_BUCKET * LENGTH_BUCKET


LOGITS_BUDGET_BYTES = 2**30  # float32 logits of one micro-batch, when --micro-batch-size is unset


def auto_micro_batch_size(scored_width: int, vocab_size: int | None, budget: int = LOGITS_BUDGET_BYTES) -> int | None:
    """Rows whose float32 logits over `scored_width` positions fit `budget`; None: no limit known.

    The logits are the largest activation of a real model's pass: 32 completions of 512
    tokens over Qwen2.5's 151,936-token vocabulary are 10 GB, more than many Macs have.
    Micro-batches accumulate to the same gradient (policy_loss is normalised by the
    whole batch), so this bounds memory without changing the update.
    """
    if not vocab_size or scored_width <= 0:
        return None
    return max(1, budget // (scored_width * vocab_size * 4))


def micro_batches(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def forward_logprobs(model, tokens, temperature, batches, start=0, split_head=False, batch_groups=None) -> mx.array:
    """Log-probs without gradient, one micro-batch at a time (old or reference policy)."""
    parts = []
    for b, groups in zip(batches, batch_groups or [None] * len(batches)):
        lp = mx.stop_gradient(policy_logprobs(model, tokens[b], temperature, start, split_head, groups))
        mx.eval(lp)
        parts.append(lp)
    return mx.concatenate(parts, axis=0)


# ---------------------------------------------------------------- one step


def grpo_step(run: Run, step: int):
    """One GRPO step; returns (metrics, sample)."""
    c = run.config
    step_start = time.perf_counter()
    # Sampling depends on (seed, step, rank) only: exact resume; ranks draw different noise.
    mx.random.seed((c.seed * 1_000_003 + step) * distributed.world().size() + distributed.world().rank())
    mx.reset_peak_memory()

    rollout, examples, rewards, valid, columns, timing = sample_groups(run, step)
    G = c.group_size
    n = rollout.num_rows
    metrics = batch_metrics(rollout, rewards, valid, columns, c)
    metrics["time/generation"] = timing["time/generation"]
    metrics["time/rewards"] = timing["time/rewards"]
    metrics["tokens_per_sec/generation"] = timing["generated_tokens"] / max(timing["time/generation"], 1e-9)
    if c.dynamic_sampling:
        metrics["sampling_rounds"] = timing["sampling_rounds"]
    sample = make_sample(step, rollout, examples, rewards) if examples else None

    mask_rows = rollout.truncated if c.mask_truncated_completions else None
    tokens, completion_mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, LENGTH_BUCKET, mask_rows) if n else (None, None)
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

    advantages = group_advantages(mx.array(rewards), G, scale=c.scale_rewards, valid=mx.array(valid))
    start = first_scored_position(rollout.prompt_tokens)
    vocab = getattr(getattr(run.model, "args", None), "vocab_size", None)
    size = c.micro_batch_size or auto_micro_batch_size(tokens.shape[1] - 1 - start, vocab, LOGITS_BUDGET_BYTES)
    batches = micro_batches(n, size)
    # Each group's prompt runs once in the log-prob passes, not G times.
    batch_groups = [prompt_groups(rollout.prompt_tokens, b) for b in batches] if run.shared_prompt else None
    # bnpo across ranks: the mean over ranks of each rank's token-mean loss.
    normaliser = loss_normaliser(c.loss_type, num_sequences, num_tokens, batch_tokens * ranks_with_rows, c.max_tokens)

    tic = time.perf_counter()
    ref_logprobs = None
    if c.beta != 0.0:
        with reference_mode(run.model):
            ref_logprobs = forward_logprobs(run.model, tokens, c.temperature, batches, start, run.split_head, batch_groups)
    metrics["time/logprobs"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if run.grad_step is None:
        run.grad_step = make_grad_step(run.model, c, run.split_head)
    update_metrics = []
    old_logprobs = None  # the first update's policy is the sampling one: its forward gives the old log-probs
    for _ in range(c.num_iterations):
        grads, loss, parts, logprobs = accumulate_gradients(
            run.grad_step, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, batches, normaliser, start,
            batch_groups,
        )
        old_logprobs = logprobs if old_logprobs is None else old_logprobs
        update_metrics.append(apply_update(run, grads, loss, parts))
    metrics["time/train"] = time.perf_counter() - tic
    # Report the first update's view (ratios of 1 for mu = 1) and the last one's ratios.
    metrics.update(update_metrics[0])
    if len(update_metrics) > 1:
        last = update_metrics[-1]
        for k in ("ratio/mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "loss"):
            metrics[k] = last[k]
    trained_tokens = float(tokens.size) * c.num_iterations
    metrics["tokens_per_sec/train"] = trained_tokens / max(metrics["time/train"], 1e-9)
    metrics["learning_rate"] = float(np.array(run.optimizer.learning_rate))
    metrics["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    metrics["step"] = step
    metrics["step_time"] = time.perf_counter() - step_start
    return metrics, sample


def apply_update(run: Run, grads, loss: float, parts) -> dict:
    """Sum over ranks, clip, check for non-finite values, step the optimizer; returns update metrics.

    `grads` None: this rank has no rows and adds nothing. The clip, the finiteness
    check and the update see the global gradient, so every rank takes the same step.
    """
    c = run.config
    if grads is None:
        grads = tree_map(mx.zeros_like, run.model.trainable_parameters())
    grads = distributed.sum_gradients(grads)
    loss, metrics = reduce_update_metrics(loss, parts)
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


# What the loss function reports per micro-batch; ranks reduce these by name, in this order.
UPDATE_METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "ratio/mean", "entropy")


def reduce_update_metrics(loss: float, parts) -> tuple[float, dict]:
    """The global loss (a sum over micro-batches and ranks) and the token-weighted metrics.

    `parts` holds (completion tokens, metrics) per micro-batch of this rank.
    """
    local = [loss, sum(w for w, _ in parts)] + [sum(w * m[k] for w, m in parts) for k in UPDATE_METRICS]
    total = distributed.sum_across(local)
    weight = max(total[1], 1.0)
    return float(total[0]), {k: float(v / weight) for k, v in zip(UPDATE_METRICS, total[2:])}


# ---------------------------------------------------------------- metrics


def reward_metrics(rewards, valid, columns, group_size) -> dict:
    r = np.array(rewards, dtype=np.float64)
    if r.size == 0:
        return {"reward": float("nan"), "reward_std": 0.0, "frac_reward_zero_std": 1.0}
    groups = r.reshape(-1, group_size)
    metrics = {
        "reward": float(r.mean()),
        "reward_std": float(groups.std(axis=1, ddof=1).mean()),
        "frac_reward_zero_std": float((np.ptp(groups, axis=1) == 0).mean()),
    }
    for name, column in columns.items():
        values = [v for v in column if v is not None]
        if values:
            metrics[f"rewards/{name}/mean"] = float(np.mean(values))
            metrics[f"rewards/{name}/std"] = float(np.std(values))
    return metrics


def completion_metrics(lengths, truncated) -> dict:
    lengths = np.asarray(lengths, dtype=np.float64) if len(lengths) else np.zeros(1)
    return {
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/min_length": float(lengths.min()),
        "completions/clipped_ratio": float(np.mean(truncated)) if len(truncated) else 0.0,
    }


def batch_metrics(rollout: Rollout, rewards, valid, columns, config: TrainConfig) -> dict:
    """Reward and completion metrics of the global batch: every rank's rows, in rank order.

    Ranks send their rows, not their means, so the numbers equal one process's.
    """
    G = config.group_size
    names = sorted(columns)  # every rank runs the same reward functions
    table = np.zeros((rollout.num_rows, 4 + len(names)))
    table[:, 0], table[:, 1] = rewards, valid
    table[:, 2], table[:, 3] = rollout.completion_lengths, rollout.truncated
    for i, name in enumerate(names):  # a reward that does not apply (None) travels as NaN
        table[:, 4 + i] = [np.nan if v is None else float(v) for v in columns[name]]
    capacity = distributed.local_batch_size(config.batch_size, distributed.world().size()) * G
    rows = distributed.gather_rows(table, capacity)
    columns = {name: [None if np.isnan(v) else float(v) for v in rows[:, 4 + i]] for i, name in enumerate(names)}
    metrics = reward_metrics(list(rows[:, 0]), list(rows[:, 1] > 0), columns, G)
    metrics.update(completion_metrics(rows[:, 2], rows[:, 3] > 0))
    if config.dynamic_sampling:
        metrics["num_groups"] = len(rows) // G
    return metrics


def prompt_text(example) -> str:
    if isinstance(example.prompt, str):
        return example.prompt
    return next((m["content"] for m in reversed(example.prompt) if m.get("role") == "user"), str(example.prompt))


def make_sample(step, rollout: Rollout, examples, rewards) -> dict:
    G = rollout.group_size
    return {
        "step": step,
        "prompt": prompt_text(examples[0]),
        "answer": examples[0].answer,
        "completions": rollout.texts[:G],
        "rewards": [float(r) for r in rewards[:G]],
    }


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


def trainer_state(run: Run) -> dict:
    return {"step": run.step, "data_position": run.data_position, "seed": run.config.seed}


def save(run: Run, run_dir: Path) -> None:
    """Checkpoint the run; rank 0 alone writes (the ranks hold the same adapters)."""
    from .checkpoint import save_checkpoint

    if not distributed.is_main():
        return
    save_checkpoint(run_dir, run.model, run.optimizer, run.adapter_config, trainer_state(run), run.config.keep_checkpoints)


def prepare_run_dir(config: TrainConfig):
    """Check --output, create and lock it: (run_dir, lock). Nothing is removed here.

    A run directory is one `train` created: it holds RUN_MARKER. A new run needs a
    new or empty directory; --resume a run with a checkpoint; --overwrite a marked
    run holding only what a run writes, which `clear_old_run` empties once the new
    run has loaded. A live run's lock refuses every second `train` on it.
    """
    from .checkpoint import RUN_MARKER, RunLock

    run_dir = Path(config.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {run_dir} is a file, not a directory: choose another --output")
    lock = RunLock(run_dir)
    try:
        if lock.path.exists() and not lock.acquire():
            raise UserError(
                f"{run_dir} is in use by a running grpo-mlx train (pid {lock.holder()}): "
                "wait for it to end or stop it, or choose another --output"
            )
        check_run_dir(config, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume and not (run_dir / RUN_MARKER).exists():  # a new run in a new or empty directory
            (run_dir / RUN_MARKER).write_text("written by grpo-mlx train: --overwrite may replace this run\n")
        if not lock.acquire():  # another train created it in the meantime
            raise UserError(f"{run_dir} is in use by a running grpo-mlx train (pid {lock.holder()}): choose another --output")
    except OSError as e:
        lock.release()
        raise UserError(f"cannot prepare run directory {run_dir} ({e.strerror or e}): choose another --output")
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


def check_run_dir(config: TrainConfig, run_dir: Path) -> None:
    """Refuse an --output the requested action does not fit; see prepare_run_dir."""
    from .checkpoint import RUN_MARKER, checkpoint_dirs, foreign_entries, run_entries

    if not run_dir.is_dir():
        if config.resume:
            raise UserError(f"nothing to resume in {run_dir}: it does not exist; drop --resume to start a run")
        return
    marked = (run_dir / RUN_MARKER).exists()
    written = run_entries(run_dir)
    foreign = foreign_entries(run_dir)
    if config.resume:
        if not written:
            raise UserError(f"nothing to resume in {run_dir}: it holds no run; drop --resume to start one")
        check_same_adapters(config, run_dir)
        if not checkpoint_dirs(run_dir):
            raise UserError(
                f"no checkpoint in {run_dir}: --resume has nothing to continue from; "
                "restore its checkpoints/ folder, or pass --overwrite to start over"
            )
        return
    # Files grpo-mlx did not write: a user's folder, or a run with the user's files in it. Only a plain
    # `train` on a run of ours goes on, to the "already holds a run" message below.
    if foreign and (config.overwrite or not (marked and written)):
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        action = "--overwrite removes only a grpo-mlx run's own files" if config.overwrite else "a run needs a new or empty folder"
        raise UserError(
            f"--output {run_dir} holds files grpo-mlx did not write ({shown}): {action}; choose another --output"
        )
    if written and not config.overwrite:
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, or another --output")
    if written and not marked:
        raise UserError(
            f"{run_dir} has no {RUN_MARKER} marker (made by an older grpo-mlx, or not by grpo-mlx), so --overwrite "
            "will not delete it: delete it by hand, or choose another --output"
        )


def clear_old_run(run_dir: Path, log=lambda msg: None) -> None:
    """--overwrite: remove the old run's files, once the new run has loaded everything it needs."""
    from .checkpoint import remove_run_files, run_entries

    if not run_entries(run_dir):
        return
    try:
        remove_run_files(run_dir)
    except OSError as e:
        raise UserError(f"cannot remove the old run in {run_dir} ({e.strerror or e}): remove it by hand or choose another --output")
    log(f"removed the previous run in {run_dir} (--overwrite)")


# Fields that shape the model and its adapters: a run resumed with others would load mismatched weights.
RESUME_MUST_MATCH = ("model", "quantize", "q_bits", "q_group_size", "lora_rank", "lora_layers", "lora_scale", "dora")


def check_same_adapters(config: TrainConfig, run_dir: Path) -> None:
    """Compare with the run's config.yaml, before the model loads (`resume` checks the checkpoint itself)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return  # written atomically by us; unreadable only if edited by hand: the checkpoint decides
    if not isinstance(saved, dict):
        return
    ours = config_to_dict(config)
    changed = [f"{k} {saved[k]!r} -> {ours[k]!r}" for k in RESUME_MUST_MATCH if k in saved and saved[k] != ours[k]]
    if changed:
        raise UserError(
            f"{run_dir} holds a different run ({', '.join(changed)}): resume it with its own settings, "
            "pass --overwrite to replace it, or choose another --output"
        )


def checkpoint_mismatch(run: Run, saved_config: dict, weights: dict) -> str | None:
    """How a checkpoint's adapters differ from this run's (None: they fit).

    Compares the checkpoint's own adapter_config.json, then every saved tensor
    against the model's trainable parameters: same names, same shapes.
    """
    ours = run.adapter_config
    changed = []
    for key, flag in (("fine_tune_type", "--dora"), ("num_layers", "--lora-layers"), ("model", "--model"), ("quantized_on_load", "--quantize")):
        if saved_config.get(key) != ours.get(key):
            changed.append(f"{flag}: {saved_config.get(key)!r} -> {ours.get(key)!r}")
    for key, flag in (("rank", "--lora-rank"), ("scale", "--lora-scale")):
        saved, new = saved_config.get("lora_parameters", {}).get(key), ours["lora_parameters"][key]
        if saved != new:
            changed.append(f"{flag}: {saved!r} -> {new!r}")
    if changed:
        return ", ".join(changed)
    expected = dict(tree_flatten(run.model.trainable_parameters()))
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing or unexpected:
        def first(keys):
            return f" ({keys[0]}{', ...' if len(keys) > 1 else ''})" if keys else ""

        return f"{len(missing)} adapter tensors missing{first(missing)}, {len(unexpected)} unexpected{first(unexpected)}"
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            return f"tensor {key} has shape {tuple(weights[key].shape)}, this run's is {tuple(value.shape)}"
    return None


def resume(run: Run, run_dir: Path, log=lambda msg: None) -> None:
    """Load the newest checkpoint; with several ranks rank 0 reads it and hands it to the others.

    No readable checkpoint, or one whose adapters do not fit this run's, is an
    error: --resume never starts over.
    """
    from .checkpoint import load_latest_checkpoint

    problem = None
    if distributed.is_main():
        found = load_latest_checkpoint(run_dir, warn=log)
        if found is None:
            problem = (
                f"no readable checkpoint in {run_dir}: --resume will not start over; "
                "restore its checkpoints/ folder, or pass --overwrite to start over"
            )
        else:
            weights, optimizer_state, state, saved_config, path = found
            mismatch = checkpoint_mismatch(run, saved_config, weights)
            if mismatch:
                problem = (
                    f"checkpoint {path.name} in {run_dir} does not fit this run's adapters ({mismatch}): "
                    "resume with the run's own settings, pass --overwrite to replace it, or choose another --output"
                )
            else:
                run.model.load_weights(list(weights.items()), strict=False)  # every key and shape checked above
                run.optimizer.state = optimizer_state
                run.step, run.data_position = state["step"], state["data_position"]
    if distributed.world().size() > 1:
        if distributed.any_rank(problem is not None):  # every rank stops, none waits in a collective
            raise UserError(problem or "rank 0 could not resume the run; see its error")
        share_main_state(run)
    elif problem:
        raise UserError(problem)
    mx.eval(run.model.parameters())
    log(f"resumed from step-{run.step:06d}")


def share_main_state(run: Run) -> None:
    """Rank 0's adapters, optimizer state, step and data position, on every rank.

    The other ranks may be other machines, without the run directory.
    """
    run.optimizer.init(run.model.trainable_parameters())  # the same state tree on every rank
    run.optimizer.state = distributed.broadcast_from_main(run.optimizer.state)
    run.model.update(distributed.broadcast_from_main(run.model.trainable_parameters()))
    counters = [run.step, run.data_position] if distributed.is_main() else [0, 0]
    run.step, run.data_position = (int(x) for x in distributed.sum_across(counters))


def write_config(config: TrainConfig, run_dir: Path) -> None:
    import yaml

    from .checkpoint import atomic_write

    from .config import ONE_SHOT_ACTIONS

    # --resume and --overwrite act once: a config.yaml reused as --config must not replay them.
    values = {k: v for k, v in config_to_dict(config).items() if k not in ONE_SHOT_ACTIONS}
    text = yaml.safe_dump(values, sort_keys=False)
    atomic_write(run_dir / "config.yaml", lambda p: Path(p).write_text(text))


def run_training(config: TrainConfig, console=None) -> Path:
    """The `grpo-mlx train` command: set up, train with a dashboard, checkpoint, save."""
    # With several ranks, rank 0 alone writes the run directory and draws the dashboard.
    main = distributed.is_main()
    run_dir, lock = prepare_run_dir(config) if main else (Path(config.output), None)
    try:
        return _train_in(config, run_dir, console)
    finally:
        if lock is not None:
            lock.release()


def _train_in(config: TrainConfig, run_dir: Path, console) -> Path:
    """run_training's body, with the run directory prepared and locked."""
    from .dashboard import Dashboard
    from .rewards import RewardError
    from .run_log import MetricsLogger, keep_metrics_until

    main = distributed.is_main()
    if main:
        dashboard = Dashboard(config.steps, console=console, log_every=config.log_every)
    else:
        from rich.console import Console

        dashboard = Dashboard(config.steps, console=Console(quiet=True), plain=True)
    with dashboard:
        run = setup(config, log=dashboard.message)
        if config.overwrite and main:  # data, rewards and model loaded: only now does the old run go
            clear_old_run(run_dir, log=dashboard.message)
        if config.resume:
            resume(run, run_dir, log=dashboard.message)
            if main:
                keep_metrics_until(run_dir, run.step)
        if main:
            write_config(config, run_dir)
        logger = MetricsLogger(run_dir) if main else _NoLogger()
        stop = install_signal_handlers(dashboard.message, several_ranks=distributed.world().size() > 1)
        try:
            # A signal may reach one rank only: all stop after the same step.
            for metrics, sample in train(run, stop_requested=lambda: distributed.any_rank(stop.is_set())):
                logger.log(metrics)
                dashboard.update(metrics)
                if sample is not None and (run.step % config.sample_every == 0 or run.step == 1):
                    logger.log_sample(sample)
                    dashboard.show_sample(sample)
                if run.step % config.save_every == 0 or run.step == config.steps:
                    save(run, run_dir)
            if run.step < config.steps:  # the loop ended early: some rank was asked to stop
                save(run, run_dir)
                distributed.barrier()  # no rank exits before rank 0 saved (mlx.launch then stops the rest)
                raise Interrupted(f"interrupted: saved step {run.step} to {run_dir}; continue with --resume", stop.signum or signal.SIGINT)
        except (RewardError, NonFiniteError) as e:
            # Every rank is here: these errors are agreed on across ranks. The failing step
            # made no update: the weights are the last good ones.
            if run.step > 0:
                save(run, run_dir)
            distributed.barrier()  # no rank exits before rank 0 saved (mlx.launch then stops the rest)
            if run.step == 0:
                raise UserError(f"{e} (no step completed, nothing saved)") from e
            raise UserError(f"{e} (saved step {run.step} to {run_dir}; continue with --resume)") from e
        finally:
            stop.restore()
            logger.close()
        dashboard.message(f"adapters saved to {run_dir}")
    return run_dir


class _NoLogger:
    """Ranks other than 0 write no metrics."""

    def log(self, metrics):
        pass

    def log_sample(self, sample):
        pass

    def close(self):
        pass


class _StopFlag:
    def __init__(self):
        self._set = False
        self.signum = None  # the first signal received
        self._previous = {}

    def is_set(self):
        return self._set

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def install_signal_handlers(log, several_ranks: bool = False) -> _StopFlag:
    """First SIGINT/SIGTERM: finish the current step, save, stop. Second: exit at once.

    With several ranks SIGTERM keeps its default action, ending the process at once:
    mlx.launch sends it to the other ranks when one fails, and a rank blocked in a
    collective (waiting on the failed one) would never run a Python handler.
    """
    flag = _StopFlag()

    def handler(signum, frame):
        if flag._set:
            raise KeyboardInterrupt
        flag._set, flag.signum = True, signum
        log("stopping after this step (press Ctrl-C again to quit at once)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        action = signal.SIG_DFL if several_ranks and sig == signal.SIGTERM else handler
        try:
            flag._previous[sig] = signal.signal(sig, action)
        except ValueError:  # not in the main thread (e.g. some test runners)
            pass
    return flag
