"""The speed and memory optimisations change no numbers: compile, length buckets,
gradient checkpointing, micro-batching, rollouts without sampler log-probs."""


import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load

from grpo_mlx.core.config import TrainConfig
from grpo_mlx.train.grpo import LOSS_TYPES, loss_normaliser
from grpo_mlx.model.policy import attach_adapters
from grpo_mlx.rollout.batch import generate_rollout, make_sampler, pad_batch
from grpo_mlx.train.gradients import (
    accumulate_gradients,
    enable_grad_checkpoint,
    make_grad_step,
    micro_batches,
)


def lora_model(model_dir, seed=0):
    model, tokenizer = load(str(model_dir))
    mx.random.seed(seed)
    attach_adapters(model, rank=4, num_layers=-1, scale=20.0)
    # Nonzero B matrices: every adapter then moves the logits, and A gets a gradient too.
    lora_b = [(k, mx.random.normal(v.shape) * 0.01) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]
    model.update(tree_unflatten(lora_b))
    mx.eval(model.parameters())
    return model, tokenizer


def ragged_batch(seed=0, rows=6, vocab=200):
    """Prompts and completions of different lengths, as a rollout would give."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=int(rng.integers(4, 9))).tolist() for _ in range(rows)]
    completions = [rng.integers(3, vocab, size=int(rng.integers(1, 12))).tolist() for _ in range(rows)]
    return prompts, completions


def config_for(**overrides):
    values = dict(model="unused", beta=0.04, temperature=0.8, max_tokens=12, epsilon_high=0.28)
    values.update(overrides)
    return TrainConfig(**values)


def step_inputs(prompts, completions, bucket, config, seed=0):
    """(tokens, mask, advantages, old, ref, normaliser) with a policy that has moved off the old one."""
    tokens, mask = pad_batch(prompts, completions, 0, bucket)
    rng = np.random.default_rng(seed)
    advantages = mx.array(rng.normal(size=len(prompts)).astype(np.float32))
    # Old and reference log-probs that differ from the current ones, so ratios clip and KL is nonzero.
    old = mx.array(rng.normal(-5.0, 0.3, size=mask.shape).astype(np.float32))
    ref = mx.array(rng.normal(-5.0, 0.3, size=mask.shape).astype(np.float32))
    n, num_tokens = len(prompts), float(mask.sum().item())
    return tokens, mask, advantages, old, ref, loss_normaliser(config.loss_type, n, num_tokens, num_tokens, config.max_tokens)


def flat_grads(grads):
    return {k: np.array(v) for k, v in tree_flatten(grads)}


def assert_same_grads(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def run_accumulated(model, config, tokens, mask, advantages, old, ref, batches, normaliser, grad_step=None):
    grad_step = grad_step or make_grad_step(model, config)
    grads, loss, micro_batch_stats, logprobs = accumulate_gradients(grad_step, tokens, mask, advantages, old, ref, batches, normaliser)
    return flat_grads(grads), loss, micro_batch_stats, np.array(logprobs)


# ---------------------------------------------------------------- compile


def test_compiled_step_gives_the_same_loss_and_gradients_and_sees_new_weights(tiny_model_dir):
    model, _ = lora_model(tiny_model_dir)
    prompts, completions = ragged_batch()
    plain_config, compiled_config = config_for(compile=False), config_for(compile=True)
    tokens, mask, adv, old, ref, norm = step_inputs(prompts, completions, 32, plain_config)
    batches = [slice(0, len(prompts))]
    plain_step, compiled_step = make_grad_step(model, plain_config), make_grad_step(model, compiled_config)

    for update in range(2):
        g_plain, loss_plain, stats_plain, lp_plain = run_accumulated(model, plain_config, tokens, mask, adv, old, ref, batches, norm, plain_step)
        g_comp, loss_comp, stats_comp, lp_comp = run_accumulated(model, compiled_config, tokens, mask, adv, old, ref, batches, norm, compiled_step)
        assert loss_comp == pytest.approx(loss_plain, rel=1e-5, abs=1e-7)
        assert_same_grads(g_plain, g_comp)
        np.testing.assert_allclose(lp_comp, lp_plain, rtol=1e-5, atol=1e-5)
        for k, v in stats_plain[0][1].items():
            assert stats_comp[0][1][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        lora_b = [v for k, v in g_comp.items() if k.endswith("lora_b")]
        assert lora_b and all(np.abs(v).max() > 0 for v in lora_b)
        # An optimizer update between calls: a compiled step that captured the weights
        # as constants would still differentiate the old ones and drift from the plain step.
        optimizer = optim.SGD(learning_rate=0.5)
        optimizer.update(model, tree_unflatten([(k, mx.array(g)) for k, g in g_plain.items()]))
        mx.eval(model.parameters())
        if update == 0:
            first_loss = loss_plain
    assert loss_plain != pytest.approx(first_loss, rel=1e-4)  # the update moved the loss


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo"])
def test_bucket_padding_does_not_change_loss_or_gradients(tiny_model_dir, loss_type):
    model, _ = lora_model(tiny_model_dir)
    prompts, completions = ragged_batch(seed=1)
    config = config_for(loss_type=loss_type)
    exact = step_inputs(prompts, completions, 1, config)
    bucketed = step_inputs(prompts, completions, 32, config)
    assert bucketed[0].shape[1] % 32 == 0 and bucketed[0].shape[1] > exact[0].shape[1]
    # Same old/ref values on the real positions; the bucket's extra columns are padding.
    width = exact[1].shape[1]
    old = mx.concatenate([exact[3], mx.zeros((len(prompts), bucketed[1].shape[1] - width))], axis=1)
    ref = mx.concatenate([exact[4], mx.zeros((len(prompts), bucketed[1].shape[1] - width))], axis=1)
    batches = [slice(0, len(prompts))]
    g_exact, loss_exact, _, lp_exact = run_accumulated(model, config, *exact[:3], exact[3], exact[4], batches, exact[5])
    g_bucket, loss_bucket, _, lp_bucket = run_accumulated(model, config, *bucketed[:3], old, ref, batches, bucketed[5])
    assert loss_bucket == pytest.approx(loss_exact, rel=1e-5, abs=1e-7)
    assert_same_grads(g_exact, g_bucket)
    np.testing.assert_allclose(lp_bucket[:, :width] * np.array(exact[1]), lp_exact * np.array(exact[1]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- gradient checkpointing


def test_checkpointed_backward_gives_the_same_gradients(tiny_model_dir, monkeypatch):
    model, _ = lora_model(tiny_model_dir)
    config = config_for()
    inputs = step_inputs(*ragged_batch(seed=2), 32, config)
    batches = [slice(0, inputs[0].shape[0])]
    g_plain, loss_plain, _, _ = run_accumulated(model, config, *inputs[:5], batches, inputs[5])

    block = type(model.layers[0])
    monkeypatch.setattr(block, "__call__", block.__call__)  # undone after the test: the patch is process-wide
    monkeypatch.setattr(block, "_grpo_mlx_checkpointed", False, raising=False)
    checkpointed_calls = []
    real_checkpoint = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda fn: checkpointed_calls.append(1) or real_checkpoint(fn))
    enable_grad_checkpoint(model)
    enable_grad_checkpoint(model)  # a second setup in the same process must not nest checkpoints
    g_ckpt, loss_ckpt, _, _ = run_accumulated(model, config, *inputs[:5], batches, inputs[5])
    assert len(checkpointed_calls) == len(model.layers)  # every block, once each
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6, abs=1e-7)
    assert_same_grads(g_plain, g_ckpt, rtol=1e-5)


# ---------------------------------------------------------------- micro-batching


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("importance_level", ["token", "sequence"])
def test_micro_batched_accumulation_equals_the_full_batch_gradient(tiny_model_dir, loss_type, importance_level):
    model, _ = lora_model(tiny_model_dir)
    config = config_for(loss_type=loss_type, importance_level=importance_level)
    tokens, mask, adv, old, ref, norm = step_inputs(*ragged_batch(seed=3, rows=7), 32, config)
    n = tokens.shape[0]
    full = run_accumulated(model, config, tokens, mask, adv, old, ref, [slice(0, n)], norm)
    batches = micro_batches(n, 3)  # 3 + 3 + 1 rows, unequal token counts
    assert len(batches) == 3
    micro = run_accumulated(model, config, tokens, mask, adv, old, ref, batches, norm)
    assert micro[1] == pytest.approx(full[1], rel=1e-5, abs=1e-7)
    assert_same_grads(full[0], micro[0])
    assert any(np.abs(v).max() > 0 for v in full[0].values())
    np.testing.assert_allclose(micro[3], full[3], rtol=1e-5, atol=1e-5)


def test_normaliser_divides_by_the_count_each_loss_type_names():
    assert loss_normaliser("grpo", 8, 100, 60, 16) == pytest.approx(1 / 8)
    assert loss_normaliser("dr_grpo", 8, 100, 60, 16) == pytest.approx(1 / (8 * 16))  # N * max completion length
    assert loss_normaliser("bnpo", 8, 100, 60, 16) == pytest.approx(1 / 60)  # this process's tokens
    assert loss_normaliser("dapo", 8, 100, 60, 16) == pytest.approx(1 / 100)  # the global batch's
    assert loss_normaliser("dapo", 8, 0, 0, 16) == 1.0  # no completion tokens: no division by zero


# ---------------------------------------------------------------- rollout


def test_rollout_without_sampler_logprobs_samples_the_same_completions(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 4 plus 5?"}], add_generation_prompt=True)
    mx.random.seed(7)
    with_lp = generate_rollout(model, tokenizer, [prompt], 4, 8, make_sampler(1.0), with_logprobs=True)
    mx.random.seed(7)
    without = generate_rollout(model, tokenizer, [prompt], 4, 8, make_sampler(1.0))
    assert without.sampling_logprobs is None
    assert [len(x) for x in with_lp.sampling_logprobs] == with_lp.completion_lengths
    assert without.completion_tokens == with_lp.completion_tokens
    assert without.finish_reasons == with_lp.finish_reasons


# ---------------------------------------------------------------- logits on completion positions only


@pytest.mark.parametrize("compile_", [False, True])
def test_scoring_completion_positions_only_gives_the_same_loss_and_gradients(tiny_model_dir, compile_):
    from grpo_mlx.model.logprobs import lm_head_split_matches
    from grpo_mlx.train.gradients import first_scored_position

    model, _ = lora_model(tiny_model_dir)
    assert lm_head_split_matches(model)
    rng = np.random.default_rng(4)
    # Long prompts (>= 40 tokens): the first scored position is past a whole length bucket.
    prompts = [rng.integers(3, 200, size=int(rng.integers(40, 50))).tolist() for _ in range(4)]
    completions = [rng.integers(3, 200, size=int(rng.integers(1, 12))).tolist() for _ in range(4)]
    start = first_scored_position(prompts)
    assert start == 32
    config = config_for(compile=compile_)
    tokens, mask, adv, old, ref, norm = step_inputs(prompts, completions, 32, config)
    batches = micro_batches(4, 3)  # two micro-batches
    full = make_grad_step(model, config)
    split = make_grad_step(model, config, split_head=True)
    g_full, loss_full, stats_full, lp_full = run_accumulated(model, config, tokens, mask, adv, old, ref, batches, norm, full)
    grads, loss, micro_batch_stats, logprobs = accumulate_gradients(split, tokens, mask, adv, old, ref, batches, norm, start)
    assert loss == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    assert_same_grads(g_full, flat_grads(grads))
    m = np.array(mask)
    np.testing.assert_allclose(np.array(logprobs) * m, lp_full * m, rtol=1e-5, atol=1e-5)
    for (w, metrics), (w_full, metrics_full) in zip(micro_batch_stats, stats_full):
        assert w == w_full
        for k, v in metrics_full.items():
            assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_running_each_prompt_once_per_group_gives_the_same_loss_and_gradients(tiny_model_dir, micro_batch_size):
    from grpo_mlx.model.logprobs import supports_shared_prompt
    from grpo_mlx.train.gradients import forward_logprobs, prompt_groups

    model, _ = lora_model(tiny_model_dir)
    assert supports_shared_prompt(model)
    rng = np.random.default_rng(8)
    G = 4
    prompts = [p for p in (rng.integers(3, 200, size=int(rng.integers(4, 20))).tolist() for _ in range(2)) for _ in range(G)]
    completions = [rng.integers(3, 200, size=int(rng.integers(1, 12))).tolist() for _ in prompts]
    config = config_for()
    tokens, mask, adv, old, ref, norm = step_inputs(prompts, completions, 32, config)
    batches = micro_batches(len(prompts), micro_batch_size)
    groups = [prompt_groups(prompts, b) for b in batches]
    # Micro-batches of 3 cut the groups of 4: each part runs its prompt once.
    assert groups[0] == ((0, 4, len(prompts[0])), (4, 8, len(prompts[4]))) if micro_batch_size is None else \
        groups[:2] == [((0, 3, len(prompts[0])),), ((0, 1, len(prompts[0])), (1, 3, len(prompts[4])))]
    step = make_grad_step(model, config)
    g_rows, loss_rows, _, lp_rows = run_accumulated(model, config, tokens, mask, adv, old, ref, batches, norm, step)
    grads, loss, _, logprobs = accumulate_gradients(step, tokens, mask, adv, old, ref, batches, norm, 0, groups)
    assert loss == pytest.approx(loss_rows, rel=1e-5, abs=1e-7)
    assert_same_grads(g_rows, flat_grads(grads))
    m = np.array(mask)
    np.testing.assert_allclose(np.array(logprobs) * m, lp_rows * m, rtol=1e-5, atol=1e-5)
    reference = forward_logprobs(model, tokens, 0.8, batches, batch_groups=groups)
    np.testing.assert_allclose(np.array(reference) * m, np.array(forward_logprobs(model, tokens, 0.8, batches)) * m,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_micro_batches_cut_to_their_own_width_give_the_same_loss_gradients_and_logprobs(tiny_model_dir, shared_prompt):
    """A micro-batch of short rows runs its own width, not the batch's (micro_batch_widths): same numbers,
    log-probs padded back to the batch's positions."""
    from grpo_mlx.train.gradients import forward_logprobs, micro_batch_widths, prompt_groups

    model, _ = lora_model(tiny_model_dir)
    rng = np.random.default_rng(9)
    G = 2
    # Group 0 short, group 1 long: the first micro-batch needs far fewer positions than the batch.
    prompts = [p for n in (5, 30) for p in [rng.integers(3, 200, size=n).tolist()] * G]
    completions = [rng.integers(3, 200, size=int(rng.integers(1, 12))).tolist() for _ in prompts]
    config = config_for()
    tokens, mask, adv, old, ref, norm = step_inputs(prompts, completions, 32, config)
    batches = micro_batches(len(prompts), G)
    groups = [prompt_groups(prompts, b) for b in batches] if shared_prompt else None
    widths = micro_batch_widths(prompts, completions, batches)
    assert widths[0] < 18 and widths[1] > 30 and tokens.shape[1] == 64
    assert micro_batch_widths(prompts, completions, batches, 32) == [32, 64]
    step = make_grad_step(model, config, split_head=not shared_prompt)
    g_full, loss_full, _, lp_full = accumulate_gradients(step, tokens, mask, adv, old, ref, batches, norm, 0, groups)
    grads, loss, _, logprobs = accumulate_gradients(step, tokens, mask, adv, old, ref, batches, norm, 0, groups, widths)
    assert loss == pytest.approx(loss_full, rel=1e-5, abs=1e-7)
    assert_same_grads(flat_grads(g_full), flat_grads(grads))
    m = np.array(mask)
    assert logprobs.shape == tokens[:, 1:].shape
    np.testing.assert_allclose(np.array(logprobs) * m, np.array(lp_full) * m, rtol=1e-5, atol=1e-5)
    trimmed = forward_logprobs(model, tokens, 0.8, batches, 0, not shared_prompt, groups, widths=widths)
    np.testing.assert_allclose(np.array(trimmed) * m, np.array(forward_logprobs(model, tokens, 0.8, batches, 0, not shared_prompt,
                                                                             groups)) * m, rtol=1e-5, atol=1e-5)
