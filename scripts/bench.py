#!/usr/bin/env python
"""Benchmark grpo-mlx's rollout and training step; one run, one table.

On a random-weight Qwen2-shaped model built here (nothing is downloaded):
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
import time
from pathlib import Path

from grpo_mlx.openblas import openblas_loaded, reexec_with_openblas

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
SYSTEM_PROMPT = "Solve the problem. Show your reasoning, then give the final number."

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


# ---------------------------------------------------------------- model and data


def build_model(work: Path, args) -> Path:
    """A random float32 Qwen2-shaped model whose BPE tokenizer is trained on the prompts' text."""
    from grpo_mlx.tiny_model import chat_corpus, make_tiny_model

    if GSM8K.exists():
        rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:3000]]
        texts = [f"{r['question']}\n{r['answer']}" for r in rows]
    else:
        texts = chat_corpus(3000)
    return make_tiny_model(
        work / "model", texts, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        intermediate_size=args.intermediate, vocab_size=args.vocab,
    )


def write_data(work: Path, examples) -> Path:
    """The prompts as mlx-lm-lora reads them: {train,valid,test}.jsonl of {prompt, answer, system}."""
    data = work / "data"
    data.mkdir(exist_ok=True)
    rows = "".join(json.dumps({"prompt": ex.prompt, "answer": str(ex.answer), "system": SYSTEM_PROMPT}) + "\n"
                   for ex in examples)
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text(rows)
    return data


