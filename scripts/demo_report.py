#!/usr/bin/env python
"""The README's figures of the two embedded demos, from the files their runs wrote: never typed by hand.

    python scripts/demo_report.py --work /tmp/demos --machine "2-core x86-64 Linux VM, MLX CPU, OpenBLAS"

runs, in --work (each step skipped when its output is already there, so an interrupted measurement
resumes), the commands README "Set up" and "Tool demo" give, as a user runs them (OpenBLAS preloaded
by grpo-mlx itself, seed 0):

    grpo-mlx eval --output before.json                       # the demo's base model
    grpo-mlx train --output run                              # the demo: 300 steps
    grpo-mlx eval --adapter-path run --output after.json
    GRPO_MLX_NO_OPENBLAS=1 grpo-mlx train --steps 20 --output run_no_openblas   # step time without OpenBLAS
    grpo-mlx eval --tools calculator --output tools_before.json
    grpo-mlx train --dataset multiplication --tools calculator --output tools_run
    grpo-mlx eval --adapter-path tools_run --tools calculator --output tools_after.json

then writes scripts/demo_results.json and prints the README's two blocks; tests/test_docs.py checks
that the README holds exactly `render_demo` and `render_tool_demo` of that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "demo_results.json"
REPO = Path(__file__).resolve().parents[1]
# The tool demo's table: step windows (first, last), 1-based and inclusive.
TOOL_WINDOWS = ((1, 5), (6, 10), (11, 20), (21, 30), (31, 40), (41, 50))
NO_OPENBLAS_STEPS = 20
# What the demo's sampled reward is averaged over, at each end of the run.
REWARD_WINDOW = 20

COMMANDS = [  # (output that marks the step done, arguments, extra environment)
    ("before.json", ["eval", "--output", "{w}/before.json"], {}),
    ("run/metrics.jsonl", ["train", "--output", "{w}/run"], {}),
    ("after.json", ["eval", "--adapter-path", "{w}/run", "--output", "{w}/after.json"], {}),
    ("run_no_openblas/metrics.jsonl", ["train", "--steps", str(NO_OPENBLAS_STEPS), "--output", "{w}/run_no_openblas"],
     {"GRPO_MLX_NO_OPENBLAS": "1"}),
    ("tools_before.json", ["eval", "--tools", "calculator", "--output", "{w}/tools_before.json"], {}),
    ("tools_run/metrics.jsonl", ["train", "--dataset", "multiplication", "--tools", "calculator",
                                 "--output", "{w}/tools_run"], {}),
    ("tools_after.json", ["eval", "--adapter-path", "{w}/tools_run", "--tools", "calculator",
                          "--output", "{w}/tools_after.json"], {}),
]


def run_all(work: Path) -> None:
    """Each command of COMMANDS whose output is missing, with `python -m grpo_mlx.cli` of this checkout."""
    work.mkdir(parents=True, exist_ok=True)
    for done, args, extra in COMMANDS:
        if (work / done).exists():
            continue
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
        # grpo-mlx preloads OpenBLAS itself, as for a user; a preload from the caller's shell would defeat the opt-out.
        env.pop("LD_PRELOAD", None)
        env.pop("GRPO_MLX_OPENBLAS_TRIED", None)
        command = [sys.executable, "-m", "grpo_mlx.cli", *(a.format(w=work) for a in args)]
        print("+", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def summarize(work: Path, machine: str) -> dict:
    """The figures the README states, from the eval --output files and the runs' metrics.jsonl."""
    load = lambda name: json.loads((work / name).read_text())  # noqa: E731
    before, after = load("before.json"), load("after.json")
    demo = read_metrics(work / "run")
    no_blas = read_metrics(work / "run_no_openblas")
    tools_before, tools_after = load("tools_before.json"), load("tools_after.json")
    tools = read_metrics(work / "tools_run")

    def mean(rows, key, digits):
        return round(statistics.mean(m[key] for m in rows), digits)

    def median(rows, key, digits):
        return round(statistics.median(m[key] for m in rows), digits)

    def window(first, last):
        return [m for m in tools if first <= m["step"] <= last]

    tool_step = statistics.median(m["step_time"] for m in tools)
    tool_wait = statistics.median(m["time/tools"] for m in tools)
    return {
        "machine": machine,
        "demo": {
            "steps": len(demo),
            "total_s": round(sum(m["step_time"] for m in demo)),
            "median_step_s": median(demo, "step_time", 2),
            "median_step_s_no_openblas": median(no_blas, "step_time", 2),
            "steps_no_openblas": len(no_blas),
            "reward_first": mean(demo[:REWARD_WINDOW], "reward", 2),
            "reward_last": mean(demo[-REWARD_WINDOW:], "reward", 2),
            "problems": before["num_examples"],
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "completion_tokens": mean(demo, "completions/mean_length", 1),
        },
        "tools": {
            "steps": len(tools),
            "reward_by_window": [mean(window(a, b), "reward", 2) for a, b in TOOL_WINDOWS],
            "calls_by_window": [mean(window(a, b), "tools/calls_per_trajectory", 2) for a, b in TOOL_WINDOWS],
            "problems": tools_before["num_examples"],
            "accuracy_before": tools_before["accuracy"],
            "accuracy_after": tools_after["accuracy"],
            "calls_before": round(tools_before["tools/calls_per_trajectory"], 2),
            "calls_after": round(tools_after["tools/calls_per_trajectory"], 2),
            "median_step_s": round(tool_step, 1),
            "completion_tokens": mean(tools, "completions/mean_length", 1),
            "median_tools_s": round(tool_wait, 2),
            "tools_share": round(tool_wait / tool_step, 3),
        },
    }


def pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def render_demo(r: dict) -> str:
    """README "Set up": what the demo reached, and how fast."""
    d = r["demo"]
    return (f"Measured on a {r['machine']}, seed 0: the demo's {d['steps']} steps took {d['total_s']} s (a median "
            f"{d['median_step_s']} s a step; {d['median_step_s_no_openblas']} s over {d['steps_no_openblas']} steps "
            f"with `GRPO_MLX_NO_OPENBLAS=1`), the sampled reward climbed from {d['reward_first']} to {d['reward_last']} "
            f"(the mean of the first and of the last {REWARD_WINDOW} steps) and held-out greedy accuracy from "
            f"{pct(d['accuracy_before'])} to {pct(d['accuracy_after'])} on its {d['problems']} test problems "
            "(`grpo-mlx eval --adapter-path runs/demo`).")


def render_tool_demo(r: dict) -> str:
    """README "Tool demo": reward and tool calls by steps, accuracy before and after, and the step's time."""
    t, d = r["tools"], r["demo"]
    se = lambda p: f"{pct(p)} ± {pct(standard_error(p, t['problems']))}"  # noqa: E731
    windows = " | ".join(f"{a}-{b}" for a, b in TOOL_WINDOWS)
    return "\n".join([
        f"On the same machine (seed 0), the sampled reward and tool calls per trajectory by steps, and held-out "
        f"greedy accuracy with the tool on the {t['problems']} test problems (± standard error):",
        "",
        f"| steps | {windows} |",
        "| --- " * (len(TOOL_WINDOWS) + 1) + "|",
        "| reward (accuracy) | " + " | ".join(f"{v:.2f}" for v in t["reward_by_window"]) + " |",
        "| `tools/calls_per_trajectory` | " + " | ".join(f"{v:.2f}" for v in t["calls_by_window"]) + " |",
        "",
        f"| `grpo-mlx eval ... --tools calculator` | before (base) | after {t['steps']} steps |",
        "| --- | --- | --- |",
        f"| accuracy (greedy) | {se(t['accuracy_before'])} | {se(t['accuracy_after'])} |",
        f"| tool calls per problem | {t['calls_before']:.2f} | {t['calls_after']:.2f} |",
        "",
        f"A step took {t['median_step_s']} s (median) against {d['median_step_s']} s for the single-turn demo "
        f"(measured minutes apart): its trajectories run to {t['completion_tokens']} tokens on average, against "
        f"{d['completion_tokens']}; of that step, {t['median_tools_s']} s ({pct(t['tools_share'])}) waited for "
        "the calculator (`time/tools`, median).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="where the runs and eval files go (reused)")
    parser.add_argument("--machine", required=True, help="where it ran, named beside the seconds")
    args = parser.parse_args()
    run_all(args.work)
    results = summarize(args.work, args.machine)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(render_demo(results), render_tool_demo(results), sep="\n\n")


if __name__ == "__main__":
    main()
