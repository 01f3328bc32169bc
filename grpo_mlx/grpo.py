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

Losses and log-probs are float32 whatever the model's dtype.
"""

from __future__ import annotations

import mlx.core as mx

SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


# ---------------------------------------------------------------- advantages


def informative_groups(rewards, group_size: int, valid=None) -> mx.array:
    """[num_groups] bool: whether a group carries a learning signal.

    A group is informative iff its valid rows' rewards are not all equal; rows
    no reward applies to (valid False) do not count, so fewer than 2 valid rows
    is never informative. Found by comparison, not by std == 0: the mean of
    equal floats need not equal them exactly. Dynamic sampling keeps groups by
    this same rule, so a kept group never has all-zero advantages.
    """
    r = mx.array(rewards).astype(mx.float32).reshape(-1, group_size)
    w = mx.ones(r.shape, dtype=mx.bool_) if valid is None else mx.array(valid).astype(mx.bool_).reshape(-1, group_size)
    big = mx.array(float("inf"), dtype=mx.float32)
    group_max = mx.where(w, r, -big).max(axis=1)
    group_min = mx.where(w, r, big).min(axis=1)
    return group_max > group_min  # two valid rows at least, with different rewards


def group_advantages(
    rewards: mx.array,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    valid: mx.array | None = None,
) -> mx.array:
    """Group-relative advantages, DeepSeekMath §4.1.2 (outcome supervision).

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps), rows grouped
    consecutively (prompt j owns rows j*G .. j*G+G-1).

    std is the unbiased sample std (divide by G-1), as TRL computes it, so runs
    compare. scale="batch" divides by the unbiased std of the whole batch
    instead; scale="none" does not divide (Dr. GRPO).

    A group whose (valid) rewards are all equal carries no learning signal and
    gets exactly 0: never NaN, and never rounding noise divided by eps.

    `valid` ([N] bool, optional) marks rows whose reward applies; the others
    leave their group's mean and std and get advantage 0.
    """
    _check_choice("scale", scale, SCALES)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    rewards = mx.array(rewards).astype(mx.float32)
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"{n} rewards do not split into groups of {group_size}")

    w = mx.ones_like(rewards) if valid is None else mx.array(valid).astype(mx.float32)
    r = (rewards * w).reshape(-1, group_size)
    w = w.reshape(-1, group_size)
    count = w.sum(axis=1, keepdims=True)
    mean = r.sum(axis=1, keepdims=True) / mx.maximum(count, 1.0)
    centered = (r - mean) * w

    informative = informative_groups(rewards, group_size, valid)[:, None]
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


# ---------------------------------------------------------------- log-probs


def lm_head_split(model):
    """(body, head) with head(body(x)) == model(x) for mlx-lm's plain causal LMs, else None.

    Llama, Qwen, Mistral and most mlx-lm models end in `model.model` (embeddings,
    blocks, final norm) followed by `lm_head`, or by the tied embedding used as a
    linear layer. Models that do more after the head (logit soft-capping, scaling)
    share the attribute names, so `lm_head_split_matches` checks the split numerically
    before a trainer relies on it.
    """
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None
    head = getattr(model, "lm_head", None)
    if head is None and getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        embed = getattr(body, "embed_tokens", None)
        head = getattr(embed, "as_linear", None)
    return None if head is None else (body, head)


def lm_head_split_matches(model, atol: float = 1e-4) -> bool:
    """Whether head(body(x)) reproduces model(x) on a short input (see `lm_head_split`)."""
    split = lm_head_split(model)
    if split is None:
        return False
    body, head = split
    x = mx.array([[1, 2, 3, 4, 5]])
    try:
        expected, got = model(x).astype(mx.float32), head(body(x)).astype(mx.float32)
        return expected.shape == got.shape and bool(mx.allclose(expected, got, atol=atol, rtol=atol).item())
    except Exception:  # an architecture whose body needs other arguments
        return False


def token_logprobs(
    model,
    tokens: mx.array,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    start: int = 0,
    split_head: bool = False,
):
    """log pi(tokens[:, t+1] | tokens[:, :t+1]) under softmax(logits / temperature).

    The ratio, the KL and the gradient must see the same tempered policy the
    completions were sampled from. Returns float32 [N, T-1] (and the per-token
    entropy [N, T-1], without gradient, when `with_entropy`).

    `start`: positions t < start are not scored and come back as 0. A trainer
    passes the first completion position, since prompt tokens never enter the loss.
    `split_head`: run the model's body, then its LM head only on positions
    >= start (see `lm_head_split`; check it with `lm_head_split_matches` first).
    The LM head and the log-softmax over the vocabulary cost the most memory per
    token, and prompts are often as long as completions.

    Memory: the logits of the scored positions are the one full copy (one chunk
    at a time with `split_head` and `chunk_size`); the float32 log-softmax is
    never materialised whole. Each chunk of `chunk_size` positions (all at once
    when None) is cast, its logsumexp taken and the chosen token's logit gathered.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    inputs, targets = tokens[:, :-1], tokens[:, start + 1 :]
    if split_head:
        body, head = lm_head_split(model)
        hidden = body(inputs)[:, start:]
        logits_of = lambda a, b: head(hidden[:, a:b])  # noqa: E731
    else:
        logits = model(inputs)[:, start:]
        logits_of = lambda a, b: logits[:, a:b]  # noqa: E731
    return _score_targets(logits_of, targets, start, temperature, chunk_size, with_entropy)


