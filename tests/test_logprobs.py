"""Token log-probs (logprobs.py): the plain forward, the split LM head and the shared
prompt give the same numbers and gradients as a naive log-softmax."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from grpo_mlx.model.logprobs import (
    group_token_logprobs,
    lm_head_split,
    lm_head_split_matches,
    supports_shared_prompt,
    token_logprobs,
)


def random_qwen2(tie_word_embeddings: bool, seed: int):
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=97,
        tie_word_embeddings=tie_word_embeddings,
    )
    mx.random.seed(seed)
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def tiny_lm():
    return random_qwen2(tie_word_embeddings=False, seed=0)


@pytest.mark.parametrize("temperature,chunk_size", [(1.0, None), (0.7, 3), (1.3, 5)])
def test_token_logprobs_equal_naive_log_softmax_gather(tiny_lm, temperature, chunk_size):
    tokens = mx.array(np.random.default_rng(0).integers(0, 97, size=(3, 11)))
    got, entropy = token_logprobs(tiny_lm, tokens, temperature=temperature, chunk_size=chunk_size, with_entropy=True)
    logits = np.array(tiny_lm(tokens[:, :-1])).astype(np.float64) / temperature
    log_softmax = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    log_softmax -= logits.max(-1, keepdims=True)
    expected = np.take_along_axis(log_softmax, np.array(tokens[:, 1:])[..., None], axis=-1)[..., 0]
    assert got.dtype == mx.float32 and got.shape == (3, 10)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-5)
    expected_entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
    np.testing.assert_allclose(np.array(entropy), expected_entropy, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_scores_and_their_gradient_equal_a_float64_reference(with_entropy):
    """Both ways of scoring logits (logsumexp; one exp pass with the entropy, for the gradient passes):
    log-probs, entropy and d(sum w * logprob)/d logits = w * (onehot - softmax) / temperature
    against float64 NumPy."""
    from grpo_mlx.model.logprobs import _scores_with_entropy, _tempered_scores

    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4.0, size=(3, 5, 211)).astype(np.float32) + 30.0  # far from 0: the max shift matters
    targets = rng.integers(0, 211, size=(3, 5))
    weights = rng.normal(size=(3, 5))
    temperature = 0.7
    scaled = logits.astype(np.float64) / temperature
    log_softmax = scaled - scaled.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]
    softmax = np.exp(log_softmax)
    expected_grad = -weights[..., None] * softmax
    np.put_along_axis(expected_grad, targets[..., None],
                      np.take_along_axis(expected_grad, targets[..., None], axis=-1) + weights[..., None], axis=-1)
    expected_grad /= temperature

    def scores(x):
        if with_entropy:
            return _scores_with_entropy(x, mx.array(targets), temperature)
        return _tempered_scores(x, mx.array(targets), temperature)[0], None

    logprob, entropy = scores(mx.array(logits))
    np.testing.assert_allclose(np.array(logprob), expected, rtol=1e-5, atol=2e-5)
    if with_entropy:
        np.testing.assert_allclose(np.array(entropy), -(softmax * log_softmax).sum(-1), rtol=1e-4, atol=1e-4)
    grad = mx.grad(lambda x: (scores(x)[0] * mx.array(weights, dtype=mx.float32)).sum())(mx.array(logits))
    np.testing.assert_allclose(np.array(grad), expected_grad, rtol=1e-4, atol=1e-6)


def test_token_logprobs_gradient_reaches_the_weights(tiny_lm):
    tokens = mx.array(np.random.default_rng(1).integers(0, 97, size=(2, 6)))

    def loss_fn(model):
        return token_logprobs(model, tokens, chunk_size=2).sum()

    grads = nn.value_and_grad(tiny_lm, loss_fn)(tiny_lm)[1]
    norms = [float(mx.abs(g).sum()) for _, g in tree_flatten(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


@pytest.fixture(scope="module")
def tied_lm():
    return random_qwen2(tie_word_embeddings=True, seed=1)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_scoring_from_start_with_a_split_head_equals_full_logprobs(tiny_lm, tied_lm, which, chunk_size):
    model = tiny_lm if which == "untied" else tied_lm
    assert lm_head_split_matches(model)
    tokens = mx.array(np.random.default_rng(2).integers(0, 97, size=(3, 12)))
    full, full_entropy = token_logprobs(model, tokens, temperature=0.8, with_entropy=True)
    start = 5
    got, entropy = token_logprobs(model, tokens, temperature=0.8, chunk_size=chunk_size, with_entropy=True,
                                  start=start, split_head=True)
    assert got.shape == full.shape == (3, 11)
    np.testing.assert_allclose(np.array(got)[:, start:], np.array(full)[:, start:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(entropy)[:, start:], np.array(full_entropy)[:, start:], rtol=1e-5, atol=1e-5)
    assert np.all(np.array(got)[:, :start] == 0) and np.all(np.array(entropy)[:, :start] == 0)


def test_gradient_through_a_split_head_equals_the_full_models(tiny_lm):
    tokens = mx.array(np.random.default_rng(3).integers(0, 97, size=(2, 9)))
    mask = mx.concatenate([mx.zeros((2, 4)), mx.ones((2, 4))], axis=1)

    def loss(split):
        return lambda m: (token_logprobs(m, tokens, start=4 if split else 0, split_head=split) * mask).sum()

    full = dict(tree_flatten(nn.value_and_grad(tiny_lm, loss(False))(tiny_lm)[1]))
    split = dict(tree_flatten(nn.value_and_grad(tiny_lm, loss(True))(tiny_lm)[1]))
    assert full.keys() == split.keys()
    for k in full:
        np.testing.assert_allclose(np.array(split[k]), np.array(full[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    assert float(mx.abs(split["lm_head.weight"]).sum()) > 0  # the head still learns when it is trainable


def test_a_model_that_changes_its_logits_after_the_head_is_not_split(tiny_lm):
    class SoftCapped(nn.Module):  # like Gemma 2: logits soft-capped after the head
        def __init__(self, inner):
            super().__init__()
            self.model, self.lm_head, self.args = inner.model, inner.lm_head, inner.args

        def __call__(self, x):
            return 5.0 * mx.tanh(self.lm_head(self.model(x)) / 5.0)

    capped = SoftCapped(tiny_lm)
    assert lm_head_split(capped) is not None  # the attribute names look right...
    assert not lm_head_split_matches(capped)  # ...but the numbers do not, so the trainer keeps model(x)


def shared_prompt_batch(prompt_lengths=(6, 1, 9), rows=(3, 2, 2), width=16, seed=5):
    """Rows that share prompts in consecutive groups, right-padded: (tokens, groups, mask)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((sum(rows), width), dtype=np.int32)
    mask = np.zeros((sum(rows), width - 1), dtype=np.float32)
    groups, first = [], 0
    for length, count in zip(prompt_lengths, rows):
        prompt = rng.integers(1, 97, size=length)
        for i in range(first, first + count):
            completion = rng.integers(1, 97, size=int(rng.integers(1, width - length + 1)))
            tokens[i, :length], tokens[i, length : length + len(completion)] = prompt, completion
            mask[i, length - 1 : length - 1 + len(completion)] = 1
        groups.append((first, first + count, length))
        first += count
    return mx.array(tokens), groups, mx.array(mask)


