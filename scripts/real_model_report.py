#!/usr/bin/env python
"""The README's real-model numbers, from the files the run wrote: never typed by hand.

After the three commands of README "Train a real model offline" (eval before, train, eval
after, each eval with --output FILE.json):

    python scripts/real_model_report.py --before before.json --after after.json \
        --run runs/smollm2-arithmetic --machine "2-core x86-64 Linux VM, MLX CPU, OpenBLAS"

writes scripts/real_model_results.json and prints the markdown table the README holds;
tests/test_docs.py checks that the README's table is this file's table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "real_model_results.json"


def summarize(before: dict, after: dict, metrics: list[dict], machine: str) -> dict:
    """The figures the README states, from `grpo-mlx eval --output` files and the run's metrics.jsonl."""
    def window(rows, key):
        return round(statistics.mean(m[key] for m in rows), 3)

    first, last = metrics[:10], metrics[-10:]
    return {
        "machine": machine,
        "steps": len(metrics),
        "problems": before["num_examples"],
        "accuracy_before": before["accuracy"], "correct_before": before["correct"],
        "accuracy_after": after["accuracy"], "correct_after": after["correct"],
        "cut_before": before["greedy_truncated"], "cut_after": after["greedy_truncated"],
        "reward_first_10": window(first, "reward"), "reward_last_10": window(last, "reward"),
        "accuracy_reward_first_10": window(first, "rewards/accuracy/mean"),
        "accuracy_reward_last_10": window(last, "rewards/accuracy/mean"),
        "length_first_10": window(first, "completions/mean_length"),
        "length_last_10": window(last, "completions/mean_length"),
        "median_step_s": round(statistics.median(m["step_time"] for m in metrics), 1),
        "median_generation_s": round(statistics.median(m["time/generation"] for m in metrics), 1),
        "median_logprobs_s": round(statistics.median(m.get("time/logprobs", 0.0) for m in metrics), 1),
        "median_train_s": round(statistics.median(m["time/train"] for m in metrics), 1),
        "peak_memory_gb": round(max(m["peak_memory_gb"] for m in metrics), 2),
    }


def render(r: dict) -> str:
    """The README's table of a results dict."""
    pct = lambda a: f"{100 * a:.1f}%"  # noqa: E731
    return "\n".join([
        f"Measured on a {r['machine']}, {r['steps']} steps:",
        "",
        "| | before (the base model; the first 10 steps) | after GRPO (its last 10 steps) |",
        "| --- | --- | --- |",
        f"| greedy accuracy, {r['problems']} test problems | {pct(r['accuracy_before'])} ({r['correct_before']}) "
        f"| {pct(r['accuracy_after'])} ({r['correct_after']}) |",
        f"| greedy replies cut at max tokens | {r['cut_before']} | {r['cut_after']} |",
        f"| sampled reward | {r['reward_first_10']} "
        f"| {r['reward_last_10']} |",
        f"| sampled accuracy | {r['accuracy_reward_first_10']} | {r['accuracy_reward_last_10']} |",
        f"| sampled completion length (tokens) | {r['length_first_10']} | {r['length_last_10']} |",
        "",
        f"A step took {r['median_step_s']} s (median: generation {r['median_generation_s']} s, reference log-probs "
        f"{r['median_logprobs_s']} s, forward+backward+update {r['median_train_s']} s); the peak was "
        f"{r['peak_memory_gb']} GB.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="grpo-mlx eval --output of the base model")
    parser.add_argument("--after", type=Path, required=True, help="grpo-mlx eval --output of the trained adapters")
    parser.add_argument("--run", type=Path, required=True, help="the run directory (its metrics.jsonl)")
    parser.add_argument("--machine", required=True, help="where it ran, named beside the seconds")
    args = parser.parse_args()
    metrics = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    results = summarize(json.loads(args.before.read_text()), json.loads(args.after.read_text()), metrics, args.machine)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
