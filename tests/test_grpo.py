"""The GRPO math against a float64 NumPy reference written here, independently,
and the loss training computes (gradients.make_loss_fn, grpo.loss_normaliser) against it."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.core.config import TrainConfig
from grpo_mlx.train.grpo import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_TYPES, group_advantages, loss_normaliser, policy_loss
from grpo_mlx.model.logprobs import token_logprobs
from grpo_mlx.train.gradients import make_loss_fn

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
    # G = 8 equal rewards: their float32 mean is off by an ulp, so a naive (r - mean) / (std + eps)
    # gives noise / eps. (Three equal values, as before, average exactly: the guard went untested.)
    G = 8
    rewards = np.array([0.1] * G + [1.0, 0.0] * (G // 2) + [0.7] * G, dtype=np.float32)
    r = mx.array(rewards).reshape(-1, G)
    centered = r - r.mean(axis=1, keepdims=True)
    naive = np.array(centered / (mx.sqrt((centered * centered).sum(axis=1, keepdims=True) / (G - 1)) + 1e-4))
    assert np.all(naive[0] != 0.0) and np.all(naive[2] != 0.0)  # the noise this test guards against occurs
    for scale in ("group", "batch", "none"):
        adv = np.array(group_advantages(mx.array(rewards), G, scale=scale))
        assert np.all(np.isfinite(adv))
        assert np.all(adv[:G] == 0.0) and np.all(adv[2 * G:] == 0.0), scale
        assert np.all(adv[G:2 * G:2] > 0) and np.all(adv[G + 1:2 * G:2] < 0)


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


def test_rows_no_reward_applies_to_leave_the_group_mean_and_get_zero():
    rewards = mx.array([1.0, 0.0, 123.0, 1.0])
    applicable = mx.array([True, True, False, True])
    adv = np.array(group_advantages(rewards, 4, applicable=applicable))
    assert adv[2] == 0.0
    np.testing.assert_allclose(adv[[0, 1, 3]], ref_advantages([1.0, 0.0, 1.0], 3), rtol=1e-5)


def test_group_advantages_reject_bad_options():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(mx.array([1.0, 0.0]), 2, scale="global")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(mx.array([1.0, 0.0]), 3)


# ---------------------------------------------------------------- policy loss


GRID = list(itertools.product(LOSS_TYPES, KL_ESTIMATORS, IMPORTANCE_LEVELS))


def loss_of(lp, old, ref, adv, mask, loss_type="grpo", max_len=16, epsilon_low=0.2, beta=0.04, **kwargs):
    """grpo.policy_loss of one whole batch, normalised as training normalises it (epsilon 0.2, beta 0.04 unless given)."""
    lp, old, ref, adv, mask = (mx.array(x) if isinstance(x, np.ndarray) else x for x in (lp, old, ref, adv, mask))
    tokens = float(mask.sum().item())
    normaliser = loss_normaliser(loss_type, mask.shape[0], tokens, tokens, max_len)
    return policy_loss(lp, old, ref, adv, mask, normaliser=normaliser, loss_type=loss_type, epsilon_low=epsilon_low,
                       beta=beta, **kwargs)


@pytest.fixture(scope="module")
def tiny_policy():
    """A random one-layer Qwen2: the policy whose log-probs the training loss computes."""
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=97,
    )
    mx.random.seed(0)
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("mu", [1, 2])
@pytest.mark.parametrize("case", range(len(GRID)), ids=["-".join(c) for c in GRID])
def test_training_loss_matches_float64_reference(tiny_policy, case, mu):
    """The loss training computes (gradients.make_loss_fn with grpo.loss_normaliser of the whole
    batch, as grpo_step passes it), whole and in micro-batches, against the paper's formulas."""
    loss_type, estimator, level = GRID[case]
    # beta and epsilon away from policy_loss's defaults (0.04, 0.2): a setting make_loss_fn drops is seen.
    config = TrainConfig(model="unused", loss_type=loss_type, kl_estimator=estimator, importance_level=level,
                         beta=0.1, epsilon=0.15, epsilon_high=0.28, temperature=0.8, max_tokens=16)
    rng = np.random.default_rng(case)
    n, width, prompt_length = 8, 12, 4
    tokens = mx.array(rng.integers(0, 97, size=(n, width)))
    lengths = rng.integers(1, width - prompt_length + 1, size=n)
    lengths[0], lengths[2] = width - prompt_length, 0  # a full row and an empty (masked) one
    positions = np.arange(width - 1)[None, :] - (prompt_length - 1)
    mask = ((positions >= 0) & (positions < lengths[:, None])).astype(np.float32)
    adv = rng.normal(size=n).astype(np.float32)
    current = np.array(token_logprobs(tiny_policy, tokens, temperature=0.8))
    ref = (current + rng.normal(0, 0.3, size=current.shape)).astype(np.float32)
    # mu = 1: the old policy is the current one (make_loss_fn takes None); mu > 1: one moved off it.
    old = None if mu == 1 else (current + rng.normal(0, 0.4, size=current.shape)).astype(np.float32)

    num_tokens = float(mask.sum())
    normaliser = mx.array(loss_normaliser(loss_type, n, num_tokens, num_tokens, config.max_tokens))
    loss_fn = make_loss_fn(config)

    def loss_over(rows):
        loss, (metrics, _) = loss_fn(tiny_policy, tokens[rows], mx.array(mask[rows]), mx.array(adv[rows]),
                                     None if old is None else mx.array(old[rows]), mx.array(ref[rows]), normaliser)
        return float(loss.item()), {k: float(v.item()) for k, v in metrics.items()}

    expected, expected_metrics = ref_policy_loss(current, current if old is None else old, ref, adv, mask,
                                                 0.15, 0.28, 0.1, estimator, loss_type, level, 16)
    whole, metrics = loss_over(slice(0, n))
    micro = sum(loss_over(rows)[0] for rows in (slice(0, 3), slice(3, 6), slice(6, 8)))
    assert_close(whole, expected)
    assert_close(micro, expected)
    for name, value in expected_metrics.items():
        assert_close(metrics[name], value)
    if mu == 1:
        assert metrics["ratio/mean"] == 1.0 and metrics["clip_ratio/region_mean"] == 0.0
    elif level == "token":  # the case must exercise clipping, or the comparison proves little
        assert 0 < metrics["clip_ratio/region_mean"] < 1