# Ragged prompts (incl. a one-token prompt: nothing to share), ragged right-padded completions,
# a group of one row, the shortest prompt first or last.
SHARED_BATCHES = {"6-1-9": dict(prompt_lengths=(6, 1, 9), rows=(3, 2, 2)),
                  "5-9-2": dict(prompt_lengths=(5, 9, 2), rows=(3, 1, 4), width=18, seed=11),
                  "5-12-7": dict(prompt_lengths=(5, 12, 7), rows=(2, 3, 1), width=20, seed=12)}


@pytest.mark.parametrize("batch", sorted(SHARED_BATCHES))
@pytest.mark.parametrize("temperature,chunk_size", [(0.8, None), (1.3, 4)])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_shared_prompt_logprobs_equal_row_by_row_logprobs(tiny_lm, tied_lm, which, batch, temperature, chunk_size):
    model = tiny_lm if which == "untied" else tied_lm
    assert supports_shared_prompt(model)
    tokens, groups, mask = shared_prompt_batch(**SHARED_BATCHES[batch])
    full, full_entropy = token_logprobs(model, tokens, temperature=temperature, with_entropy=True)
    got, entropy = group_token_logprobs(model, tokens, groups, temperature=temperature, chunk_size=chunk_size,
                                        with_entropy=True)
    m = np.array(mask)
    assert got.shape == entropy.shape == full.shape
    np.testing.assert_allclose(np.array(got) * m, np.array(full) * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(entropy) * m, np.array(full_entropy) * m, rtol=1e-5, atol=1e-5)
    before_completion = np.arange(tokens.shape[1] - 1)[None, :] < np.array(
        [length - 1 for first, end, length in groups for _ in range(first, end)])[:, None]
    assert np.all(np.array(got)[before_completion] == 0) and np.all(np.array(entropy)[before_completion] == 0)


