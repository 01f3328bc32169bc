"""Watching a run: the live training screen, and the plain lines that replace it off a terminal.

The trainer prints nothing; it hands one metrics dict per step (TRL's names) and,
every few steps, one sample dict to `Dashboard`:

1. On a terminal it shows a rich `Live` screen: a `Progress` row with ETA, a
   table of the latest metrics, sparklines of reward and KL, and the latest
   sample's best and worst completion.
2. Off a terminal (CI, `nohup`, a pipe) it prints one `key value | key value`
   line every `log_every` steps instead; `parse_plain_line` reads such a line
   back, so the format is a contract.
3. The screen is built by `Dashboard.render()` from stored state alone, so tests
   print it to a recording console rather than driving a terminal.

Writing and reading metrics.jsonl is `run_log`'s job; number formatting and the
terminal-or-plain choice live in `display`, shared with `report` and `eval`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column, Table
from rich.text import Text

from .display import format_duration, format_value, is_number, reward_functions, wants_plain_lines

# ---------------------------------------------------------------- text helpers

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values, width: int = 60) -> str:
    """One block character per value, lowest to highest; bucket means past `width`.

    Non-finite values are dropped. A constant series is drawn at mid height so it
    does not read as "zero".
    """
    finite = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
    if not finite or width <= 0:
        return ""
    if len(finite) > width:
        n = len(finite)
        finite = [_mean(finite[i * n // width : (i + 1) * n // width]) for i in range(width)]
    low, high = min(finite), max(finite)
    if high == low:
        return BLOCKS[3] * len(finite)
    return "".join(BLOCKS[round((v - low) / (high - low) * (len(BLOCKS) - 1))] for v in finite)


def _mean(numbers):
    return sum(numbers) / len(numbers)


def _one_line(text, limit: int) -> str:
    # Plain mode promises one line per record with no control characters.
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip(text, max_chars: int, max_lines: int) -> str:
    lines = str(text).strip().splitlines()
    cut = "\n".join(lines[:max_lines])
    if len(cut) > max_chars:
        cut = cut[: max_chars - 1]
    return cut + "…" if cut != str(text).strip() else cut


# ---------------------------------------------------------------- plain lines

# (label in the line, metric name); per-reward-function means go after reward_std.
PLAIN_FIELDS = [("reward", "reward"), ("reward_std", "reward_std"), ("kl", "kl"), ("loss", "loss"), ("len", "completions/mean_length"),
                ("eval", "eval/accuracy")]  # eval: on the steps that evaluated (--eval-every)


def plain_line(metrics: dict, total_steps: int, sec_per_step=None) -> str:
    """`step 12/200 | reward 0.438 | reward_std 0.21 | kl 0.0012 | loss -0.0031 | len 23.4 | 3.21s/step`."""
    pieces = [f"step {int(metrics.get('step', 0))}/{total_steps}"]
    fields = PLAIN_FIELDS[:2] + reward_functions(metrics) + PLAIN_FIELDS[2:]
    for label, key in fields:
        if is_number(metrics.get(key)):
            pieces.append(f"{label} {format_value(metrics[key])}")
    if sec_per_step is not None:
        pieces.append(f"{sec_per_step:.2f}s/step")
    return " | ".join(pieces)


def parse_plain_line(line: str) -> dict:
    """Read a `plain_line` back: {"step": 12, "total_steps": 200, "reward": 0.438, ..., "sec_per_step": 3.21}."""
    line = line.strip()
    if not line.startswith("step "):
        raise ValueError(f"not a metrics line: {line!r}")
    values = {}
    for piece in line.split(" | "):
        if piece.endswith("s/step") and " " not in piece:
            values["sec_per_step"] = float(piece[: -len("s/step")])
            continue
        key, _, value = piece.partition(" ")
        if key == "step":
            step, _, total = value.partition("/")
            values["step"], values["total_steps"] = int(step), int(total)
        else:
            values[key] = float(value)
    return values


def plain_sample_line(sample: dict) -> str:
    """`sample step 5 | prompt ... | best 2: ... | worst 0: ...`, each text cut to one short line."""
    best, worst = _best_and_worst(sample)
    pieces = [f"sample step {sample.get('step', '?')}", f"prompt {_one_line(sample.get('prompt', ''), 80)}"]
    if best is not None:
        pieces.append(f"best {format_value(best[1])}: {_one_line(best[0], 80)}")
        pieces.append(f"worst {format_value(worst[1])}: {_one_line(worst[0], 80)}")
    return " | ".join(pieces)


# ---------------------------------------------------------------- the metrics table

# (section, [(metric, label, kind)]); the reward functions' means are inserted after "reward".
SECTIONS = [
    ("reward", [
        ("reward", "reward", "num"),
        ("reward_std", "reward std", "num"),
        ("frac_reward_zero_std", "zero-std groups", "pct"),
        ("eval/accuracy", "held-out acc", "pct"),  # the latest evaluation's, kept between evaluations
    ]),
    ("policy", [
        ("kl", "KL", "num"),
        ("loss", "loss", "num"),
        ("entropy", "entropy", "num"),
        ("clip_ratio/low_mean", "clip low", "pct"),
        ("clip_ratio/high_mean", "clip high", "pct"),
        ("clip_ratio/region_mean", "clip region", "pct"),
        ("ratio/mean", "ratio mean", "num"),
        ("grad_norm", "grad norm", "num"),
        ("learning_rate", "learning rate", "num"),
    ]),
    ("completions", [
        ("completions/mean_length", "mean length", "num"),
        ("completions/max_length", "max length", "num"),
        ("completions/clipped_ratio", "truncated", "pct"),
    ]),
    # Multi-turn runs only (--tools, --env): the section shows when its metrics are logged.
    ("tools", [
        ("turns/mean", "turns", "num"),
        ("tools/calls_per_trajectory", "calls/traj", "num"),
        ("tools/errors", "call errors", "pct"),
        ("time/tools", "in tools", "s"),
    ]),
    ("speed", [
        ("tokens_per_sec/generation", "gen tok/s", "num"),
        ("tokens_per_sec/train", "train tok/s", "num"),
        ("peak_memory_gb", "peak memory", "gb"),
        ("step_time", "step time", "s"),
        ("time/generation", "generation", "s"),
        ("time/train", "training", "s"),
    ]),
]
# Logged to metrics.jsonl but left off the screen, which must fit a 80x24 terminal.
OFF_SCREEN = {"step", "skipped_update", "completions/min_length", "time/rewards", "time/logprobs", "eval/truncated", "eval/time",
              "eval/turns/mean", "eval/tools/calls_per_trajectory"}
# Metrics with a row in SECTIONS or deliberately hidden; any other goes under "other".
PLACED_METRICS = {key for _, rows in SECTIONS for key, _, _ in rows} | OFF_SCREEN
# Sections stacked in each screen column: reward over tools | policy | completions over speed over other.
SECTION_STACKS = [["reward", "tools"], ["policy"], ["completions", "speed", "other"]]


def _is_reward_function_key(key: str) -> bool:
    # rewards/<name>/mean has a row; its std is left to metrics.jsonl.
    return key.startswith("rewards/") and (key.endswith("/mean") or key.endswith("/std"))


def metrics_table(metrics: dict) -> Columns:
    """The latest metrics, one small two-column table per section, side by side.

    Three columns (reward | policy | completions over speed) fit 80 characters;
    on a narrower terminal they wrap onto more rows rather than shrink, since a
    number cut to "0.…" tells nothing.
    """
    tables = {}
    for title, rows in SECTIONS:
        rows = [(key, label, kind) for key, label, kind in rows if key in metrics]
        if title == "reward":
            at = 1 if rows and rows[0][0] == "reward" else 0
            rows[at:at] = [(key, f"  {label}", "num") for label, key in reward_functions(metrics)]
        tables[title] = _section_table(title, rows, metrics)
    other = [(key, key, "num") for key in metrics if key not in PLACED_METRICS and not _is_reward_function_key(key)]
    tables["other"] = _section_table("other", other, metrics)

    cells = [Group(*(tables[title] for title in stack if tables[title] is not None)) for stack in SECTION_STACKS]
    return Columns([cell for cell in cells if cell.renderables], padding=(0, 2))


def _section_table(title: str, rows, metrics: dict) -> Table | None:
    if not rows:
        return None
    table = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    for key, label, kind in rows:
        table.add_row(label, format_value(metrics[key], kind))
    return table


# ---------------------------------------------------------------- the sample panel


def trajectory_text(messages: list[dict]) -> str:
    """A multi-turn trajectory turn by turn: each message on one line after its role (its own line breaks
    become spaces, so the panel's few lines show the turns rather than one tool call's code)."""
    return "\n".join(f"{m.get('role', '?')}: {' '.join(str(m.get('content', '')).split())}" for m in messages)


def _best_and_worst(sample: dict):
    """((text, reward) best, (text, reward) worst), or (None, None) without completions.

    A multi-turn sample's text is its trajectory turn by turn (`trajectory_text`)."""
    completions, rewards = sample.get("completions") or [], sample.get("rewards") or []
    if sample.get("trajectories"):
        completions = [trajectory_text(messages) for messages in sample["trajectories"]]
    pairs = list(zip(completions, rewards))
    if not pairs:
        return None, None
    score = lambda p: p[1] if is_number(p[1]) and math.isfinite(float(p[1])) else -math.inf  # noqa: E731
    return max(pairs, key=score), min(pairs, key=score)


