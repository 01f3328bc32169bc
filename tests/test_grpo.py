"""The GRPO math against a float64 NumPy reference written here, independently."""

import itertools
import zlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from grpo_mlx.grpo import group_advantages, policy_loss, token_logprobs

# ---------------------------------------------------------------- float64 reference


def ref_advantages(rewards, group_size, scale="group", eps=1e-4):
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    centered = r - r.mean(axis=1, keepdims=True)
    constant = np.ptp(r, axis=1, keepdims=True) == 0
    if scale == "group":
        std = r.std(axis=1, ddof=1, keepdims=True)
        adv = centered / (std + eps)
    elif scale == "batch":
        adv = centered / (np.asarray(rewards, np.float64).std(ddof=1) + eps)
    else:
        adv = centered
    return np.where(constant, 0.0, adv).reshape(-1)


def ref_policy_loss(lp, old, ref, adv, mask, eps_low, eps_high, beta, est, loss_type, level, max_len):
    lp, old, adv, mask = (np.asarray(x, np.float64) for x in (lp, old, adv, mask))
    eps_high = eps_low if eps_high is None else eps_high
    n, t = lp.shape
    lengths = mask.sum(1)
    if level == "token":
        log_ratio = lp - old
    else:
        seq = ((lp - old) * mask).sum(1) / np.maximum(lengths, 1)
        log_ratio = np.repeat(seq[:, None], t, axis=1)
    ratio = np.exp(log_ratio)
    a = adv[:, None]
    per_token = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = np.zeros_like(lp)
    if ref is not None:
        ref = np.asarray(ref, np.float64)
        if est == "k1":
            kl = lp - ref
        elif est == "k2":
            kl = 0.5 * (lp - ref) ** 2
        else:
            kl = np.exp(ref - lp) - (ref - lp) - 1
        per_token = per_token + beta * kl
    tokens = max(mask.sum(), 1)
    if loss_type == "grpo":
        loss = np.mean((per_token * mask).sum(1) / np.maximum(lengths, 1))
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / tokens
    else:
        loss = (per_token * mask).sum() / (n * (t if max_len is None else max_len))
    in_low = ratio < 1 - eps_low
    in_high = ratio > 1 + eps_high
    metrics = {
        "kl": (kl * mask).sum() / tokens,
        "clip_ratio/low_mean": ((in_low & (a < 0)) * mask).sum() / tokens,
        "clip_ratio/high_mean": ((in_high & (a > 0)) * mask).sum() / tokens,
        "clip_ratio/region_mean": ((in_low | in_high) * mask).sum() / tokens,
        "ratio/mean": (ratio * mask).sum() / tokens,
    }
    return loss, metrics


def random_case(seed, n=8, t=12):
    """Log-probs with ratios spread well outside [0.8, 1.2] and ragged masks."""
    rng = np.random.default_rng(seed)
    lp = rng.uniform(-4, -0.1, size=(n, t)).astype(np.float32)
    old = (lp + rng.normal(0, 0.4, size=(n, t))).astype(np.float32)
    ref = (lp + rng.normal(0, 0.3, size=(n, t))).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    lengths = rng.integers(1, t + 1, size=n)
    lengths[0] = t
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    return lp, old, ref, adv, mask


def assert_close(actual, expected, rtol=1e-5, atol=1e-7):
    np.testing.assert_allclose(float(actual), float(expected), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_match_float64_reference(scale, group_size):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=group_size * 5).astype(np.float32)
    got = np.array(group_advantages(mx.array(rewards), group_size, scale=scale))
    np.testing.assert_allclose(got, ref_advantages(rewards, group_size, scale), rtol=1e-5, atol=1e-6)


def test_zero_variance_group_gets_exactly_zero_advantage():
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (r - mean) / (std + eps) gives noise / eps.
    rewards = mx.array([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.7, 0.7, 0.7])
    for scale in ("group", "batch", "none"):
        adv = np.array(group_advantages(rewards, 3, scale=scale))
        assert np.all(np.isfinite(adv))
        assert np.all(adv[:3] == 0.0) and np.all(adv[6:] == 0.0)
        assert adv[3] > 0 and adv[4] < 0


def test_single_group_is_normalised_by_its_own_std():
    adv = np.array(group_advantages(mx.array([1.0, 0.0, 0.0, 0.0]), 4))
    expected = ref_advantages([1.0, 0.0, 0.0, 0.0], 4)
    np.testing.assert_allclose(adv, expected, rtol=1e-5)
    assert abs(adv.sum()) < 1e-5


def test_group_of_two_gives_finite_symmetric_advantages():
    adv = np.array(group_advantages(mx.array([1.0, 0.0, 0.5, 0.5]), 2))
    assert np.all(np.isfinite(adv))
    # Unbiased std of {1, 0} is 1/sqrt(2): advantages are +-1/sqrt(2) (up to eps).
    np.testing.assert_allclose(adv[:2], [0.5 / (2**-0.5 + 1e-4), -0.5 / (2**-0.5 + 1e-4)], rtol=1e-6)
    assert np.all(adv[2:] == 0.0)