def lora_qwen2(tie_word_embeddings: bool, seed: int):
    """A random Qwen2 with LoRA on every layer and nonzero B matrices (so every adapter weight gets gradient)."""
    from grpo_mlx.model.policy import attach_adapters

    model = random_qwen2(tie_word_embeddings, seed)
    attach_adapters(model, rank=4, num_layers=-1, scale=2.0)
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array(rng.normal(scale=0.1, size=v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
    return model


@pytest.mark.parametrize("batch", sorted(SHARED_BATCHES))
@pytest.mark.parametrize("weights", ["plain", "lora", "lora-tied"])
def test_shared_prompt_gradient_equals_row_by_row_gradient(tiny_lm, batch, weights):
    model = tiny_lm if weights == "plain" else lora_qwen2(weights == "lora-tied", seed=3)
    tokens, groups, mask = shared_prompt_batch(**SHARED_BATCHES[batch])
    weights_ = mx.array(np.random.default_rng(7).normal(size=mask.shape).astype(np.float32)) * mask

    def grads(logprobs_of):
        return dict(tree_flatten(nn.value_and_grad(model, lambda m: (logprobs_of(m) * weights_).sum())(model)[1]))

    full = grads(lambda m: token_logprobs(m, tokens, temperature=0.7))
    shared = grads(lambda m: group_token_logprobs(m, tokens, groups, temperature=0.7, chunk_size=5))
    assert full.keys() == shared.keys() and full
    for k in full:
        np.testing.assert_allclose(np.array(shared[k]), np.array(full[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    # The prompt's own weights get gradient through the shared keys and values.
    k_proj = "model.layers.0.self_attn.k_proj." + ("weight" if weights == "plain" else "lora_a")
    assert float(mx.abs(shared[k_proj]).sum()) > 0


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_a_shared_prompt_pass_is_two_model_calls_whatever_the_number_of_groups(tiny_lm, tied_lm, which, monkeypatch):
    from mlx_lm.models import qwen2

    model = tiny_lm if which == "untied" else tied_lm
    calls = []
    body_call = qwen2.Qwen2Model.__call__
    monkeypatch.setattr(qwen2.Qwen2Model, "__call__", lambda self, *a, **k: calls.append(1) or body_call(self, *a, **k))
    for prompt_lengths in [(4,), (5, 9, 2), (3, 7, 2, 8, 6, 4)]:
        tokens, groups, _ = shared_prompt_batch(prompt_lengths, rows=(2,) * len(prompt_lengths), width=16)
        calls.clear()
        mx.eval(group_token_logprobs(model, tokens, groups, chunk_size=3))
        assert len(calls) == 2, (prompt_lengths, len(calls))


def test_a_model_with_a_cache_of_its_own_does_not_share_prompts(tiny_lm):
    class Windowed(nn.Module):  # like Gemma 3 or Mistral with a sliding window: it makes its own cache
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.layers = inner.layers

        def make_cache(self):
            return [None] * len(self.layers)

        def __call__(self, x, cache=None):
            return self.inner(x, cache=cache)

    assert not supports_shared_prompt(Windowed(tiny_lm))


def test_shared_prompt_gradient_under_gradient_checkpointing(monkeypatch):
    """mlx-lm's grad_checkpoint loses the gradient of the prompt's keys and values here (all 128
    elements of an adapter's gradient differ); `checkpointed_block_call` keeps it."""
    from mlx_lm.models import qwen2

    from grpo_mlx.model.logprobs import checkpointed_block_call

    model = lora_qwen2(tie_word_embeddings=False, seed=4)
    tokens, groups, mask = shared_prompt_batch(**SHARED_BATCHES["5-9-2"])
    weights = mx.array(np.random.default_rng(8).normal(size=mask.shape).astype(np.float32)) * mask

    def grads():
        loss = lambda m: (group_token_logprobs(m, tokens, groups, temperature=0.7) * weights).sum()  # noqa: E731
        return dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))

    plain = grads()
    # The patch is on the block class, for the whole process: monkeypatch puts it back after the test.
    monkeypatch.setattr(qwen2.TransformerBlock, "__call__", checkpointed_block_call(qwen2.TransformerBlock.__call__))
    checkpoints = []
    real_checkpoint = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda f: checkpoints.append(1) or real_checkpoint(f))
    checkpointed = grads()
    assert len(checkpoints) == 2 * len(model.layers)  # each block checkpointed in each of the two calls
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        np.testing.assert_allclose(np.array(checkpointed[k]), np.array(plain[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def random_llama(layer_types=None, sliding_window=None, seed: int = 3):
    from mlx_lm.models import llama

    args = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97, tie_word_embeddings=False,
                layer_types=layer_types, sliding_window=sliding_window)
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_every_plain_kv_cache_family_shares_prompts_and_gets_the_same_logprobs(family):
    """mlx-lm's llama (SmolLM2, Llama 3.x, Mistral) defines make_cache, but hands out plain KV caches."""
    model = random_qwen2(tie_word_embeddings=False, seed=5) if family == "qwen2" else random_llama()
    assert hasattr(model, "make_cache") == (family == "llama")
    assert supports_shared_prompt(model)
    tokens, groups, mask = shared_prompt_batch(**SHARED_BATCHES["5-9-2"])
    start = min(length for _, _, length in groups) - 1
    np.testing.assert_allclose(np.array(group_token_logprobs(model, tokens, groups) * mask),
                               np.array(token_logprobs(model, tokens, start=start) * mask), rtol=1e-4, atol=1e-5)


def test_a_llama_with_sliding_window_layers_does_not_share_prompts():
    model = random_llama(layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    assert not supports_shared_prompt(model)


def big_vocab_lora_qwen2(vocab_size=8192, seed=6):
    """A Qwen2 whose vocabulary dwarfs its width, as real models' do (SmolLM2: 49,152 x 576), with LoRA on."""
    from mlx_lm.models import qwen2

    from grpo_mlx.model.policy import attach_adapters

    args = dict(model_type="qwen2", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=vocab_size, tie_word_embeddings=True)
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(args))
    attach_adapters(model, rank=4, num_layers=-1, scale=2.0)
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array(rng.normal(scale=0.1, size=v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("shared", [False, True])
def test_chunked_head_gradient_equals_the_whole_logits_gradient(shared):
    """The custom VJP recomputes each chunk's logits in the backward: same log-probs, entropy and gradients."""
    model = big_vocab_lora_qwen2(vocab_size=512)
    tokens, groups, mask = shared_prompt_batch(**SHARED_BATCHES["5-12-7"])
    weights = mx.array(np.random.default_rng(3).normal(size=mask.shape).astype(np.float32)) * mask
    start = min(length for _, _, length in groups) - 1

    def run(chunk_size):
        def loss(m):
            if shared:
                logprobs, entropy = group_token_logprobs(m, tokens, groups, 0.8, chunk_size=chunk_size, with_entropy=True)
            else:
                logprobs, entropy = token_logprobs(m, tokens, 0.8, chunk_size=chunk_size, with_entropy=True, start=start,
                                                   split_head=True)
            return (logprobs * weights).sum() + 0 * entropy.sum(), (logprobs, entropy)
        (value, (logprobs, entropy)), grads = nn.value_and_grad(model, loss)(model)
        return value, logprobs, entropy, dict(tree_flatten(grads))

    whole, chunked = run(None), run(3)
    np.testing.assert_allclose(np.array(chunked[1]), np.array(whole[1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(chunked[2]), np.array(whole[2]), rtol=1e-5, atol=1e-5)
    assert whole[3].keys() == chunked[3].keys() and len(whole[3]) > 0
    # float32 sums in another order: an element near 0 can differ by a few 1e-6 of its matrix's largest
    # (seen once: 2.0e-6 off on 2.2e-3); a wrong or missing chunk is off by the gradient's own size.
    for k in whole[3]:
        scale = float(mx.abs(whole[3][k]).max())
        np.testing.assert_allclose(np.array(chunked[3][k]), np.array(whole[3][k]), rtol=1e-4, atol=1e-5 * scale, err_msg=k)
    assert max(float(mx.abs(g).max()) for g in whole[3].values()) > 1e-3  # gradients worth comparing


def test_chunked_head_gradient_holds_one_chunk_of_logits_not_all():
    """Peak memory of a forward+backward: the whole [rows, T, V] float32 logits (and their softmax and
    gradient) with chunk_size None; about one chunk's with chunks."""
    model = big_vocab_lora_qwen2(vocab_size=16384)
    rows, width = 8, 130
    tokens = mx.array(np.random.default_rng(0).integers(1, 16384, size=(rows, width)))
    weights = mx.array(np.random.default_rng(1).normal(size=(rows, width - 1)).astype(np.float32))
    logits_bytes = rows * (width - 1) * 16384 * 4  # 67.6 MB

    def peak(chunk_size):
        loss = lambda m: (token_logprobs(m, tokens, chunk_size=chunk_size, split_head=True) * weights).sum()  # noqa: E731
        mx.eval(model.parameters())
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(nn.value_and_grad(model, loss)(model))
        return mx.get_peak_memory()

    whole, chunked = peak(None), peak(8)  # measured: 215 MB against 45 MB
    assert whole - chunked > 2 * logits_bytes, (whole / 1e6, chunked / 1e6)
