"""Gradient plumbing: the loss closure, the (compiled) gradient step, micro-batches,
gradient accumulation, and the log-prob passes without gradient.

Which log-prob path runs (one prompt pass per group, logits on completion positions
only, or the plain forward over every position) is chosen once in `trainer.setup`
and passed in as `split_head` and `batch_groups`; the micro-batch size and the
logits chunk (`chunk_size`) come from the memory plan (memory/planner.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ..core.config import TrainConfig
from ..model.logprobs import checkpointed_block_call, group_token_logprobs, token_logprobs
from .grpo import policy_loss

LENGTH_BUCKET = 32  # pad batches to multiples of this: few distinct shapes


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass.

    Patches the block *class* for the whole process, as mlx-lm's grad_checkpoint does,
    with `checkpointed_block_call` (which keeps a shared prompt's gradient); patching it
    twice would nest checkpoints, so it is done once per class.
    """
    block = type(model.layers[0])
    if not getattr(block, "_grpo_mlx_checkpointed", False):
        block.__call__ = checkpointed_block_call(block.__call__)
        block._grpo_mlx_checkpointed = True


def make_loss_fn(config: TrainConfig, split_head: bool = False, chunk_size: int | None = None, prefix=None):
    """The loss of one micro-batch: (loss, (metrics, logprobs)), traceable by mx.compile.

    `normaliser` (0-d) is `grpo.loss_normaliser` of the whole batch's counts.
    Everything that changes from step to step is an array, so a new batch or
    token count reuses the compiled graph. `old_logprobs`
    None means the sampling policy is the current one (mu = 1, or the first of
    mu updates): its log-probs are the stop-gradient of this forward's, which
    the function also returns so later updates can reuse them. `chunk_size`: LM-head
    positions per chunk (see `token_logprobs`); None: all at once. `prefix`: the frozen blocks'
    recorded output (`frozen_prefix.PrefixStates`, replaying), or None.
    """
    def loss_fn(model, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, normaliser, start=0, groups=None):
        logprobs, entropy = policy_logprobs(model, tokens, config.temperature, start, split_head, groups, with_entropy=True,
                                            chunk_size=chunk_size, prefix=prefix)
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


def policy_logprobs(model, tokens, temperature, start=0, split_head=False, groups=None, with_entropy=False,
                    chunk_size=None, prefix=None):
    """Token log-probs of a padded batch: per prompt group when `groups` is given
    (`group_token_logprobs`: each prompt runs once), else row by row from `start`."""
    if groups is not None:
        return group_token_logprobs(model, tokens, groups, temperature, chunk_size=chunk_size, with_entropy=with_entropy,
                                    prefix=prefix)
    return token_logprobs(model, tokens, temperature, chunk_size=chunk_size, with_entropy=with_entropy, start=start,
                          split_head=split_head, prefix=prefix)


def prompt_groups(prompt_tokens, rows: slice) -> tuple:
    """(first_row, end_row, prompt_length) of each run of rows sharing a prompt, within `rows`,
    counted from rows.start: a micro-batch's groups for `group_token_logprobs`."""
    groups, first = [], rows.start
    for i in range(rows.start + 1, rows.stop + 1):
        if i == rows.stop or prompt_tokens[i] != prompt_tokens[first]:
            groups.append((first - rows.start, i - rows.start, len(prompt_tokens[first])))
            first = i
    return tuple(groups)


def make_grad_step(model: nn.Module, config: TrainConfig, split_head: bool = False, chunk_size: int | None = None,
                   prefix=None):
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
    loss_and_grad = nn.value_and_grad(model, make_loss_fn(config, split_head, chunk_size, prefix))

    def grad_step(tokens, completion_mask, advantages, old_logprobs, ref_logprobs, normaliser, start=0, groups=None):
        return loss_and_grad(model, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, normaliser, start, groups)

    if not config.compile:
        return grad_step
    state = [model.state, mx.random.state]  # random state: LoRA dropout draws inside the step
    return mx.compile(grad_step, inputs=state, outputs=state)