@pytest.mark.parametrize("case", range(len(GRID)), ids=["-".join(c) for c in GRID])
def test_policy_loss_matches_float64_reference(case):
    loss_type, estimator, level = GRID[case]
    lp, old, ref, adv, mask = random_case(seed=case)
    kwargs = dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.04, kl_estimator=estimator, importance_level=level)
    loss, metrics = loss_of(lp, old, ref, adv, mask, loss_type, max_len=16, **kwargs)
    ref_loss, ref_metrics = ref_policy_loss(lp, old, ref, adv, mask, 0.2, 0.28, 0.04, estimator, loss_type, level, 16)
    assert_close(loss, ref_loss)
    for name, value in ref_metrics.items():
        assert_close(metrics[name], value)
    # The case must exercise clipping, or the comparison proves little.
    if level == "token":
        assert 0 < float(metrics["clip_ratio/region_mean"]) < 1


def test_policy_loss_without_reference_has_no_kl_term():
    lp, old, ref, adv, mask = random_case(seed=3)
    loss_none, metrics = loss_of(lp, old, None, adv, mask)
    loss_beta0, _ = loss_of(lp, old, ref, adv, mask, beta=0.0)
    expected, _ = ref_policy_loss(lp, old, None, adv, mask, 0.2, None, 0.0, "k3", "grpo", "token", None)
    assert_close(loss_none, expected)
    assert_close(loss_beta0, expected)
    assert float(metrics["kl"]) == 0.0