def count_parameters(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


# ---------------------------------------------------------------- measurements
#
# Everything is measured round-robin, one repeat of each thing per round, so a
# machine whose load drifts (shared CPUs) biases no row against another.


def rollout_timers(model, tokenizer, prompts, G, T) -> dict:
    """name -> fn() returning completion tokens generated (1: ours vs. the naive baseline)."""
    from mlx_lm.generate import batch_generate

    from grpo_mlx.rollout import generate_rollout, make_sampler

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

    from grpo_mlx.logprobs import token_logprobs

    loss_and_grad = nn.value_and_grad(model, lambda m, t: token_logprobs(m, t).mean())
    return lambda: mx.eval(loss_and_grad(model, tokens))


def step_config(model_dir, data_file, reward_file, work, args, **overrides):
    from grpo_mlx.config import TrainConfig

    values = dict(
        model=str(model_dir), dataset=str(data_file), batch_size=args.batch_size, group_size=args.group_size,
        max_tokens=args.max_tokens, temperature=1.0, beta=0.04, learning_rate=1e-5, lora_rank=8, lora_layers=16,
        reward=[f"{reward_file}:digit_fraction"], system_prompt=SYSTEM_PROMPT, output=str(work / "run"),
        steps=1000, seed=0,
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
        from grpo_mlx.trainer import grpo_step, setup

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


def weights_and_kv_bytes(model, rows: int, length: int) -> tuple[int, int]:
    from mlx.utils import tree_flatten

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    a = model.args
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    kv = a.num_hidden_layers * 2 * rows * length * a.num_key_value_heads * head_dim * 4  # float32 keys + values
    return weights, kv


# ---------------------------------------------------------------- 4. mlx-lm-lora


def bench_mlx_lm_lora(python: str, model_dir, data_dir, reward_file, work, args) -> dict:
    """Its seconds per step from its per-iteration 'Speed: X it/s' lines, the first (warm-up) dropped.

    With --steps-per-report 1 each line times one iteration; its validation passes
    (first and last iteration) run before the timer restarts, so they are not in it.
    """
    iters = 1 + args.rounds + 1
    command = [
        python, "-m", "mlx_lm_lora.train", "--model", str(model_dir), "--train", "--train-mode", "grpo",
        "--data", str(data_dir), "--iters", str(iters), "--batch-size", str(args.batch_size),
        "--group-size", str(args.group_size), "--max-completion-length", str(args.max_tokens),
        "--learning-rate", "1e-5", "--beta", "0.04", "--temperature", "1.0", "--steps-per-eval", "100000",
        "--steps-per-report", "1", "--val-batches", "1", "--num-layers", "16",
        "--adapter-path", str(work / "mlx_lm_lora_adapters"),
        "--reward-functions-file", str(reward_file), "--reward-functions", "digit_fraction",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = work / "mlx_lm_lora.log"
    tic = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.mlx_lm_lora_timeout)
    wall = time.perf_counter() - tic
    log.write_text(done.stdout + "\n" + done.stderr)
    speeds = [float(x) for x in re.findall(r"Speed: ([\d.]+) it/s", done.stdout + done.stderr)]
    memory = [float(x) for x in re.findall(r"Memory: ([\d.]+)GB", done.stdout + done.stderr)]
    if done.returncode != 0 or len(speeds) < 2:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {done.returncode}, {len(speeds)} timed iterations; see {log}: {' | '.join(tail)}"}
    return {
        "seconds_per_step": statistics.median(1.0 / s for s in speeds[1:]),
        "peak_memory_bytes": max(memory) * 1e9 if memory else None,
        "wall_seconds": wall,
        "iterations": iters,
    }


# ---------------------------------------------------------------- report


def gb(x):
    return f"{x / 1e9:.3f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the numbers to this file")
    parser.add_argument("--mlx-lm-lora-python", default=os.environ.get("MLX_LM_LORA_PYTHON"),
                        help="python of a venv with mlx-lm-lora installed (e.g. /work/benchvenv/bin/python)")
    parser.add_argument("--mlx-lm-lora-timeout", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step (B)")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-tokens", type=int, default=64, help="completion length (random weights rarely stop)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurement rounds; each times every rollout, the fwd+bwd and one step of every variant")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer vocabulary cap")
    parser.add_argument("--skip-variants", action="store_true", help="only the default step (no memory variants)")
    parser.add_argument("--work-dir", help="where the model, data and logs go (default: a temporary folder)")
    args = parser.parse_args()
    reexec_with_openblas([sys.executable, *sys.argv])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO))

    import mlx.core as mx

    from grpo_mlx.config import TrainConfig
    from grpo_mlx.data import load_examples
    from grpo_mlx.prompts import render_prompt
    from grpo_mlx.rollout import pad_batch
    from grpo_mlx.gradients import LENGTH_BUCKET

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="grpo-mlx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    B, G, T = args.batch_size, args.group_size, args.max_tokens
    env = {
        "device": str(mx.default_device()),
        "openblas_preloaded": openblas_loaded(),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
        "cpu_count": os.cpu_count(),
    }
    print(f"device {env['device']}, OpenBLAS preloaded: {env['openblas_preloaded']}, "
          f"OPENBLAS_NUM_THREADS={env['openblas_num_threads']}; work dir {work}", flush=True)

    model_dir = build_model(work, args)
    (work / "our_rewards.py").write_text(OUR_REWARD)
    (work / "mlx_lm_lora_rewards.py").write_text(MLX_LM_LORA_REWARD)
    dataset = str(GSM8K) if GSM8K.exists() else "arithmetic"
    # Exactly B prompts: every step (ours and mlx-lm-lora's) trains on the same prompts, so
    # each step has the padded shape the "forward+backward alone" baseline is timed on.
    examples = load_examples(dataset, seed=0)[:B]
    data_file = work / "prompts.jsonl"
    data_file.write_text("".join(json.dumps({"question": ex.prompt, "answer": str(ex.answer)}) + "\n" for ex in examples))
    data_dir = write_data(work, examples)

    # ---- set up every variant; the default's model serves the rollout and fwd+bwd timings
    default_compile = TrainConfig.__dataclass_fields__["compile"].default
    reward_file = work / "our_rewards.py"
    default = f"default (compile={default_compile}, beta=0.04)"
    configs = {default: step_config(model_dir, data_file, reward_file, work, args)}
    if not args.skip_variants:
        configs[f"compile={not default_compile}"] = step_config(model_dir, data_file, reward_file, work, args, compile=not default_compile)
        configs["beta=0 (no reference pass)"] = step_config(model_dir, data_file, reward_file, work, args, beta=0.0)
        configs[f"micro_batch_size={G}"] = step_config(model_dir, data_file, reward_file, work, args, micro_batch_size=G)
        configs["grad_checkpoint"] = step_config(model_dir, data_file, reward_file, work, args, grad_checkpoint=True)
    print(f"setting up {len(configs)} training variants ...", flush=True)
    variants = StepVariants(configs)
    run = variants.runs[default]
    model, tokenizer = run.model, run.tokenizer
    params = count_parameters(model)
    prompts = [render_prompt(tokenizer, ex, run.system_prompt) for ex in examples[:B]]
    rows = [p for p in prompts for _ in range(G)]
    tokens, _ = pad_batch(rows, [[1] * T] * len(rows), 0, LENGTH_BUCKET)  # the step's padded shape
    timers = rollout_timers(model, tokenizer, prompts, G, T)
    timers["forward_backward"] = forward_backward_timer(model, tokens)

    print("warming up ...", flush=True)
    for fn in timers.values():
        fn()
    for name in configs:
        variants.step(name, record=False)
    seconds = {name: [] for name in timers}
    rates = {name: [] for name in timers}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds} ...", flush=True)
        for name, fn in timers.items():
            mx.random.seed(round_)
            tic = time.perf_counter()
            count = fn()
            seconds[name].append(time.perf_counter() - tic)
            rates[name].append((count or 0) / seconds[name][-1])
        for name in configs:
            variants.step(name)
    rollout = {name: {"tokens_per_sec": statistics.median(rates[name]), "seconds": statistics.median(seconds[name])}
               for name in ("ours", "ours_with_sampler_logprobs", "naive")}
    fwd_bwd = statistics.median(seconds["forward_backward"])
    step = variants.summary(default)
    variants = {name: variants.summary(name) for name in configs}
    weights, kv = weights_and_kv_bytes(model, B * G, max(map(len, prompts)) + T)

    lora = None
    if args.mlx_lm_lora_python and Path(args.mlx_lm_lora_python).exists():
        print("timing mlx-lm-lora's GRPO trainer ...", flush=True)
        try:
            lora = bench_mlx_lm_lora(args.mlx_lm_lora_python, model_dir, data_dir, work / "mlx_lm_lora_rewards.py", work, args)
        except subprocess.TimeoutExpired:
            lora = {"error": f"timed out after {args.mlx_lm_lora_timeout} s"}
    lora_note = ("not run: pass --mlx-lm-lora-python (a venv with `pip install mlx-lm-lora`)" if lora is None
                 else lora.get("error"))

    # ---- the numbers
    overhead = step["step_time"] / (rollout["ours"]["seconds"] + fwd_bwd)
    beta0 = variants.get("beta=0 (no reference pass)")
    result = {
        "rollout_vs_naive": rollout["ours"]["tokens_per_sec"] / rollout["naive"]["tokens_per_sec"],
        "overhead_ratio": overhead,
        "overhead_ratio_beta0": beta0["step_time"] / (rollout["ours"]["seconds"] + fwd_bwd) if beta0 else None,
        "memory_ratio": step["peak_memory_bytes"] / (weights + kv),
        "mlx_lm_lora_over_ours": lora["seconds_per_step"] / step["step_time"] if lora and "error" not in lora else None,
        "environment": env,
        "shape": {"B": B, "G": G, "max_tokens": T, "parameters": params, "prompt_tokens": [len(p) for p in prompts],
                  "padded_width": tokens.shape[1]},
        "rollout": rollout,
        "forward_backward_alone_s": fwd_bwd,
        "weights_bytes": weights,
        "kv_cache_bytes": kv,
        "steps": variants,
        "mlx_lm_lora": lora if lora is not None else {"error": lora_note},
    }

    # ---- the table
    lines = [
        f"grpo-mlx bench: {params / 1e6:.1f}M-parameter Qwen2-shaped float32 model, B={B} G={G} max_tokens={T}, "
        f"{env['device']}, OpenBLAS preloaded={env['openblas_preloaded']}, OPENBLAS_NUM_THREADS={env['openblas_num_threads']}",
        "",
        "| measure | value | note |",
        "| --- | --- | --- |",
        f"| rollout, grpo-mlx (shared prefill) | {rollout['ours']['tokens_per_sec']:.1f} tok/s | {rollout['ours']['seconds']:.2f} s for {B * G} completions |",
        f"| rollout, grpo-mlx keeping sampler log-probs | {rollout['ours_with_sampler_logprobs']['tokens_per_sec']:.1f} tok/s | the old per-token collection |",
        f"| rollout, mlx_lm.batch_generate (naive) | {rollout['naive']['tokens_per_sec']:.1f} tok/s | prompts repeated G times |",
        f"| **rollout_vs_naive** | **{result['rollout_vs_naive']:.2f}x** | |",
    ]
    for name, s in variants.items():
        lines.append(
            f"| step, {name} | {s['step_time']:.2f} s | gen {s['time/generation']:.2f}, rewards {s['time/rewards']:.3f}, "
            f"ref log-probs {s['time/logprobs']:.2f}, fwd+bwd+update {s['time/train']:.2f}, other {s['time/other']:.2f}; "
            f"peak {gb(s['peak_memory_bytes'])} |"
        )
    lines += [
        f"| forward+backward alone | {fwd_bwd:.2f} s | {tokens.shape[0]} x {tokens.shape[1]} tokens |",
        f"| **overhead_ratio** | **{overhead:.2f}** | step / (generation alone + fwd+bwd alone); target <= 1.15; includes the reference pass |",
    ]
    if beta0:
        lines.append(f"| overhead ratio, beta=0 | {result['overhead_ratio_beta0']:.2f} | no reference pass |")
    lines += [
        f"| weights + KV cache | {gb(weights + kv)} | weights {gb(weights)}, KV {gb(kv)} for {B * G} rows |",
        f"| **memory_ratio** | **{result['memory_ratio']:.2f}** | default step's peak / (weights + KV) |",
    ]
    if lora is not None and "error" not in lora:
        memory = f"; its peak {gb(lora['peak_memory_bytes'])}" if lora["peak_memory_bytes"] else ""
        lines += [
            f"| step, mlx-lm-lora GRPO | {lora['seconds_per_step']:.2f} s | median of {lora['iterations'] - 1} timed iterations{memory} |",
            f"| **mlx_lm_lora_over_ours** | **{result['mlx_lm_lora_over_ours']:.2f}x** | its s/step over ours |",
        ]
    else:
        lines.append(f"| mlx_lm_lora_over_ours | n/a | {lora_note} |")
    print("\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