def sample_panel(sample: dict) -> Panel:
    """The sample's prompt, gold answer and its best and worst completion with their rewards."""
    # Text objects, never markup strings: completions may contain "[bold]" and the like.
    body = Table.grid(padding=(0, 1))
    body.add_column(style="bold", no_wrap=True)
    body.add_column()
    # A multi-turn sample needs its lines for the trajectory: the answer shares the prompt's row, the
    # best trajectory gets three lines (a call, its output, the answer), the worst one.
    turns = bool(sample.get("trajectories"))
    prompt = _clip(sample.get("prompt", ""), 300, 2 if turns else 4)
    if turns and sample.get("answer") is not None:
        prompt += f"  (answer {_clip(sample['answer'], 60, 1)})"
    body.add_row("prompt", Text(prompt))
    if sample.get("answer") is not None and not turns:
        body.add_row("answer", Text(_clip(sample["answer"], 100, 1)))
    rewards = sample.get("rewards") or []
    if rewards:
        body.add_row("rewards", Text(" ".join(format_value(r) for r in rewards[:32]) + (" …" if len(rewards) > 32 else "")))
    best, worst = _best_and_worst(sample)
    if best is not None:
        body.add_row(Text(f"best {format_value(best[1])}", style="green"), Text(_clip(best[0], 400, 3 if turns else 6)))
        body.add_row(Text(f"worst {format_value(worst[1])}", style="red"), Text(_clip(worst[0], 400, 1 if turns else 6)))
    return Panel(body, title=f"sample · step {sample.get('step', '?')}", title_align="left")


