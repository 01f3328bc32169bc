"""Batched group rollouts: shared prefill, one decode batch, tokens and log-probs that agree."""

import mlx.core as mx
import numpy as np
import pytest

from grpo_mlx.model.logprobs import token_logprobs
from grpo_mlx.model.policy import load_model
from grpo_mlx.rollout.batch import generate_rollout, make_sampler, pad_batch


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
    rollout = generate_rollout(model, tokenizer, prompts, 4, 10, make_sampler(1.0), with_logprobs=True)
    tokens, mask = pad_batch(rollout.prompt_tokens, rollout.completion_tokens, 0, bucket=32)
    recomputed = np.array(token_logprobs(model, tokens))
    for i, sampled in enumerate(rollout.sampling_logprobs):
        start = len(rollout.prompt_tokens[i]) - 1
        np.testing.assert_allclose(recomputed[i, start : start + len(sampled)], sampled, atol=2e-4, rtol=1e-4)
        assert np.array(mask)[i].sum() == len(rollout.completion_tokens[i])
    assert tokens.shape[1] % 32 == 0


def eos_sampler(tokenizer, stop_at: int | None):
    """Greedy on every token but the stop tokens; a stop token at decode step `stop_at` (None: never)."""
    calls = []

    def sampler(logprobs):
        calls.append(1)
        bonus = np.zeros(logprobs.shape[-1], dtype=np.float32)
        bonus[sorted(tokenizer.eos_token_ids)] = np.inf if len(calls) == stop_at else -np.inf
        return mx.argmax(logprobs + mx.array(bonus), axis=-1)

    return sampler


def test_max_tokens_truncation_is_recorded(policy):
    model, tokenizer = policy
    eos = set(tokenizer.eos_token_ids)
    prompts = [chat(tokenizer, "Count to a hundred.")]

    never_stops = generate_rollout(model, tokenizer, prompts, 4, 3, eos_sampler(tokenizer, None))
    assert never_stops.completion_lengths == [3] * 4
    assert never_stops.finish_reasons == ["length"] * 4 and never_stops.truncated == [True] * 4
    assert not any(t in eos for c in never_stops.completion_tokens for t in c)

    stops_second = generate_rollout(model, tokenizer, prompts, 4, 3, eos_sampler(tokenizer, 2))
    assert stops_second.completion_lengths == [2] * 4  # the stop token is kept: the policy learns to stop
    assert stops_second.finish_reasons == ["stop"] * 4 and stops_second.truncated == [False] * 4
    assert all(c[-1] in eos and c[0] == n[0] for c, n in zip(stops_second.completion_tokens, never_stops.completion_tokens))
    assert stops_second.texts == [tokenizer.decode(c[:1]) for c in never_stops.completion_tokens]


def recording_calls(monkeypatch):
    """(body widths, head widths): the input width of every call of the Qwen2 body with a cache
    (prefill and decode) and of the tied LM head (the embedding as a linear layer)."""
    import mlx.nn as nn
    from mlx_lm.models import qwen2

    body_widths, head_widths = [], []
    body, head = qwen2.Qwen2Model.__call__, nn.Embedding.as_linear

    def recording_body(self, inputs, cache=None, *args, **kwargs):
        if cache is not None:
            body_widths.append(inputs.shape[1])
        return body(self, inputs, cache, *args, **kwargs)

    monkeypatch.setattr(qwen2.Qwen2Model, "__call__", recording_body)
    monkeypatch.setattr(nn.Embedding, "as_linear", lambda self, x: head_widths.append(x.shape[1]) or head(self, x))
    return body_widths, head_widths


