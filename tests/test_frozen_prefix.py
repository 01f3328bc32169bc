"""The frozen blocks before the first adapter run once a step (model/frozen_prefix.py): the rollout keeps
their output (or the reference pass records it), the log-prob passes replay it, and the log-probs,
gradients and trained adapters are those of the plain passes."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from grpo_mlx.core.config import build_config
from grpo_mlx.model.frozen_prefix import PrefixStates, frozen_blocks, prefix_sharing_matches
from grpo_mlx.model.logprobs import group_token_logprobs, token_logprobs
from grpo_mlx.model.policy import attach_adapters
from grpo_mlx.train import trainer
from test_planner import CHAR_CODES, fixed_rollout

TOKENS = mx.array(np.random.default_rng(1).integers(0, 97, size=(4, 12)))
GROUPS = ((0, 2, 5), (2, 4, 3))  # rows 0-1 share 5 prompt tokens, rows 2-3 share 3
SHARED = mx.concatenate([mx.broadcast_to(TOKENS[:1, :5], (2, 5)), TOKENS[:2, 5:]], axis=1)
SHARED = mx.concatenate([SHARED, mx.concatenate([mx.broadcast_to(TOKENS[2:3, :3], (2, 3)), TOKENS[2:, 3:]], axis=1)])


def adapted_model(family: str, blocks: int = 4, adapted: int = 2):
    """A random mlx-lm model of `blocks` blocks with LoRA on the last `adapted`, B matrices non-zero."""
    from mlx_lm.models import llama, qwen2

    module = qwen2 if family == "qwen2" else llama
    args = dict(model_type=family, hidden_size=32, num_hidden_layers=blocks, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=97, tie_word_embeddings=family == "qwen2")
    mx.random.seed(7)
    model = module.Model(module.ModelArgs.from_dict(args))
    attach_adapters(model, rank=4, num_layers=adapted, scale=2.0)
    model.update(tree_map_b(model))
    mx.eval(model.parameters())
    return model


def tree_map_b(model):
    """Non-zero LoRA B matrices, so the adapters change the output (they start at zero)."""
    from mlx.utils import tree_unflatten

    rng = np.random.default_rng(2)
    return tree_unflatten([(k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32)))
                           for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_the_frozen_blocks_are_counted_and_the_sharing_checks_out(family):
    model = adapted_model(family, blocks=4, adapted=2)
    assert frozen_blocks(model) == 2 and prefix_sharing_matches(model)
    assert frozen_blocks(adapted_model(family, blocks=4, adapted=4)) == 0
    assert not prefix_sharing_matches(adapted_model(family, blocks=4, adapted=4))  # nothing to share


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_replayed_logprobs_and_gradients_equal_the_plain_ones(family, shared_prompt):
    model = adapted_model(family)
    prefix = PrefixStates(frozen_blocks(model))

    def logprobs(p):
        if shared_prompt:
            return group_token_logprobs(model, SHARED, GROUPS, temperature=0.8, prefix=p)
        return token_logprobs(model, TOKENS, temperature=0.8, start=3, split_head=True, prefix=p)

    weights = mx.array(np.random.default_rng(3).normal(size=(4, 11)).astype(np.float32))
    loss_and_grad = nn.value_and_grad(model, lambda p: (logprobs(p) * weights).sum())
    plain_loss, plain_grads = loss_and_grad(None)
    prefix.record()
    recorded = logprobs(prefix)
    prefix.replay()
    replayed_loss, replayed_grads = loss_and_grad(prefix)
    assert len(prefix.states) == (2 if shared_prompt else 1) and prefix.position == len(prefix.states)
    np.testing.assert_allclose(np.array(recorded), np.array(logprobs(None)), atol=1e-6)
    np.testing.assert_allclose(replayed_loss.item(), plain_loss.item(), rtol=1e-6)
    plain, replayed = dict(tree_flatten(plain_grads)), dict(tree_flatten(replayed_grads))
    assert plain.keys() == replayed.keys() and any(np.abs(np.array(v)).max() > 0 for v in plain.values())
    for k in plain:
        np.testing.assert_allclose(np.array(replayed[k]), np.array(plain[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_states_replayed_out_of_order_give_other_logprobs():
    """The check the trainer relies on can fail: the second call's states in the first call's place differ."""
    model = adapted_model("qwen2")
    prefix = PrefixStates(frozen_blocks(model))
    prefix.record()
    first = token_logprobs(model, TOKENS[:2], start=3, split_head=True, prefix=prefix)
    token_logprobs(model, TOKENS[2:], start=3, split_head=True, prefix=prefix)
    prefix.replay()
    prefix.states.reverse()
    swapped = token_logprobs(model, TOKENS[:2], start=3, split_head=True, prefix=prefix)
    assert np.abs(np.array(swapped) - np.array(first)).max() > 1e-2


def two_update_config(model_dir):
    """One step of 2 groups of 4 in two micro-batches, two updates (mu = 2), beta > 0, LoRA on the last of 2 blocks."""
    return build_config({}, dict(model=str(model_dir), dataset="arithmetic", steps=1, batch_size=2, group_size=4,
                                 max_tokens=6, lora_rank=4, lora_layers=1, beta=0.1, num_iterations=2, seed=3,
                                 micro_batch_size=4, reward=[CHAR_CODES], learning_rate=0.5))


def test_a_step_with_the_prefix_shared_trains_the_adapters_the_plain_step_does(tiny_model_dir, tmp_path, monkeypatch):
    """Two micro-batches, two updates (mu = 2), beta > 0: the first block runs in the reference pass only."""
    calls = []
    config = two_update_config(tiny_model_dir)
    results = {}
    for shared in (True, False):
        messages = []
        run = trainer.setup(replace(config, output=str(tmp_path / str(shared))), log=messages.append)
        assert (run.prefix is not None) and run.prefix.blocks == 1
        assert any("frozen blocks before the first adapter (1 of 2) run once a step" in m for m in messages)
        if not shared:
            run.prefix = None
        block_class, original = type(run.model.layers[0]), type(run.model.layers[0]).__call__
        monkeypatch.setattr(block_class, "__call__",
                            lambda self, *a, original=original, **k: calls.append(id(self)) or original(self, *a, **k))
        run.rollout_fn = fixed_rollout(6)
        run.optimizer = optim.SGD(learning_rate=config.learning_rate)
        calls.clear()
        (metrics, _), = list(trainer.train(run))
        monkeypatch.setattr(block_class, "__call__", original)
        first_block = id(run.model.layers[0])
        results[shared] = (metrics, {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())},
                           calls.count(first_block), calls.count(id(run.model.layers[1])))
    (shared_metrics, shared_adapters, shared_first, shared_second), (plain_metrics, plain_adapters, plain_first, _) = \
        results[True], results[False]
    # Reference pass: 2 micro-batches x 2 calls (prompts, completions); each of 2 updates: 4 more without sharing.
    assert (shared_first, plain_first, shared_second) == (4, 12, 12)
    for k in ("loss", "kl", "ratio/mean"):
        np.testing.assert_allclose(shared_metrics[k], plain_metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for k in plain_adapters:
        np.testing.assert_allclose(shared_adapters[k], plain_adapters[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in shared_adapters.items() if k.endswith("lora_b"))


def test_a_step_on_the_rollouts_kept_states_runs_no_frozen_block_after_generating(tiny_model_dir, tmp_path, monkeypatch):
    """The real rollout keeps the frozen block's output: the log-prob passes never run that block, and the
    step's loss, KL and trained adapters are those of the plain step on the same rollout."""
    calls = []
    config = two_update_config(tiny_model_dir)
    results = {}
    for shared in (True, False):
        run = trainer.setup(replace(config, output=str(tmp_path / str(shared))))
        if not shared:
            run.prefix = None
        block_class, original = type(run.model.layers[0]), type(run.model.layers[0]).__call__
        phase = ["rollout"]
        monkeypatch.setattr(block_class, "__call__",
                            lambda self, *a, original=original, **k: calls.append((phase[0], id(self))) or original(self, *a, **k))
        generate, update = run.rollout_fn, trainer.update_policy

        def rollout_fn(*args, **kwargs):
            phase[0] = "rollout"
            return generate(*args, **kwargs)

        def update_policy(run, rollout, *args):
            assert (rollout.prefix_states is not None) == shared
            phase[0] = "passes"
            return update(run, rollout, *args)

        run.rollout_fn = rollout_fn
        monkeypatch.setattr(trainer, "update_policy", update_policy)
        run.optimizer = optim.SGD(learning_rate=config.learning_rate)
        calls.clear()
        (metrics, _), = list(trainer.train(run))
        monkeypatch.setattr(block_class, "__call__", original)
        monkeypatch.setattr(trainer, "update_policy", update)
        first_block = id(run.model.layers[0])
        results[shared] = (metrics, {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())},
                           calls.count(("passes", first_block)), calls.count(("rollout", first_block)))
    (shared_metrics, shared_adapters, shared_passes, shared_rollout), (plain_metrics, plain_adapters, plain_passes, plain_rollout) = \
        results[True], results[False]
    # Reference pass and 2 updates, 2 micro-batches x 2 calls each: 12 calls of the first block without the states.
    assert (shared_passes, plain_passes) == (0, 12) and shared_rollout == plain_rollout > 0
    for k in ("loss", "kl", "ratio/mean"):
        np.testing.assert_allclose(shared_metrics[k], plain_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for k in plain_adapters:
        np.testing.assert_allclose(shared_adapters[k], plain_adapters[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in shared_adapters.items() if k.endswith("lora_b"))


class _StopTokenizer:
    """Stops on a handful of token ids, so some rows of a random model stop early."""
    eos_token_ids = {5, 11, 17, 23, 29, 31, 37}

    def decode(self, ids):
        return ""


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_states_kept_while_generating_give_the_reference_logprobs(family, shared_prompt):
    """The rollout keeps the frozen blocks' output (record_blocks); laid out per pass (states_for_passes)
    and replayed, it gives the log-probs of the plain forward, rows that stopped early included."""
    from grpo_mlx.model.frozen_prefix import states_for_passes
    from grpo_mlx.rollout.batch import generate_rollout, make_sampler, pad_batch
    from grpo_mlx.train.gradients import micro_batch_widths, plan_micro_batches

    model = adapted_model(family)
    prompts = [[1, 2, 3, 4, 6], [7, 8, 9, 10, 12, 13, 14, 15, 16], [18, 19, 20, 21, 22, 24, 25]]
    mx.random.seed(0)
    rollout = generate_rollout(model, _StopTokenizer(), prompts, 3, 8, make_sampler(1.0), record_blocks=2)
    lengths = rollout.completion_lengths
    assert rollout.prefix_states is not None and min(lengths) < 8 == max(lengths)  # some rows stopped early
    tokens, mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, 8)
    start, batches, batch_groups = plan_micro_batches(rollout.prompt_tokens, 3 if shared_prompt else 4, shared_prompt)
    prefix = PrefixStates(frozen_blocks(model))
    widths = micro_batch_widths(rollout.prompt_tokens, rollout.completion_tokens, batches)
    assert min(widths) < tokens.shape[1]  # a micro-batch narrower than the batch
    prefix.load(states_for_passes(rollout.prefix_states, widths, batches, batch_groups))
    for b, groups, w in zip(batches, batch_groups or [None] * len(batches), widths):
        def logprobs(p):
            if groups is not None:
                return group_token_logprobs(model, tokens[b, :w], groups, temperature=0.8, prefix=p)
            return token_logprobs(model, tokens[b, :w], temperature=0.8, start=start, split_head=True, prefix=p)
        got, expected = logprobs(prefix), logprobs(None)
        assert got.shape == (b.stop - b.start, w - 1)
        np.testing.assert_allclose(np.array(got * mask[b, : w - 1]), np.array(expected * mask[b, : w - 1]), atol=1e-4)
    assert prefix.position == len(prefix.states)


def test_groups_run_longest_last_and_the_step_trains_what_the_unordered_step_does(tiny_model_dir, tmp_path, monkeypatch):
    """update_policy orders the groups by length (micro-batches of similar rows, each cut to its own width):
    the rows' advantages and log-probs move with them, so the trained adapters are the data order's."""
    from grpo_mlx.rollout.batch import Rollout
    from grpo_mlx.train import gradients

    assert gradients.groups_by_length([[1] * 5, [1] * 5, [2] * 3, [2] * 3, [3] * 4, [3] * 4],
                                      [[0] * 2, [0] * 9, [0] * 1, [0] * 2, [0] * 3, [0] * 3], 2) == [1, 2, 0]

    def rollout_fn(model, tokenizer, prompts, group_size, max_tokens, sampler, **kwargs):
        rows = [list(p) for p in prompts for _ in range(group_size)]
        # The first group's rows longest, the last's shortest: the length order reverses the groups.
        completions = [[40 + (7 * i + 3 * j) % 200 for j in range(max_tokens - i // group_size * 3 - i % 2)]
                       for i in range(len(rows))]
        return Rollout(rows, completions, [tokenizer.decode(c) for c in completions], ["length"] * len(rows), group_size)

    config = build_config({}, dict(model=str(tiny_model_dir), dataset="arithmetic", steps=1, batch_size=3, group_size=2,
                                   max_tokens=12, lora_rank=4, lora_layers=1, beta=0.1, seed=3, micro_batch_size=2,
                                   reward=[CHAR_CODES], learning_rate=0.5))
    results, orders = {}, []
    for ordered in (True, False):
        if not ordered:
            monkeypatch.setattr(trainer, "groups_by_length", lambda p, c, g: list(range(len(p) // g)))
        else:
            monkeypatch.setattr(trainer, "groups_by_length",
                                lambda *a: orders.append(gradients.groups_by_length(*a)) or orders[-1])
        run = trainer.setup(replace(config, output=str(tmp_path / str(ordered))))
        run.rollout_fn = rollout_fn
        run.optimizer = optim.SGD(learning_rate=config.learning_rate)
        (metrics, _), = list(trainer.train(run))
        results[ordered] = metrics, {k: np.array(v) for k, v in tree_flatten(run.model.trainable_parameters())}
    assert orders == [[2, 1, 0]]
    for k in ("loss", "kl", "entropy"):
        np.testing.assert_allclose(results[True][0][k], results[False][0][k], rtol=1e-5, atol=1e-7, err_msg=k)
    for k, v in results[False][1].items():
        np.testing.assert_allclose(results[True][1][k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in results[True][1].items() if k.endswith("lora_b"))


def test_a_generator_whose_calls_are_laid_out_otherwise_keeps_no_states():
    """_row_states maps the generator's calls to rows only where their layout is the one it reads (a first call
    of every row, then one call per step of the rows answering): else None, and the reference pass records."""
    from grpo_mlx.rollout.batch import _row_states

    prompt = [mx.zeros((1, 3, 4))]
    rows_of_steps = [[1, 0], [1]]  # step 1 answers for rows 1 and 0, step 2 for row 1 only
    calls = [mx.arange(8, dtype=mx.float32).reshape(2, 1, 4), mx.ones((2, 1, 4)), 2 * mx.ones((1, 1, 4))]
    states = _row_states([prompt], calls, rows_of_steps, 2)
    assert [tuple(s[1].shape) for s in states] == [(2, 4), (3, 4)]
    np.testing.assert_array_equal(np.array(states[0][1][0]), [4, 5, 6, 7])  # row 0 was second in the first call
    np.testing.assert_array_equal(np.array(states[1][1][2]), [2, 2, 2, 2])
    assert _row_states([prompt], calls[:2], rows_of_steps, 2) is None  # a call missing
    assert _row_states([prompt], [calls[0], calls[2], calls[1]], rows_of_steps, 2) is None  # rows per call differ
    assert _row_states([prompt], [calls[0], (calls[1],), calls[2]], rows_of_steps, 2) is None  # not an array
