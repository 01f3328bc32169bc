"""`grpo-mlx report`: compare finished (or running, or killed) runs from their metrics.jsonl.

1. `summarize_run` reads one run directory into a flat dict of numbers: steps,
   best reward and its step, final reward, final KL, each reward function's
   final mean, training time and generated tokens. Only metrics.jsonl is needed;
   config.yaml, when present, adds the model, data set and loss type.
2. `summary_table` puts several runs side by side, one column per run.
3. `plot_runs` draws reward, KL and mean completion length against step, one
   line per run, into a PNG with matplotlib's Agg canvas (no display, no pyplot
   global state). matplotlib is the optional extra `grpo-mlx[plot]`.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from ..core.errors import UserError
from .display import format_duration, format_value, is_number, reward_functions
from .run_log import read_metrics

# (metric, y-axis label) of the three panels of the plot.
PLOTTED = [("reward", "reward"), ("kl", "KL"), ("completions/mean_length", "mean completion length")]
CONFIG_FIELDS = ("model", "dataset", "loss_type")


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over a run, skipping steps without a finite value."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if is_number(v) and math.isfinite(float(v)) and is_number(r.get("step")):
            steps.append(int(r["step"]))
            values.append(float(v))
    return steps, values


def _total(records: list[dict], key: str):
    values = [float(r[key]) for r in records if is_number(r.get(key)) and math.isfinite(float(r[key]))]
    return sum(values) if values else None


def _last(records: list[dict], key: str):
    _, values = _series(records, key)
    return values[-1] if values else None


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}  # a summary of the metrics is still worth showing
    return data if isinstance(data, dict) else {}


def summarize_run(run_dir) -> dict:
    """One run's headline numbers; None where the run logged nothing to compute them from.

    time is the sum of the trainer's per-step `step_time` (setup and checkpoint
    writes excluded). tokens are the completion tokens generated, recovered per
    step as tokens_per_sec/generation x time/generation (how the trainer
    computes that rate).
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps, rewards = _series(records, "reward")
    best = max(range(len(rewards)), key=rewards.__getitem__) if rewards else None
    tokens = [
        float(r["tokens_per_sec/generation"]) * float(r["time/generation"])
        for r in records
        if is_number(r.get("tokens_per_sec/generation")) and is_number(r.get("time/generation"))
    ]
    config = _read_config(run_dir)
    summary = {
        "run": str(run_dir),
        "steps": max((int(r["step"]) for r in records if is_number(r.get("step"))), default=0),
        "best_reward": rewards[best] if rewards else None,
        "best_step": steps[best] if rewards else None,
        "final_reward": rewards[-1] if rewards else None,
        "final_kl": _last(records, "kl"),
        "time": _total(records, "step_time"),
        "tokens": round(sum(tokens)) if tokens else None,
        "rewards": {label: _last(records, key) for label, key in reward_functions(_all_keys(records))},
    }
    summary.update({f: config.get(f) for f in CONFIG_FIELDS})
    return summary


def _all_keys(records: list[dict]) -> dict:
    # Every key any step logged, in first-seen order (a reward may skip a step).
    return {k: None for r in records for k in r}


def _run_names(run_dirs) -> list[str]:
    """Column headers: directory names, or the paths as given where two names clash."""
    names = [Path(d).name or str(d) for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def summary_table(summaries: list[dict]) -> Table:
    """The runs side by side: one row per quantity, one column per run."""
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    table.add_column("", style="dim", no_wrap=True)
    for name in _run_names([s["run"] for s in summaries]):
        table.add_column(name, justify="right")

    def show(value, kind="num"):
        return "-" if value is None else format_value(value, kind)

    def best(s):
        return "-" if s["best_reward"] is None else f"{format_value(s['best_reward'])} (step {s['best_step']})"

    rows = [(field.replace("_", " "), [str(s[field]) if s[field] is not None else "-" for s in summaries])
            for field in CONFIG_FIELDS if any(s[field] is not None for s in summaries)]
    rows += [
        ("steps", [str(s["steps"]) for s in summaries]),
        ("best reward", [best(s) for s in summaries]),
        ("final reward", [show(s["final_reward"]) for s in summaries]),
    ]
    labels = list(dict.fromkeys(label for s in summaries for label in s["rewards"]))
    rows += [(f"  final {label}", [show(s["rewards"].get(label)) for s in summaries]) for label in labels]
    rows += [
        ("final KL", [show(s["final_kl"]) for s in summaries]),
        ("time", ["-" if s["time"] is None else format_duration(s["time"]) for s in summaries]),
        ("tokens generated", [show(s["tokens"]) for s in summaries]),
    ]
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def plot_runs(run_dirs, out_path) -> Path:
    """Write a PNG of reward, KL and mean completion length against step, one line per run."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'grpo-mlx[plot]'") from None
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise UserError(f"cannot write the plot to {out_path}: folder {out_path.parent} does not exist")

    runs = [(name, read_metrics(d)) for name, d in zip(_run_names(run_dirs), run_dirs)]
    # A Figure with no pyplot: Agg renders it, no display and no global figure registry.
    fig = Figure(figsize=(7, 8), dpi=100, layout="constrained")
    axes = fig.subplots(len(PLOTTED), 1, sharex=True)
    for ax, (key, label) in zip(axes, PLOTTED):
        for i, (name, records) in enumerate(runs):
            steps, values = _series(records, key)
            colour = f"C{i % 10}"
            window = max(1, len(values) // 20)
            if window > 1:  # noisy per-step values faint, their running mean solid
                ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
                ax.plot(steps, _running_mean(values, window), color=colour, linewidth=2, label=name)
            else:
                ax.plot(steps, values, color=colour, linewidth=2, marker="o" if len(values) < 2 else None, label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].legend(loc="best", fontsize="small")
    # PNG unless the name asks for another format matplotlib writes (.pdf, .svg).
    image_format = out_path.suffix.lstrip(".").lower() or "png"
    try:
        fig.savefig(out_path, format=image_format)
    except ValueError:
        raise UserError(f"cannot write a {image_format!r} image: name the plot file out.png (or .pdf, .svg)") from None
    except OSError as e:
        raise UserError(f"cannot write the plot to {out_path}: {e.strerror or e}") from None
    return out_path


def _running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