def test_invalid_rows_leave_the_group_mean_and_get_zero():
    rewards = mx.array([1.0, 0.0, 123.0, 1.0])
    valid = mx.array([True, True, False, True])
    adv = np.array(group_advantages(rewards, 4, valid=valid))
    assert adv[2] == 0.0
    np.testing.assert_allclose(adv[[0, 1, 3]], ref_advantages([1.0, 0.0, 1.0], 3), rtol=1e-5)


def test_group_advantages_reject_bad_options():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(mx.array([1.0, 0.0]), 2, scale="global")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(mx.array([1.0, 0.0]), 3)


# ---------------------------------------------------------------- policy loss


GRID = list(itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["k1", "k2", "k3"], ["token", "sequence"]))


@pytest.mark.parametrize("loss_type,estimator,level", GRID)
def test_policy_loss_matches_float64_reference(loss_type, estimator, level):
    lp, old, ref, adv, mask = random_case(seed=zlib.crc32(f"{loss_type}-{estimator}-{level}".encode()))  # the same in every process
    kwargs = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04, kl_estimator=estimator)
    kwargs.update(loss_type=loss_type, importance_level=level, max_completion_length=16)
    loss, metrics = policy_loss(mx.array(lp), mx.array(old), mx.array(ref), mx.array(adv), mx.array(mask), **kwargs)
    ref_loss, ref_metrics = ref_policy_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, estimator, loss_type, level, 16)
    assert_close(loss, ref_loss)
    for name, value in ref_metrics.items():
        assert isinstance(metrics[name], float)
        assert_close(metrics[name], value)
    # The case must exercise clipping, or the comparison proves little.
    if level == "token":
        assert 0 < metrics["clip_ratio/region_mean"] < 1


def test_policy_loss_without_reference_has_no_kl_term():
    lp, old, ref, adv, mask = random_case(seed=3)
    args = (mx.array(lp), mx.array(old))
    loss_none, metrics = policy_loss(*args, None, mx.array(adv), mx.array(mask))
    loss_beta0, _ = policy_loss(*args, mx.array(ref), mx.array(adv), mx.array(mask), beta=0.0)
    expected, _ = ref_policy_loss(lp, old, None, adv, mask, 0.2, None, 0.0, "k3", "grpo", "token", None)
    assert_close(loss_none, expected)
    assert_close(loss_beta0, expected)
    assert metrics["kl"] == 0.0


def test_zero_length_completions_do_not_produce_nan():
    lp, old, ref, adv, mask = random_case(seed=4)
    mask[2] = 0.0
    for loss_type, level in itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"]):
        loss, metrics = policy_loss(
            mx.array(lp), mx.array(old), mx.array(ref), mx.array(adv), mx.array(mask),
            loss_type=loss_type, importance_level=level,
        )
        ref_loss, _ = ref_policy_loss(lp, old, ref, adv, mask, 0.2, None, 0.04, "k3", loss_type, level, None)
        assert np.isfinite(float(loss)) and all(np.isfinite(v) for v in metrics.values())
        assert_close(loss, ref_loss)
    all_empty = np.zeros_like(mask)
    loss, metrics = policy_loss(mx.array(lp), mx.array(old), mx.array(ref), mx.array(adv), mx.array(all_empty))
    assert float(loss) == 0.0 and metrics["kl"] == 0.0