# ---------------------------------------------------------------- the dashboard

# Why the loss sits near 0 with one update per rollout, which users read as "not learning": with mu = 1
# the ratio is exactly 1, so the loss is minus the mean advantage (0 within each group) plus beta * KL,
# while its gradient, the policy gradient, is not 0. Shown under the metrics (once, in plain lines).
LOSS_HINT = "μ=1: ratio 1, loss = −mean advantage + β·KL ≈ 0 by design; gradient ≠ 0"


def _progress_row(console: Console) -> Progress:
    """`step 4/40`, a bar taking the spare width, then `10% · 2.00s/step · elapsed · ETA`.

    The Dashboard's own `Live` draws it, so this Progress is never started; the
    ETA comes from the trainer's step times (a task field), not rich's estimate
    of update spacing, which would count setup and checkpoint writes.
    """
    return Progress(
        TextColumn("step {task.completed:.0f}/{task.fields[total_steps]}", style="bold", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=10)),
        TextColumn("{task.fields[timing]}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis")),
        console=console,
        auto_refresh=False,
        expand=True,
    )


class Dashboard:
    """Live screen on a terminal, one plain line per `log_every` steps elsewhere.

    total_steps: the run's last step (progress and ETA count toward it).
    console: a rich Console (default: stdout).
    refresh_every: seconds between redraws of the live screen; it also redraws
        on every update, so this only keeps the clock and ETA moving mid-step.
    plain: True forces plain lines, False forces the live screen; None picks by
        whether the console is a (non-dumb) terminal.
    log_every: print a plain line every N steps (and at the last step).
    num_iterations: the run's updates per rollout (mu); 1 shows LOSS_HINT.
    """

    SPARK_WIDTH = 60

    def __init__(self, total_steps: int, console: Console | None = None, refresh_every: float = 1, plain: bool | None = None, log_every: int = 1,
                 num_iterations: int | None = None):
        self.total_steps = int(total_steps)
        self.loss_hint = LOSS_HINT if num_iterations == 1 else None
        self._hint_printed = False
        self.console = console if console is not None else Console()
        self.refresh_every = refresh_every
        self.plain = wants_plain_lines(self.console) if plain is None else plain
        self.log_every = max(1, int(log_every))
        self.latest_metrics: dict = {}
        self.latest_sample: dict | None = None
        self.latest_eval: dict = {}  # the eval/ metrics of the last step that evaluated
        self.reward_history: list[float] = []
        self.kl_history: list[float] = []
        self._recent_step_seconds = deque(maxlen=10)  # for the ETA
        self._last_update = None
        self._start = time.monotonic()
        self._lock = threading.Lock()  # the live refresh thread renders while update() writes
        self._live = None
        self._progress = _progress_row(self.console)
        self._progress_task = self._progress.add_task("train", total=max(self.total_steps, 1), total_steps=self.total_steps, timing="")

    # -- lifecycle

    def __enter__(self):
        self._start = time.monotonic()
        if not self.plain:
            self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=1 / self.refresh_every)
            self._live.start()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.stop()
            self._live = None
        return False

    # -- input

    def update(self, metrics: dict) -> None:
        now = time.monotonic()
        with self._lock:
            step = int(metrics.get("step", self.step + 1))
            self.latest_metrics = {**metrics, "step": step}
            self.latest_eval.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
            for history, key in ((self.reward_history, "reward"), (self.kl_history, "kl")):
                if is_number(metrics.get(key)):
                    history.append(float(metrics[key]))
            # The trainer's own step_time excludes our overhead; wall clock is the fallback.
            if is_number(metrics.get("step_time")):
                self._recent_step_seconds.append(float(metrics["step_time"]))
            elif self._last_update is not None:
                self._recent_step_seconds.append(now - self._last_update)
            self._last_update = now
        if self._live is not None:
            self._live.refresh()
        elif self.plain and (step % self.log_every == 0 or step == self.total_steps):
            if self.loss_hint and not self._hint_printed and "loss" in metrics:
                self._print(f"note: {self.loss_hint}")
                self._hint_printed = True
            self._print(plain_line(self.latest_metrics, self.total_steps, self.sec_per_step))

    def show_sample(self, sample: dict) -> None:
        with self._lock:
            self.latest_sample = sample
        if self._live is not None:
            self._live.refresh()
        elif self.plain:
            self._print(plain_sample_line(sample))

    def message(self, text: str) -> None:
        """A one-off status line; on the live screen it scrolls above the dashboard."""
        if self.plain:
            self._print(_one_line(text, 10_000))
        else:
            (self._live.console if self._live is not None else self.console).print(Text(str(text)))

    def _print(self, line: str) -> None:
        # soft_wrap: never break a plain line at the console width; no markup, no highlighting.
        self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)

    # -- derived state

    @property
    def step(self) -> int:
        return int(self.latest_metrics.get("step", 0))

    @property
    def sec_per_step(self):
        return _mean(self._recent_step_seconds) if self._recent_step_seconds else None

    # -- the screen

    def render(self):
        """The whole live screen, from stored state only."""
        with self._lock:
            steps_done = min(self.step, self.total_steps)
            self._progress.update(self._progress_task, completed=steps_done, timing=self._timing_text(steps_done))
            screen_rows = [self._progress, Text()]
            if self.latest_metrics:
                screen_rows.append(metrics_table({**self.latest_eval, **self.latest_metrics}))
                if self.loss_hint and "loss" in self.latest_metrics:
                    screen_rows.append(Text(self.loss_hint, style="dim", no_wrap=True, overflow="ellipsis"))
                screen_rows += [Text(), self._sparklines()]
            if self.latest_sample is not None:
                screen_rows.append(sample_panel(self.latest_sample))
            return Group(*screen_rows)

    def _timing_text(self, steps_done: int) -> str:
        """`10% · 2.00s/step · elapsed 0:08 · ETA 1:12` (elapsed alone before the first step)."""
        elapsed = format_duration(time.monotonic() - self._start)
        if not self.latest_metrics:
            return f"waiting for the first step · elapsed {elapsed}"
        sec_per_step = self.sec_per_step
        percent = 100 * steps_done / self.total_steps if self.total_steps else 100
        eta = sec_per_step * (self.total_steps - steps_done) if sec_per_step is not None else None
        rate = f"{sec_per_step:.2f}s/step" if sec_per_step is not None else "?s/step"
        return f"{percent:.0f}% · {rate} · elapsed {elapsed} · ETA {format_duration(eta)}"

    def _sparklines(self):
        rows = []
        for name, history in (("reward", self.reward_history), ("KL", self.kl_history)):
            if history:
                finite = [v for v in history if math.isfinite(v)] or [float("nan")]
                span = (f"{format_value(history[0])} → {format_value(history[-1])}  "
                        f"(min {format_value(min(finite))}, max {format_value(max(finite))})")
                rows.append((name, history, span))
        # Label, sparkline and span on one line: a wrapped sparkline reads as two.
        room = self.console.width - len("reward") - 2 * 2 - max((len(span) for *_, span in rows), default=0) - 1
        width = max(10, min(self.SPARK_WIDTH, room))
        grid = Table.grid(padding=(0, 2))
        for name, history, span in rows:
            grid.add_row(Text(name, style="bold"), Text(sparkline(history, width), style="cyan"), Text(span, style="dim"))
        return grid
