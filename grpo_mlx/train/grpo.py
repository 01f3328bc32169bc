"""The GRPO math as pure functions of arrays.

Each function names the equation it implements, so it can be checked against the
papers:

- DeepSeekMath (arXiv:2402.03300), Eq. 3: group-relative advantages and the
  PPO-clipped objective with a KL penalty to the reference policy.
- Dr. GRPO (arXiv:2503.20783): no std scaling of advantages, and a constant
  normaliser N * L_max instead of per-sequence length means.
- DAPO (arXiv:2503.14476): decoupled clip range (epsilon_low, epsilon_high) and
  token-level normalisation over the global batch.
- GSPO (arXiv:2507.18071): a length-normalised sequence-level importance ratio.

Losses are float32 whatever the model's dtype. The token log-probs they read
come from logprobs.py.
"""

from __future__ import annotations

import mlx.core as mx

from ..core.config import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_TYPES, SCALES  # the choice names, defined without MLX


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


# ---------------------------------------------------------------- advantages


def informative_groups(rewards, group_size: int, applicable=None) -> mx.array:
    """[num_groups] bool: whether a group carries a learning signal.

    A group is informative iff its applicable rows' rewards are not all equal; rows
    no reward applies to (applicable False) do not count, so fewer than 2 applicable rows
    is never informative. Found by comparison, not by std == 0: the mean of
    equal floats need not equal them exactly. Dynamic sampling keeps groups by
    this same rule, so a kept group never has all-zero advantages.
    """
    r = mx.array(rewards).astype(mx.float32).reshape(-1, group_size)
    w = mx.ones(r.shape, dtype=mx.bool_) if applicable is None else mx.array(applicable).astype(mx.bool_).reshape(-1, group_size)
    big = mx.array(float("inf"), dtype=mx.float32)
    group_max = mx.where(w, r, -big).max(axis=1)
    group_min = mx.where(w, r, big).min(axis=1)
    return group_max > group_min  # two applicable rows at least, with different rewards


def group_advantages(
    rewards: mx.array,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    applicable: mx.array | None = None,
) -> mx.array:
    """Group-relative advantages, DeepSeekMath §4.1.2 (outcome supervision).

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps), rows grouped
    consecutively (prompt j owns rows j*G .. j*G+G-1).

    std is the unbiased sample std (divide by G-1), as TRL computes it, so runs
    compare. scale="batch" divides by the unbiased std of the whole batch
    instead; scale="none" does not divide (Dr. GRPO).

    A group whose (applicable) rewards are all equal carries no learning signal and
    gets exactly 0: never NaN, and never rounding noise divided by eps.

    `applicable` ([N] bool, optional) marks rows whose reward applies; the others
    leave their group's mean and std and get advantage 0.
    """
    _check_choice("scale", scale, SCALES)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rewards = mx.array(rewards).astype(mx.float32)
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")

    w = mx.ones_like(rewards) if applicable is None else mx.array(applicable).astype(mx.float32)
    r = (rewards * w).reshape(-1, group_size)
    w = w.reshape(-1, group_size)
    count = w.sum(axis=1, keepdims=True)
    mean = r.sum(axis=1, keepdims=True) / mx.maximum(count, 1.0)
    centered = (r - mean) * w

    informative = informative_groups(rewards, group_size, applicable)[:, None]
    centered = mx.where(informative, centered, 0.0)

    if scale == "group":
        var = (centered * centered).sum(axis=1, keepdims=True) / mx.maximum(count - 1.0, 1.0)
        advantages = centered / (mx.sqrt(var) + eps)
    elif scale == "batch":
        flat_w = w.reshape(-1)
        total = mx.maximum(flat_w.sum(), 1.0)
        batch_mean = (rewards * flat_w).sum() / total
        dev = (rewards - batch_mean) * flat_w
        batch_std = mx.sqrt((dev * dev).sum() / mx.maximum(total - 1.0, 1.0))
        advantages = centered / (batch_std + eps)
    else:
        advantages = centered
    return mx.where(informative, advantages, 0.0).reshape(-1)


# ---------------------------------------------------------------- loss


def loss_normaliser(
    loss_type: str, num_sequences: float, num_tokens: float, batch_tokens: float, max_completion_length: int
) -> float:
    """The factor that turns the summed loss (`reduce_loss`) into `loss_type`'s mean.

    The one place the reduction table lives:
      "grpo"    1 / num_sequences: the mean over sequences of each sequence's
                token mean (DeepSeekMath Eq. 3; the token means are in `reduce_loss`)
      "bnpo"    1 / batch_tokens: the mean over this process's completion tokens
      "dr_grpo" 1 / (num_sequences * max_completion_length): a constant, so no
                length bias (Dr. GRPO)
      "dapo"    1 / num_tokens: the mean over the global batch's completion tokens (DAPO)
    The counts are the whole batch's, so the micro-batches' (and ranks')
    normalised losses and gradients add up to the full batch's. A count of 0
    divides by 1: no completion tokens give a loss of 0, never a NaN.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if loss_type == "grpo":
        return 1.0 / max(num_sequences, 1.0)
    if loss_type == "dr_grpo":
        return 1.0 / max(num_sequences, 1.0) / max_completion_length
    if loss_type == "bnpo":
        return 1.0 / max(batch_tokens, 1.0)
    return 1.0 / max(num_tokens, 1.0)


def importance_ratio(logprobs: mx.array, old_logprobs: mx.array, mask: mx.array, level: str = "token") -> mx.array:
    """pi / pi_old per token: exp(log pi - log pi_old) (DeepSeekMath Eq. 3), or with
    level="sequence" GSPO's exp(mean_t(log pi - log pi_old)), one per sequence, broadcast."""
    _check_choice("importance_level", level, IMPORTANCE_LEVELS)
    log_ratio = (logprobs - old_logprobs) * mask
    if level == "sequence":
        lengths = mx.maximum(mask.sum(axis=-1), 1.0)  # zero-length completions: ratio 1, never NaN
        log_ratio = mx.broadcast_to((log_ratio.sum(axis=-1) / lengths)[:, None], mask.shape)
    return mx.exp(log_ratio)