def _score_targets(logits_of, targets, skipped: int, temperature, chunk_size, with_entropy):
    """log-softmax(logits / temperature) at `targets` [n, L], chunk by chunk, behind `skipped` zeros.

    `logits_of(a, b)` gives the logits of target positions a..b-1.
    """
    length = targets.shape[1]
    step = chunk_size or max(length, 1)
    logprob_chunks, entropy_chunks = [], []
    for a in range(0, length, step):
        chunk = logits_of(a, a + step).astype(mx.float32)
        if temperature != 1.0:
            chunk = chunk / temperature
        lse = mx.logsumexp(chunk, axis=-1)
        chosen = mx.take_along_axis(chunk, targets[:, a : a + step, None], axis=-1)[..., 0]
        logprob_chunks.append(chosen - lse)
        if with_entropy:
            c = mx.stop_gradient(chunk)
            probs = mx.softmax(c, axis=-1)
            entropy_chunks.append(mx.stop_gradient(lse) - (probs * c).sum(axis=-1))
    if skipped > 0:  # unscored prompt positions
        zeros = mx.zeros((targets.shape[0], skipped), dtype=mx.float32)
        logprob_chunks.insert(0, zeros)
        entropy_chunks.insert(0, zeros)
    logprobs = mx.concatenate(logprob_chunks, axis=1) if len(logprob_chunks) > 1 else logprob_chunks[0]
    if not with_entropy:
        return logprobs
    entropy = mx.concatenate(entropy_chunks, axis=1) if len(entropy_chunks) > 1 else entropy_chunks[0]
    return logprobs, entropy


class _SharedPromptCache:
    """One layer's keys and values of a group's prompt, handed to an mlx-lm model as its cache.

    The prompt pass records them; the completion pass sees them broadcast to every
    row of the group, ahead of its own. Concatenation only, no in-place writes, so
    the gradient reaches the prompt's keys and values (adapters act on them too).
    """

    def __init__(self):
        self.keys = self.values = None
        self.offset = 0  # positions before the current input: RoPE starts here

    def update_and_fetch(self, keys, values):
        if self.keys is None:  # the prompt pass
            self.keys, self.values, self.offset = keys, values, keys.shape[2]
            return keys, values
        rows = keys.shape[0]
        shared_keys = mx.broadcast_to(self.keys, (rows, *self.keys.shape[1:]))
        shared_values = mx.broadcast_to(self.values, (rows, *self.values.shape[1:]))
        return mx.concatenate([shared_keys, keys], axis=2), mx.concatenate([shared_values, values], axis=2)