def test_clipping_removes_the_gradient_where_the_objective_is_pessimistic():
    # A > 0 with ratio above 1+eps, A < 0 with ratio below 1-eps: clipped, no gradient.
    # A > 0 with ratio below 1-eps, A < 0 with ratio above 1+eps: unclipped, gradient flows.
    old = mx.zeros((4, 1))
    lp = mx.array([[np.log(1.5)], [np.log(0.5)], [np.log(0.5)], [np.log(1.5)]], dtype=mx.float32)
    adv = mx.array([1.0, -1.0, 1.0, -1.0])
    mask = mx.ones((4, 1))

    def loss_fn(x):
        return policy_loss(x, old, None, adv, mask, beta=0.0, loss_type="grpo")[0]

    loss, metrics = policy_loss(lp, old, None, adv, mask, beta=0.0)
    grad = np.array(mx.grad(loss_fn)(lp)).ravel()
    np.testing.assert_allclose(grad, [0.0, 0.0, -0.5 / 4, 1.5 / 4], rtol=1e-6, atol=1e-8)
    # Per-token objective: -min(r A, clip(r) A) = [-1.2, 0.8, -0.5, 1.5] -> mean 0.15.
    assert_close(loss, 0.15)
    assert metrics["clip_ratio/high_mean"] == 0.25 and metrics["clip_ratio/low_mean"] == 0.25
    assert metrics["clip_ratio/region_mean"] == 1.0


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dr_grpo", "sequence"), ("dapo", "token")])
def test_policy_loss_gradient_matches_central_differences(loss_type, level):
    lp, old, ref, adv, mask = random_case(seed=7, n=3, t=4)
    kwargs = dict(epsilon_high=0.28, loss_type=loss_type, importance_level=level)

    def f64(x):
        return ref_policy_loss(x, old, ref, adv, mask, 0.2, 0.28, 0.04, "k3", loss_type, level, None)[0]

    def loss_fn(x):
        return policy_loss(x, mx.array(old), mx.array(ref), mx.array(adv), mx.array(mask), **kwargs)[0]

    grad = np.array(mx.grad(loss_fn)(mx.array(lp)))
    h = 1e-6
    numeric = np.zeros_like(lp, dtype=np.float64)
    base = lp.astype(np.float64)
    for idx in np.ndindex(lp.shape):
        up, down = base.copy(), base.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (f64(up) - f64(down)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
    assert np.abs(numeric).max() > 1e-3  # the check is not vacuous


def test_dapo_normalises_by_the_global_token_count():
    lp, old, ref, adv, mask = random_case(seed=9)
    args = [mx.array(x) for x in (lp, old, ref, adv, mask)]
    full, _ = policy_loss(*args, loss_type="dapo")
    halves = [
        policy_loss(*[a[s] for a in args], loss_type="dapo", num_tokens=float(mask.sum()))[0]
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert_close(halves[0] + halves[1], full)
    grpo_halves = [
        policy_loss(*[a[s] for a in args], loss_type="grpo", num_sequences=8)[0] for s in (slice(0, 4), slice(4, 8))
    ]
    assert_close(grpo_halves[0] + grpo_halves[1], policy_loss(*args, loss_type="grpo")[0])


@pytest.mark.parametrize(
    "option,value", [("loss_type", "ppo"), ("kl_estimator", "k4"), ("importance_level", "group")]
)
def test_policy_loss_rejects_unknown_options(option, value):
    lp, old, ref, adv, mask = random_case(seed=1)
    with pytest.raises(ValueError, match=option):
        policy_loss(mx.array(lp), mx.array(old), mx.array(ref), mx.array(adv), mx.array(mask), **{option: value})


# ---------------------------------------------------------------- token log-probs


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


def test_token_logprobs_gradient_reaches_the_weights(tiny_lm):
    tokens = mx.array(np.random.default_rng(1).integers(0, 97, size=(2, 6)))

    def loss_fn(model):
        return token_logprobs(model, tokens, chunk_size=2).sum()

    grads = nn.value_and_grad(tiny_lm, loss_fn)(tiny_lm)[1]
    from mlx.utils import tree_flatten

    norms = [float(mx.abs(g).sum()) for _, g in tree_flatten(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


@pytest.fixture(scope="module")
def tied_lm():
    return random_qwen2(tie_word_embeddings=True, seed=1)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_scoring_from_start_with_a_split_head_equals_full_logprobs(tiny_lm, tied_lm, which, chunk_size):
    from grpo_mlx.grpo import lm_head_split_matches

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
    from mlx.utils import tree_flatten

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
    from grpo_mlx.grpo import lm_head_split, lm_head_split_matches

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


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_shared_prompt_logprobs_equal_row_by_row_logprobs(tiny_lm, tied_lm, chunk_size):
    from grpo_mlx.grpo import group_token_logprobs, supports_shared_prompt

    for model in (tiny_lm, tied_lm):
        assert supports_shared_prompt(model)
        tokens, groups, mask = shared_prompt_batch()
        full, full_entropy = token_logprobs(model, tokens, temperature=0.8, with_entropy=True)
        got, entropy = group_token_logprobs(model, tokens, groups, temperature=0.8, chunk_size=chunk_size,
                                            with_entropy=True)
        m = np.array(mask)
        assert got.shape == full.shape
        np.testing.assert_allclose(np.array(got) * m, np.array(full) * m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(entropy) * m, np.array(full_entropy) * m, rtol=1e-5, atol=1e-5)


def test_shared_prompt_gradient_equals_row_by_row_gradient(tiny_lm):
    from mlx.utils import tree_flatten

    from grpo_mlx.grpo import group_token_logprobs

    tokens, groups, mask = shared_prompt_batch(seed=6)
    weights = mx.array(np.random.default_rng(7).normal(size=mask.shape).astype(np.float32)) * mask
    full = dict(tree_flatten(nn.value_and_grad(tiny_lm, lambda m: (token_logprobs(m, tokens) * weights).sum())(tiny_lm)[1]))
    shared = dict(tree_flatten(nn.value_and_grad(
        tiny_lm, lambda m: (group_token_logprobs(m, tokens, groups) * weights).sum())(tiny_lm)[1]))
    for k in full:
        np.testing.assert_allclose(np.array(shared[k]), np.array(full[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    # The prompt's own weights get gradient through the shared keys and values.
    assert float(mx.abs(shared["model.layers.0.self_attn.k_proj.weight"]).sum()) > 0


def test_a_model_with_a_cache_of_its_own_does_not_share_prompts(tiny_lm):
    from grpo_mlx.grpo import supports_shared_prompt

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
