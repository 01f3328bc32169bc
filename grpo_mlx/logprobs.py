"""Token log-probs of a policy: log pi(token | prefix) under the sampling temperature.

The ratio, the KL and the gradient of the GRPO loss (grpo.py) all read these.
Three ways to compute them, each checked to give the same numbers:

- `token_logprobs`: the plain forward, row by row, optionally from a first
  scored position so prompt-only positions form no logits;
- `split_head=True`: the model's body, then its LM head only on the scored
  positions (`lm_head_split`, checked by `lm_head_split_matches`);
- `group_token_logprobs`: rows sharing a prompt (GRPO's G completions) run the
  prompt once, through a shared-prompt cache (checked by `supports_shared_prompt`).

Log-probs are float32 whatever the model's dtype.
"""

from __future__ import annotations

import mlx.core as mx

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
