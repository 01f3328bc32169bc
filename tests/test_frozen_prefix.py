"""The frozen blocks before the first adapter run once a step (model/frozen_prefix.py): the reference pass
records their output, the policy passes replay it, and the log-probs, gradients and trained adapters
are those of the plain passes."""

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


def test_a_step_with_the_prefix_shared_trains_the_adapters_the_plain_step_does(tiny_model_dir, tmp_path, monkeypatch):
    """Two micro-batches, two updates (mu = 2), beta > 0: the first block runs in the reference pass only."""
    calls = []
    config = build_config({}, dict(model=str(tiny_model_dir), dataset="arithmetic", steps=1, batch_size=2, group_size=4,
                                   max_tokens=6, lora_rank=4, lora_layers=1, beta=0.1, num_iterations=2, seed=3,
                                   micro_batch_size=4, reward=[CHAR_CODES], learning_rate=0.5))
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