def clipped_surrogate(ratio: mx.array, advantages: mx.array, epsilon_low: float, epsilon_high: float) -> mx.array:
    """-min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A) per token:
    PPO's pessimistic objective (DeepSeekMath Eq. 3), negated to a loss; A [N] is broadcast over tokens."""
    a = advantages[:, None]
    return -mx.minimum(ratio * a, mx.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a)


def kl_divergence(logprobs: mx.array, ref_logprobs: mx.array, estimator: str = "k3") -> mx.array:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, 2020).

    k1 = log(pi/ref); k2 = 0.5 * log(pi/ref)^2; k3 = ref/pi - log(ref/pi) - 1
    (unbiased and non-negative; the DeepSeekMath choice, Eq. 4).
    """
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    log_ref_over_pi = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ref_over_pi
    if estimator == "k2":
        return 0.5 * log_ref_over_pi * log_ref_over_pi
    return mx.exp(log_ref_over_pi) - log_ref_over_pi - 1.0


def reduce_loss(per_token: mx.array, mask: mx.array, loss_type: str) -> mx.array:
    """The batch's per-token losses summed, before `loss_normaliser`.

    "grpo" sums each sequence's mean over its own tokens (only the loss sees
    each sequence's length); the other loss types sum over all completion tokens.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)).sum()
    return masked.sum()


def clip_metrics(ratio: mx.array, advantages: mx.array, mask: mx.array, epsilon_low: float, epsilon_high: float) -> dict:
    """Fractions of completion tokens: `clip_ratio/low_mean` (ratio < 1-eps_low with A < 0),
    `clip_ratio/high_mean` (ratio > 1+eps_high with A > 0), `clip_ratio/region_mean`
    (outside the clip range), and the mean ratio `ratio/mean`."""
    a = advantages[:, None]
    below, above = ratio < 1.0 - epsilon_low, ratio > 1.0 + epsilon_high
    tokens = mx.maximum(mask.sum(), 1.0)

    def token_mean(x):
        return (x.astype(mx.float32) * mask).sum() / tokens

    return {
        "clip_ratio/low_mean": token_mean(below & (a < 0)),
        "clip_ratio/high_mean": token_mean(above & (a > 0)),
        "clip_ratio/region_mean": token_mean(below | above),
        "ratio/mean": token_mean(ratio),
    }


def policy_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    ref_logprobs: mx.array | None,
    advantages: mx.array,
    completion_mask: mx.array,
    *,
    normaliser: float | mx.array,
    epsilon_low: float,
    beta: float,
    epsilon_high: float | None = None,
    kl_estimator: str = "k3",
    loss_type: str = "grpo",
    importance_level: str = "token",
) -> tuple[mx.array, dict[str, mx.array]]:
    """The clipped surrogate objective with a KL penalty (DeepSeekMath Eq. 3), negated:

    per_token = clipped_surrogate(importance_ratio, A) + beta * KL(pi || ref)
    loss      = reduce_loss(per_token) * normaliser      (normaliser: `loss_normaliser`)

    `epsilon_low` and `beta` have no defaults: a caller that forgot one would train silently with
    another value. No KL term when ref_logprobs is None or beta == 0. Arrays are [N, T]
    (advantages [N]); completion_mask marks the completion tokens. Returns the
    scalar loss and metrics as 0-d arrays (traceable by mx.compile): `kl` (mean
    per-token KL, whatever beta) and `clip_metrics`, averaged over this batch's
    completion tokens.
    """
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = completion_mask.astype(mx.float32)
    logprobs = logprobs.astype(mx.float32)
    advantages = advantages.astype(mx.float32)

    ratio = importance_ratio(logprobs, old_logprobs.astype(mx.float32), mask, importance_level)
    per_token = clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high)
    mean_kl = mx.array(0.0)
    if ref_logprobs is not None:
        kl = kl_divergence(logprobs, ref_logprobs.astype(mx.float32), kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * kl
        mean_kl = (kl * mask).sum() / mx.maximum(mask.sum(), 1.0)

    loss = reduce_loss(per_token, mask, loss_type) * normaliser
    return loss, {"kl": mean_kl, **clip_metrics(ratio, advantages, mask, epsilon_low, epsilon_high)}