def test_prompts_longer_than_the_prefill_step_are_prefilled_in_chunks(policy, monkeypatch):
    model, tokenizer = policy
    prompts = [chat(tokenizer, "Add these numbers one by one and show each partial sum: 12, 30, 7, 5, 19, 44, 3 and 21."),
               chat(tokenizer, "What is 2 plus 2?")]
    step = 8
    assert len(prompts[0]) > 4 * step
    widths, _ = recording_calls(monkeypatch)
    chunked = generate_rollout(model, tokenizer, prompts, 2, 8, make_sampler(0.0), prefill_step_size=step,
                               with_logprobs=True)
    # Each prompt but its last token (the generator's first input), `step` tokens at a time, then decoding.
    chunks = [min(step, len(p) - 1 - start) for p in prompts for start in range(0, len(p) - 1, step)]
    assert widths[: len(chunks)] == chunks and set(widths[len(chunks) :]) == {1}
    whole = generate_rollout(model, tokenizer, prompts, 2, 8, make_sampler(0.0))
    assert chunked.completion_tokens == whole.completion_tokens
    # Independently of any cache: each greedy token is the argmax of one forward over the whole
    # sequence, with the log-prob that forward gives it.
    for prompt, completion, sampled in zip(chunked.prompt_tokens, chunked.completion_tokens, chunked.sampling_logprobs):
        logits = model(mx.array(prompt + completion)[None])[0, len(prompt) - 1 : -1]
        logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        assert list(logprobs.argmax(axis=-1)) == completion
        np.testing.assert_allclose(sampled, logprobs[np.arange(len(completion)), completion], atol=2e-4, rtol=1e-4)


def test_rollout_samples_without_lora_dropout_and_leaves_training_on(tiny_model_dir):
    """LoRA dropout acts in the training forward only: the rollout samples the policy itself."""
    from mlx.utils import tree_flatten

    from grpo_mlx.model.policy import attach_adapters

    model, tokenizer, _ = load_model(str(tiny_model_dir))
    attach_adapters(model, 4, -1, 20.0, dropout=0.5)
    mx.random.seed(0)
    model.load_weights([(k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(model.trainable_parameters())
                        if k.endswith("lora_b")], strict=False)
    dropouts = [m for name, m in model.named_modules() if name.endswith(".dropout")]
    assert dropouts and all(m.training for m in dropouts)  # as the trainer holds the model
    prompts = [chat(tokenizer, "What is 12 plus 30?")]
    rollouts = [generate_rollout(model, tokenizer, prompts, 4, 8, make_sampler(0.0), with_logprobs=True) for _ in range(2)]
    assert all(m.training for m in dropouts)  # training goes on with dropout

    model.eval()
    expected = generate_rollout(model, tokenizer, prompts, 4, 8, make_sampler(0.0), with_logprobs=True)
    for rollout in rollouts:
        assert rollout.completion_tokens == expected.completion_tokens
        for got, want in zip(rollout.sampling_logprobs, expected.sampling_logprobs):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_the_prefill_runs_without_the_lm_head_and_samples_the_same_tokens(policy, monkeypatch):
    import grpo_mlx.rollout.batch as rollout_module

    model, tokenizer = policy
    prompts = [chat(tokenizer, "What is 12 plus 30?"), chat(tokenizer, "Add 3 and 9, please. Think step by step.")]
    prefixes = {len(p) - 1 for p in prompts}  # the prefill's input widths
    body_widths, head_widths = recording_calls(monkeypatch)
    body_only = generate_rollout(model, tokenizer, prompts, 3, 10, make_sampler(0.0), with_logprobs=True)
    assert prefixes <= set(body_widths)  # the prompts were prefilled through the body...
    assert not prefixes & set(head_widths) and 1 in head_widths  # ...and the head ran on decode steps only
    body_widths.clear(), head_widths.clear()
    monkeypatch.setattr(rollout_module, "lm_head_split_matches", lambda m: False)  # the whole model, as before
    whole = generate_rollout(model, tokenizer, prompts, 3, 10, make_sampler(0.0), with_logprobs=True)
    assert prefixes <= set(head_widths)
    assert body_only.completion_tokens == whole.completion_tokens and body_only.texts == whole.texts
    for got, want in zip(body_only.sampling_logprobs, whole.sampling_logprobs):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
