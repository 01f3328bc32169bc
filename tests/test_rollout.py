"""Batched group rollouts: shared prefill, one decode batch, tokens and log-probs that agree."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.logprobs import token_logprobs
from grpo_mlx.policy import load_model
from grpo_mlx.rollout import generate_rollout, make_sampler, pad_batch


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    return model, tokenizer


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_shared_prefill_matches_naive_batch_generate_greedy(policy):
    from mlx_lm.generate import batch_generate

    model, tokenizer = policy
    prompts = [chat(tokenizer, "What is 12 plus 30?"), chat(tokenizer, "What is 7 plus 5? Think.")]
    rollout = generate_rollout(model, tokenizer, prompts, group_size=3, max_tokens=12, sampler=make_sampler(0.0))
    naive = batch_generate(model, tokenizer, [p for p in prompts for _ in range(3)], max_tokens=12, return_token_ids=True)
    eos = set(tokenizer.eos_token_ids)
    assert [[t for t in c if t not in eos] for c in rollout.completion_tokens] == naive.token_ids
    assert rollout.texts == naive.texts
    # Rows are grouped consecutively: greedy completions within a group agree.
    assert rollout.completion_tokens[0] == rollout.completion_tokens[2]


def test_all_completions_of_one_prompt_decode_in_one_batch(policy, monkeypatch):
    import importlib

    gen = importlib.import_module("mlx_lm.generate")  # the package re-exports a function of that name

    model, tokenizer = policy
    widths = []
    original = gen.GenerationBatch._step

    def spy(self):
        widths.append(len(self.uids))
        return original(self)

    monkeypatch.setattr(gen.GenerationBatch, "_step", spy)
    mx.random.seed(0)
    generate_rollout(model, tokenizer, [chat(tokenizer, "What is 1 plus 1?")], 8, 6, make_sampler(1.0))
    assert widths[0] == 8  # B=1, G=8: all eight rows in the first decode step


def test_recomputed_logprobs_equal_the_samplers(policy):
    """The padded training batch scores each sampled token as the generator did (T=1)."""
    model, tokenizer = policy
    prompts = [chat(tokenizer, "What is 40 plus 2?"), chat(tokenizer, "Add 3 and 9, please.")]
    mx.random.seed(1)
    rollout = generate_rollout(model, tokenizer, prompts, 4, 10, make_sampler(1.0))
    tokens, mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, bucket=32)
    recomputed = np.array(token_logprobs(model, tokens))
    for i, sampled in enumerate(rollout.sampling_logprobs):
        start = len(rollout.prompt_tokens[i]) - 1
        np.testing.assert_allclose(recomputed[i, start : start + len(sampled)], sampled, atol=2e-4, rtol=1e-4)
        assert np.array(mask)[i].sum() == len(rollout.completion_tokens[i])
    assert tokens.shape[1] % 32 == 0


def test_max_tokens_truncation_is_recorded(policy):
    model, tokenizer = policy
    mx.random.seed(2)
    rollout = generate_rollout(model, tokenizer, [chat(tokenizer, "Count to a hundred.")], 4, 3, make_sampler(1.0))
    for length, reason in zip(rollout.completion_lengths, rollout.finish_reasons):
        assert length <= 3
        assert reason == "length" or rollout.completion_tokens[0][-1] in tokenizer.eos_token_ids or length < 3
    assert all((r == "length") == (n == 3 and c[-1] not in tokenizer.eos_token_ids)
               for r, n, c in zip(rollout.finish_reasons, rollout.completion_lengths, rollout.completion_tokens))
