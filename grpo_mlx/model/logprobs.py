"""Token log-probs of a policy: log pi(token | prefix) under the sampling temperature.

The ratio, the KL and the gradient of the GRPO loss (grpo.py) all read these.
Three ways to compute them, each checked to give the same numbers:

- `token_logprobs`: the plain forward, row by row, optionally from a first
  scored position so prompt-only positions form no logits;
- `split_head=True`: the model's body, then its LM head only on the scored
  positions (`lm_head_split`, checked by `lm_head_split_matches`);
- `group_token_logprobs`: rows sharing a prompt (GRPO's G completions) run the
  prompt once. Two model calls per micro-batch whatever its number of groups: the
  prompts in one; every completion, against its group's keys and values (a
  shared-prompt cache), in the other (checked by `supports_shared_prompt`).
  `checkpointed_block_call` keeps this exact under gradient checkpointing.

Log-probs are float32 whatever the model's dtype.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

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
    prefix=None,
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

    `prefix`: a `frozen_prefix.PrefixStates` that records or replays the frozen blocks' output
    (with `split_head` only).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    inputs, targets = tokens[:, :-1], tokens[:, start + 1 :]
    if split_head:
        body, head = lm_head_split(model)
        body = body if prefix is None else prefix.wrap(body)
        return head_logprobs(head, body(inputs)[:, start:], targets, start, temperature, chunk_size, with_entropy)
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
        logits, chunk_targets = logits_of(a, a + step), targets[:, a : a + step]
        if with_entropy:
            logprob, entropy = _scores_with_entropy(logits, chunk_targets, temperature)
            entropy_chunks.append(entropy)
        else:
            logprob = _tempered_scores(logits, chunk_targets, temperature)[0]
        logprob_chunks.append(logprob)
    if skipped > 0:  # unscored prompt positions
        zeros = mx.zeros((targets.shape[0], skipped), dtype=mx.float32)
        logprob_chunks.insert(0, zeros)
        entropy_chunks.insert(0, zeros)
    logprobs = mx.concatenate(logprob_chunks, axis=1) if len(logprob_chunks) > 1 else logprob_chunks[0]
    if not with_entropy:
        return logprobs
    entropy = mx.concatenate(entropy_chunks, axis=1) if len(entropy_chunks) > 1 else entropy_chunks[0]
    return logprobs, entropy


def _tempered(logits, temperature):
    """The float32 logits / temperature."""
    logits = logits.astype(mx.float32)
    return logits / temperature if temperature != 1.0 else logits


def _tempered_scores(logits, targets, temperature):
    """(log-softmax(logits / temperature) at `targets`, the float32 tempered logits, their logsumexp)."""
    logits = _tempered(logits, temperature)
    lse = mx.logsumexp(logits, axis=-1)
    return mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse, logits, lse


def _entropy(logits, lse):
    return lse - (mx.softmax(logits, axis=-1) * logits).sum(axis=-1)


def _scores_with_entropy(logits, targets, temperature):
    """(`_tempered_scores`' log-probs, the entropy without gradient) from one exp over the vocabulary.

    The gradient passes want both. The exp is what costs here (on a CPU about as much as the LM
    head's matmul): logsumexp, a softmax for the entropy and logsumexp's VJP would take three;
    here one exp gives the normaliser and the entropy, and its VJP reuses its output. What the
    backward keeps is that output instead of the logits (memory/estimate.py).
    """
    logits = _tempered(logits, temperature)
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))  # range only: it cancels in the value
    exp_logits = mx.exp(logits - top)
    total = exp_logits.sum(axis=-1)
    lse = top[..., 0] + mx.log(total)
    # sum(exp_logits * logits) as a batch of [1, V] @ [V, 1] products: no [rows, T, V] product array.
    expected_logit = (exp_logits[..., None, :] @ logits[..., :, None])[..., 0, 0] / total
    entropy = mx.stop_gradient(lse - expected_logit)
    return mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse, entropy


def head_logprobs(head, hidden, targets, skipped: int, temperature, chunk_size, with_entropy):
    """`_score_targets` of head(hidden): the LM head and log-softmax chunk by chunk, forward and backward.

    With `chunk_size` the gradient holds no logits: a custom VJP recomputes each chunk's
    logits from `hidden` in the backward pass, so the autodiff keeps `hidden` [n, L, d]
    instead of every chunk's [n, chunk, vocabulary] logits and their softmax (MLX's own
    VJP would save them all: the whole backward graph is built at once). The cost is one
    more LM-head matmul per chunk. The head's own weights get no gradient here (they are
    frozen under LoRA), so this runs only when the head has no trainable parameters.
    """
    length = targets.shape[1]
    if chunk_size is None or chunk_size >= length or _has_trainable(head):
        return _score_targets(lambda a, b: head(hidden[:, a:b]), targets, skipped, temperature, chunk_size, with_entropy)
    spans = [(a, min(a + chunk_size, length)) for a in range(0, length, chunk_size)]

    def chunk_scores(h, a, b):
        return _tempered_scores(head(h), targets[:, a:b], temperature)

    # MLX schedules a graph level by level, so independent chunks would all hold their logits at
    # once: each chunk's head input is made to depend on the previous chunk's result (mx.depends).
    @mx.custom_function
    def scores(hidden):
        logprobs, entropy, previous = [], [], []
        for a, b in spans:
            h = mx.depends(hidden[:, a:b], previous) if previous else hidden[:, a:b]
            logprob, logits, lse = chunk_scores(h, a, b)
            logprobs.append(logprob)
            entropy.append(_entropy(logits, lse) if with_entropy else lse)
            previous = [logprobs[-1], entropy[-1]]
        return mx.concatenate(logprobs, axis=1), mx.concatenate(entropy, axis=1)

    @scores.vjp
    def scores_vjp(primals, cotangents, outputs):
        hidden = primals[0] if isinstance(primals, (tuple, list)) else primals
        upstream = cotangents[0]  # the entropy is a metric: no gradient
        grads = []
        for a, b in spans:
            h = mx.depends(hidden[:, a:b], grads[-1]) if grads else hidden[:, a:b]
            grads.append(mx.vjp(lambda h: chunk_scores(h, a, b)[0], [h], [upstream[:, a:b]])[1][0])
        return mx.concatenate(grads, axis=1)

    logprobs, entropy = scores(hidden)
    if skipped > 0:  # unscored prompt positions
        zeros = mx.zeros((targets.shape[0], skipped), dtype=mx.float32)
        logprobs, entropy = mx.concatenate([zeros, logprobs], axis=1), mx.concatenate([zeros, entropy], axis=1)
    return (logprobs, mx.stop_gradient(entropy)) if with_entropy else logprobs


def _has_trainable(module) -> bool:
    from mlx.utils import tree_flatten

    owner = getattr(module, "__self__", module)  # a tied embedding's bound as_linear
    return hasattr(owner, "trainable_parameters") and bool(tree_flatten(owner.trainable_parameters()))


class _SharedPromptCache:
    """One layer's `cache` argument for the two calls of `group_token_logprobs`.

    The prompt call records the K prompts' keys and values [K, heads, S, d]. The
    completion call (after `to_completions`) hands each row its group's keys and values,
    gathered by group index, ahead of its own: a gather and a concatenation, no in-place
    writes, so the gradient reaches the prompts' keys and values (adapters act on them
    too). mlx-lm models start RoPE at `offset`, and with no `make_mask` here they mask
    causally, which with the prompt's keys ahead is what the completion call needs.
    """

    def __init__(self):
        self.keys = self.values = self.row_group = None
        self.offset = 0

    def to_completions(self, row_group, offset: int):
        self.row_group, self.offset = row_group, offset

    def update_and_fetch(self, keys, values):
        if self.row_group is None:  # the prompt call
            self.keys, self.values = keys, values
            return keys, values
        prompt_keys = mx.take(self.keys, self.row_group, axis=0)
        prompt_values = mx.take(self.values, self.row_group, axis=0)
        return mx.concatenate([prompt_keys, keys], axis=2), mx.concatenate([prompt_values, values], axis=2)


def checkpointed_block_call(call):
    """A transformer block's `call` that recomputes its activations in the backward pass.

    mlx-lm's grad_checkpoint wraps the block in mx.checkpoint, which carries the gradient
    of its inputs and outputs only: keys and values a shared-prompt cache recorded inside
    it would lose theirs. Here they go in and out of the checkpointed function as arrays:
    the prompt call returns each layer's keys and values, the completion call takes them.
    """

    def block_call(block, *args, **kwargs):
        shared = next((a for a in (*args, *kwargs.values()) if isinstance(a, _SharedPromptCache)), None)

        def run(params, prompt_kv, *args, **kwargs):
            block.update(params)
            if shared is None:
                return call(block, *args, **kwargs)
            inner = _SharedPromptCache()  # a fresh one per (re)computation: no side effects
            if prompt_kv:
                inner.keys, inner.values = prompt_kv
                inner.to_completions(shared.row_group, shared.offset)
            swap = lambda a: inner if isinstance(a, _SharedPromptCache) else a  # noqa: E731
            out = call(block, *map(swap, args), **{k: swap(v) for k, v in kwargs.items()})
            return out if prompt_kv else (out, inner.keys, inner.values)

        prompt_kv = (shared.keys, shared.values) if shared is not None and shared.row_group is not None else ()
        result = mx.checkpoint(run)(block.trainable_parameters(), prompt_kv, *args, **kwargs)
        if shared is None or prompt_kv:
            return result
        out, shared.keys, shared.values = result  # the prompt call: keep what the completions attend to
        return out

    return block_call


def supports_shared_prompt(model) -> bool:
    """Whether `group_token_logprobs` reproduces `token_logprobs` on this model.

    The shared-prompt cache stands in for a plain per-layer KV cache, so a model whose
    `make_cache` returns anything else (sliding windows, rotating or state-space caches)
    is left out; a model that defines `make_cache` only to hand out plain KV caches
    (mlx-lm's llama: SmolLM2, Llama 3.x, Mistral) is in. Either way the two paths are
    compared on a small batch of two groups with prompts of different lengths.
    """
    if not hasattr(model, "layers") or not plain_kv_cache(model):
        return False
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 7, 6, 0], [8, 9, 5, 5, 3, 0, 0], [8, 9, 5, 2, 3, 4, 5]])
    scored = mx.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    try:
        expected = token_logprobs(model, tokens) * scored
        got = group_token_logprobs(model, tokens, ((0, 2, 4), (2, 4, 3))) * scored
    except Exception:  # an architecture whose layers want another cache
        return False
    # float32 sums in another order differ by ~1e-4 over a 49k vocabulary (SmolLM2: 8.6e-5); a wrong
    # offset or mask differs by ~0.1 and more.
    tolerance = 1e-3 if expected.dtype == mx.float32 and _weights_dtype(model) == mx.float32 else 2e-2
    return bool(mx.allclose(expected, got, atol=tolerance, rtol=tolerance).item())


def plain_kv_cache(model) -> bool:
    """Whether the model's cache is one plain KV cache per layer (no `make_cache`, or one that makes only those)."""
    if not hasattr(model, "make_cache"):
        return True
    from mlx_lm.models.cache import KVCache

    try:
        caches = model.make_cache()
    except Exception:
        return False
    return len(caches) == len(model.layers) and all(type(c) is KVCache for c in caches)


def _weights_dtype(model):
    from mlx.utils import tree_flatten

    floats = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    return max(set(floats), key=floats.count) if floats else mx.float32


def group_token_logprobs(model, tokens, groups, temperature: float = 1.0, chunk_size: int | None = None,
                         with_entropy: bool = False, prefix=None):
    """`token_logprobs` for rows that share prompts: two model calls whatever the number of groups.

    `groups`: (first_row, end_row, prompt_length) covering the rows in order; the
    rows of a group hold the same tokens[:, :prompt_length]. GRPO's G completions of
    one prompt are such a group. With S = min(prompt_length) - 1, the first call runs
    positions 0..S-1 of each group's first row (K rows) and records each layer's keys
    and values; the second runs positions S.. of every row against its group's keys and
    values. A longer prompt's tokens past S run in each row of its group there, in
    positions a layout that split each group at its own prompt would spend on padding
    (W - min(prompt_length) wide either way); no attention mask is needed. The LM head
    runs from position S only where the split matches. Returns [N, T-1] like
    `token_logprobs`, with 0 before each group's first completion position
    (prompt_length - 1). `prefix`: as in `token_logprobs` (where the head splits).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    sizes = [end - first for first, end, _ in groups]
    if [first for first, _, _ in groups] != [sum(sizes[:k]) for k in range(len(groups))] or sum(sizes) != tokens.shape[0]:
        raise ValueError(f"groups must cover the {tokens.shape[0]} rows in order, got {groups}")
    split = lm_head_split(model)
    run = split[0] if split else model
    if split and prefix is not None:
        run = prefix.wrap(run)
    shared = min(length for _, _, length in groups) - 1  # positions every group runs once
    cache = None
    if shared > 0:
        cache = [_SharedPromptCache() for _ in model.layers]
        run(tokens[mx.array([first for first, _, _ in groups])][:, :shared], cache=cache)
        row_group = mx.array(np.repeat(np.arange(len(groups)), sizes))
        for c in cache:
            c.to_completions(row_group, shared)
    out = run(tokens[:, shared:-1], cache=cache)
    if split:
        scored = head_logprobs(split[1], out, tokens[:, shared + 1 :], shared, temperature, chunk_size, with_entropy)
    else:
        scored = _score_targets(lambda a, b: out[:, a:b], tokens[:, shared + 1 :], shared, temperature, chunk_size,
                                with_entropy)
    # Zeros before each row's first completion position, as token_logprobs(start=...) would give.
    first_scored = np.repeat([length - 1 for _, _, length in groups], sizes)
    keep = mx.array(np.arange(tokens.shape[1] - 1)[None, :] >= first_scored[:, None])
    if not with_entropy:
        return mx.where(keep, scored, 0.0)
    return mx.where(keep, scored[0], 0.0), mx.where(keep, scored[1], 0.0)