def supports_shared_prompt(model) -> bool:
    """Whether `group_token_logprobs` reproduces `token_logprobs` on this model.

    Models with a cache of their own (`make_cache`: sliding windows, state-space
    layers) attend differently from a plain KV cache and are left out; the rest are
    checked on a small batch.
    """
    if hasattr(model, "make_cache") or not hasattr(model, "layers"):
        return False
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 7, 6, 5], [1, 2, 3, 4, 5, 5, 0]])
    try:
        expected = token_logprobs(model, tokens)[:, 3:]
        got = group_token_logprobs(model, tokens, [(0, 3, 4)])[:, 3:]
        return bool(mx.allclose(expected, got, atol=1e-4, rtol=1e-4).item())
    except Exception:  # an architecture whose layers want another cache
        return False


def group_token_logprobs(model, tokens, groups, temperature: float = 1.0, chunk_size: int | None = None,
                         with_entropy: bool = False):
    """`token_logprobs` for rows that share prompts, each prompt run once per group.

    `groups`: (first_row, end_row, prompt_length) covering the rows in order; the
    rows of a group hold the same tokens[:, :prompt_length]. GRPO's G completions of
    one prompt are such a group: the prompt's forward (and backward) then costs one
    row instead of G. Returns [N, T-1] like `token_logprobs`, with 0 before each
    group's first completion position (prompt_length - 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    split = lm_head_split(model)
    width = tokens.shape[1]
    logprob_parts, entropy_parts = [], []
    for first, end, prompt_length in groups:
        cache = [_SharedPromptCache() for _ in model.layers]
        if prompt_length > 1:  # all prompt tokens but the last, which predicts the first completion token
            prefix = tokens[first : first + 1, : prompt_length - 1]
            split[0](prefix, cache=cache) if split else model(prefix, cache=cache)
        rows = tokens[first:end]
        inputs, targets = rows[:, prompt_length - 1 : -1], rows[:, prompt_length:]
        cache = cache if prompt_length > 1 else None
        if split:
            hidden = split[0](inputs, cache=cache)
            logits_of = lambda a, b, h=hidden: split[1](h[:, a:b])  # noqa: E731
        else:
            logits = model(inputs, cache=cache)
            logits_of = lambda a, b, x=logits: x[:, a:b]  # noqa: E731
        scored = _score_targets(logits_of, targets, prompt_length - 1, temperature, chunk_size, with_entropy)
        logprob_parts.append(scored[0] if with_entropy else scored)
        if with_entropy:
            entropy_parts.append(scored[1])
    assert all(p.shape[1] == width - 1 for p in logprob_parts)
    logprobs = mx.concatenate(logprob_parts, axis=0) if len(logprob_parts) > 1 else logprob_parts[0]
    if not with_entropy:
        return logprobs
    entropy = mx.concatenate(entropy_parts, axis=0) if len(entropy_parts) > 1 else entropy_parts[0]
    return logprobs, entropy


# ---------------------------------------------------------------- loss


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


def policy_loss_terms(
    logprobs: mx.array,
    old_logprobs: mx.array,
    ref_logprobs: mx.array | None,
    advantages: mx.array,
    completion_mask: mx.array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    kl_estimator: str = "k3",
    loss_type: str = "grpo",
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_sequences: int | float | None = None,
    num_tokens: int | float | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """`policy_loss` with metrics left as 0-d arrays, for use under mx.compile."""
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high

    mask = completion_mask.astype(mx.float32)
    logprobs = logprobs.astype(mx.float32)
    old_logprobs = old_logprobs.astype(mx.float32)
    lengths = mask.sum(axis=-1)
    safe_lengths = mx.maximum(lengths, 1.0)  # zero-length completions add 0, never NaN
    total_tokens = mx.maximum(mask.sum(), 1.0)

    log_ratio = (logprobs - old_logprobs) * mask
    if importance_level == "sequence":
        # GSPO: s_i = exp(mean_t log ratio), one ratio per sequence, broadcast.
        seq_log_ratio = log_ratio.sum(axis=-1) / safe_lengths
        log_ratio = mx.broadcast_to(seq_log_ratio[:, None], mask.shape)
    ratio = mx.exp(log_ratio)

    a = advantages.astype(mx.float32)[:, None]
    unclipped = ratio * a
    clipped = mx.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a
    per_token = -mx.minimum(unclipped, clipped)

    use_kl = ref_logprobs is not None and beta != 0.0
    if ref_logprobs is not None:
        kl = kl_divergence(logprobs, ref_logprobs.astype(mx.float32), kl_estimator)
        if use_kl:
            per_token = per_token + beta * kl
        mean_kl = (kl * mask).sum() / total_tokens
    else:
        mean_kl = mx.array(0.0)

    masked_sum = (per_token * mask).sum()
    if loss_type == "grpo":
        # DeepSeekMath Eq. 3: mean over each sequence's tokens, then over sequences.
        n = per_token.shape[0] if num_sequences is None else num_sequences
        loss = ((per_token * mask).sum(axis=-1) / safe_lengths).sum() / n
    elif loss_type == "bnpo":
        # Token-level mean over this batch's completion tokens.
        loss = masked_sum / total_tokens
    elif loss_type == "dr_grpo":
        # Dr. GRPO: a constant normaliser, so no length bias.
        n = per_token.shape[0] if num_sequences is None else num_sequences
        max_len = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_sum / (n * max_len)
    else:
        # DAPO: token-level mean over the global batch's completion tokens.
        denom = total_tokens if num_tokens is None else max(float(num_tokens), 1.0)
        loss = masked_sum / denom

    low = ((ratio < 1.0 - epsilon_low) & (a < 0)).astype(mx.float32)
    high = ((ratio > 1.0 + epsilon_high) & (a > 0)).astype(mx.float32)
    region = ((ratio < 1.0 - epsilon_low) | (ratio > 1.0 + epsilon_high)).astype(mx.float32)
    metrics = {
        "kl": mean_kl,
        "clip_ratio/low_mean": (low * mask).sum() / total_tokens,
        "clip_ratio/high_mean": (high * mask).sum() / total_tokens,
        "clip_ratio/region_mean": (region * mask).sum() / total_tokens,
        "ratio/mean": (ratio * mask).sum() / total_tokens,
    }
    return loss, metrics


def policy_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    ref_logprobs: mx.array | None,
    advantages: mx.array,
    completion_mask: mx.array,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    kl_estimator: str = "k3",
    loss_type: str = "grpo",
    importance_level: str = "token",
    max_completion_length: int | None = None,
    num_sequences: int | float | None = None,
    num_tokens: int | float | None = None,
) -> tuple[mx.array, dict[str, float]]:
    """The clipped surrogate objective with a KL penalty (DeepSeekMath Eq. 3), negated.

    ratio     = exp(logprobs - old_logprobs), or with importance_level="sequence"
                GSPO's exp(mean_t(logprobs - old_logprobs)) broadcast over tokens
    per_token = -min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
                + beta * KL(pi || ref)          (no KL when ref_logprobs is None or beta == 0)

    Reduction by `loss_type`:
      "grpo"    mean over each sequence's tokens, then sum / num_sequences (DeepSeekMath)
      "bnpo"    sum over tokens / completion tokens in this batch
      "dr_grpo" sum over tokens / (num_sequences * max_completion_length) (Dr. GRPO)
      "dapo"    sum over tokens / num_tokens, the global batch's completion tokens (DAPO)
    `num_sequences` and `num_tokens` default to this batch's counts; a trainer that
    splits a batch into micro-batches or ranks passes the global counts so the
    summed gradients equal the full batch's. `max_completion_length` defaults to
    the mask's width.

    Arrays are [N, T] (advantages [N]); completion_mask marks the completion
    tokens. Returns the scalar loss and metrics as Python floats: `kl` (mean
    per-token KL, whatever beta), `clip_ratio/low_mean` (ratio < 1-eps_low with
    A < 0), `clip_ratio/high_mean` (ratio > 1+eps_high with A > 0),
    `clip_ratio/region_mean` (outside the clip range), `ratio/mean`, all
    averaged over completion tokens.
    """
    loss, metrics = policy_loss_terms(
        logprobs,
        old_logprobs,
        ref_logprobs,
        advantages,
        completion_mask,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        beta=beta,
        kl_estimator=kl_estimator,
        loss_type=loss_type,
        importance_level=importance_level,
        max_completion_length=max_completion_length,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
    )
    return loss, {k: float(v.item()) for k, v in metrics.items()}