def accumulate_gradients(grad_step, tokens, completion_mask, advantages, old_logprobs, ref_logprobs, batches, normaliser,
                         start=0, batch_groups=None, widths=None):
    """Sum the micro-batches' gradients; returns (grads, loss, micro_batch_stats, logprobs).

    `micro_batch_stats` holds (completion tokens, metrics) per micro-batch for weighting;
    `logprobs` the current policy's for every row, for later updates' ratios.
    `batch_groups`: each micro-batch's `prompt_groups`, or None. `widths`: each micro-batch's
    tokens width (`micro_batch_widths`), or None: the whole batch's.
    """
    normaliser = mx.array(normaliser, dtype=mx.float32)
    grads, loss, micro_batch_stats, micro_batch_logprobs = None, 0.0, [], []
    full = tokens.shape[1]
    for b, groups, w in zip(batches, batch_groups or [None] * len(batches), widths or [full] * len(batches)):
        (mb_loss, (m, lp)), g = grad_step(
            tokens[b, :w],
            completion_mask[b, : w - 1],
            advantages[b],
            None if old_logprobs is None else old_logprobs[b, : w - 1],
            None if ref_logprobs is None else ref_logprobs[b, : w - 1],
            normaliser,
            start,
            groups,
        )
        lp = _pad_positions(lp, full - 1)
        # The forward's outputs first, then the gradient: evaluated together, MLX may schedule the
        # entropy's use of the logits late and hold one or two more [rows, positions, V] arrays at
        # the peak, depending on the layer count (measured; see memory/estimate.py).
        mx.eval(mb_loss, m, lp)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(grads)
        loss += mb_loss.item()
        micro_batch_stats.append((float(completion_mask[b].sum().item()), {k: v.item() for k, v in m.items()}))
        micro_batch_logprobs.append(lp)
    return grads, loss, micro_batch_stats, mx.concatenate(micro_batch_logprobs, axis=0)


def first_scored_position(prompt_tokens) -> int:
    """The first position whose next token is a completion token in some row, rounded down
    to a LENGTH_BUCKET multiple (few distinct shapes for a compiled step). Positions before
    it predict prompt tokens only: no logits are formed there."""
    first = min(len(p) for p in prompt_tokens) - 1
    return first // LENGTH_BUCKET * LENGTH_BUCKET


def plan_micro_batches(prompt_tokens, micro_batch_size: int | None, shared_prompt: bool):
    """(start, batches, batch_groups) for a padded batch of these prompts' rows.

    `start`: the first scored position (`first_scored_position`); `batches`: the
    micro-batches' row slices of `micro_batch_size` rows (the memory plan's; None: one);
    micro-batches accumulate to the same gradient (policy_loss is normalised by the whole
    batch), so their size bounds memory without changing the update. `batch_groups`: each
    micro-batch's `prompt_groups` when a group's prompt runs once for its rows, else None.
    """
    start = first_scored_position(prompt_tokens)
    batches = micro_batches(len(prompt_tokens), micro_batch_size)
    batch_groups = [prompt_groups(prompt_tokens, b) for b in batches] if shared_prompt else None
    return start, batches, batch_groups


def micro_batch_widths(prompt_tokens, completion_tokens, batches, bucket: int = 1) -> list[int]:
    """Each micro-batch's tokens width: its longest row, rounded up to `bucket` (a compiled step's
    LENGTH_BUCKET: few shapes). The batch is as wide as its longest row over all micro-batches;
    past a micro-batch's own longest row there is padding only, which no pass needs to run."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_tokens, completion_tokens)]
    return [-(-max(lengths[b]) // bucket) * bucket for b in batches]


def groups_by_length(prompt_tokens, completion_tokens, group_size: int) -> list[int]:
    """The groups (rows g*G .. g*G+G-1) ordered by their longest row, then prompt: consecutive
    micro-batches then hold rows of similar length, and a shared-prompt micro-batch similar prompts."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_tokens, completion_tokens)]
    groups = range(len(lengths) // group_size)
    key = lambda g: (max(lengths[g * group_size : (g + 1) * group_size]), len(prompt_tokens[g * group_size]))  # noqa: E731
    return sorted(groups, key=key)


def _pad_positions(logprobs, width: int):
    """[rows, w] log-probs (or entropies) of a trimmed micro-batch, zero-padded back to `width` positions."""
    missing = width - logprobs.shape[1]
    return mx.pad(logprobs, [(0, 0), (0, missing)]) if missing > 0 else logprobs


def micro_batches(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, size)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def forward_logprobs(model, tokens, temperature, batches, start=0, split_head=False, batch_groups=None,
                     chunk_size=None, prefix=None, widths=None) -> mx.array:
    """Log-probs without gradient, one micro-batch at a time (old or reference policy); `prefix`
    (recording) keeps each micro-batch's frozen-block output for the passes after this one.
    `widths`: as in `accumulate_gradients`."""
    micro_batch_logprobs = []
    full = tokens.shape[1]
    for b, groups, w in zip(batches, batch_groups or [None] * len(batches), widths or [full] * len(batches)):
        lp = mx.stop_gradient(policy_logprobs(model, tokens[b, :w], temperature, start, split_head, groups,
                                              chunk_size=chunk_size, prefix=prefix))
        lp = _pad_positions(lp, full - 1)
        mx.eval(lp, *(prefix.states if prefix is not None else ()))
        micro_batch_logprobs.append(lp)
    return mx.concatenate(micro_batch_logprobs, axis=0)