def test_zero_length_completions_do_not_produce_nan():
    lp, old, ref, adv, mask = random_case(seed=4)
    mask[2] = 0.0
    for loss_type, level in itertools.product(LOSS_TYPES, IMPORTANCE_LEVELS):
        loss, metrics = loss_of(lp, old, ref, adv, mask, loss_type, importance_level=level)
        ref_loss, _ = ref_policy_loss(lp, old, ref, adv, mask, 0.2, None, 0.04, "k3", loss_type, level, 16)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
        assert_close(loss, ref_loss)
    loss, metrics = loss_of(lp, old, ref, adv, np.zeros_like(mask))
    assert float(loss) == 0.0 and float(metrics["kl"]) == 0.0


def test_clipping_removes_the_gradient_where_the_objective_is_pessimistic():
    # A > 0 with ratio above 1+eps, A < 0 with ratio below 1-eps: clipped, no gradient.
    # A > 0 with ratio below 1-eps, A < 0 with ratio above 1+eps: unclipped, gradient flows.
    old = mx.zeros((4, 1))
    lp = mx.array([[np.log(1.5)], [np.log(0.5)], [np.log(0.5)], [np.log(1.5)]], dtype=mx.float32)
    adv = mx.array([1.0, -1.0, 1.0, -1.0])
    mask = mx.ones((4, 1))

    def loss_fn(x):
        return loss_of(x, old, None, adv, mask, beta=0.0)[0]

    loss, metrics = loss_of(lp, old, None, adv, mask, beta=0.0)
    grad = np.array(mx.grad(loss_fn)(lp)).ravel()
    np.testing.assert_allclose(grad, [0.0, 0.0, -0.5 / 4, 1.5 / 4], rtol=1e-6, atol=1e-8)
    # Per-token objective: -min(r A, clip(r) A) = [-1.2, 0.8, -0.5, 1.5] -> mean 0.15.
    assert_close(loss, 0.15)
    assert float(metrics["clip_ratio/high_mean"]) == 0.25 and float(metrics["clip_ratio/low_mean"]) == 0.25
    assert float(metrics["clip_ratio/region_mean"]) == 1.0


@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dr_grpo", "sequence"), ("dapo", "token")])
def test_policy_loss_gradient_matches_central_differences(loss_type, level):
    lp, old, ref, adv, mask = random_case(seed=7, n=3, t=4)
    kwargs = dict(epsilon_high=0.28, importance_level=level)

    def f64(x):
        return ref_policy_loss(x, old, ref, adv, mask, 0.2, 0.28, 0.04, "k3", loss_type, level, 16)[0]

    def loss_fn(x):
        return loss_of(x, old, ref, adv, mask, loss_type, **kwargs)[0]

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


def test_normaliser_of_the_whole_batch_makes_halves_add_up_to_it():
    lp, old, ref, adv, mask = random_case(seed=9)
    args = [mx.array(x) for x in (lp, old, ref, adv, mask)]
    num_tokens = float(mask.sum())
    for loss_type in LOSS_TYPES:
        normaliser = loss_normaliser(loss_type, 8, num_tokens, num_tokens, 16)
        full, _ = policy_loss(*args, normaliser=normaliser, loss_type=loss_type, epsilon_low=0.2, beta=0.04)
        halves = [policy_loss(*[a[s] for a in args], normaliser=normaliser, loss_type=loss_type, epsilon_low=0.2,
                              beta=0.04)[0]
                  for s in (slice(0, 4), slice(4, 8))]
        assert_close(halves[0] + halves[1], full)


@pytest.mark.parametrize(
    "option,value", [("loss_type", "ppo"), ("kl_estimator", "k4"), ("importance_level", "group")]
)
def test_policy_loss_rejects_unknown_options(option, value):
    lp, old, ref, adv, mask = random_case(seed=1)
    with pytest.raises(ValueError, match=option):
        policy_loss(*(mx.array(x) for x in (lp, old, ref, adv, mask)), normaliser=1.0, epsilon_low=0.2, beta=0.04,
                    **{option: value})
    if option == "loss_type":
        with pytest.raises(ValueError, match=option):
            loss_normaliser(value, 8, 10, 10, 16)
