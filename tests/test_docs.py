"""The README's figures come from files that scripts write, so they cannot drift from the code."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_model_table_is_the_one_the_report_script_renders_from_its_results():
    report = load_script("real_model_report")
    results = json.loads(report.RESULTS.read_text())
    readme = (REPO / "README.md").read_text()
    assert report.render(results) in readme
    # The recipe the README runs is the one measured.
    assert "grpo-mlx train --recipe smollm2-arithmetic" in readme


def test_the_report_script_reads_what_the_run_and_eval_wrote():
    report = load_script("real_model_report")
    before = {"num_examples": 4, "accuracy": 0.25, "correct": 1, "greedy_truncated": 3}
    after = {"num_examples": 4, "accuracy": 0.75, "correct": 3, "greedy_truncated": 0}
    metrics = [{"reward": r, "rewards/accuracy/mean": r, "completions/mean_length": 10.0 - r, "step_time": 2.0 + r,
                "time/generation": 1.0, "time/logprobs": 0.5, "time/train": 0.5 + r, "peak_memory_gb": 1.0 + r}
               for r in (0.0, 0.5, 1.0)]
    r = report.summarize(before, after, metrics, "test box")
    assert (r["accuracy_before"], r["accuracy_after"], r["steps"], r["median_step_s"], r["peak_memory_gb"]) == \
        (0.25, 0.75, 3, 2.5, 2.0)
    table = report.render(r)
    assert "| greedy accuracy, 4 test problems | 25.0% (1) | 75.0% (3) |" in table and "test box" in table
    assert "| sampled completion length (tokens) | 9.5 | 9.5 |" in table
