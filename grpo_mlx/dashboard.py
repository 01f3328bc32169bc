"""Watching a run: the live dashboard, the plain-line fallback and metrics.jsonl.

The trainer prints nothing; it hands one metrics dict per step (TRL's names) and,
every few steps, one sample dict to the pieces here:

1. `MetricsLogger` appends each dict as one JSON line, flushed and fsynced, so a
   run killed at any moment leaves every completed step readable by
   `read_metrics`, which skips the half-written last line.
2. `Dashboard` shows a rich `Live` screen on a terminal: progress with ETA, a
   table of the latest metrics, sparklines of reward and KL, and the latest
   sample's best and worst completion. Off a terminal (CI, `nohup`, a pipe) it
   prints one `key value | key value` line every `log_every` steps instead;
   `parse_plain_line` reads such a line back, so the format is a contract.
3. The screen is built by `Dashboard.render()` from stored state alone, so tests
   print it to a recording console rather than driving a terminal.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .errors import UserError

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "completions.jsonl"

# ---------------------------------------------------------------- metrics.jsonl


def _jsonable(value):
    # numpy / mlx scalars carry .item(); anything else is kept readable as text.
    return value.item() if hasattr(value, "item") else str(value)


class MetricsLogger:
    """Appends metric and sample dicts to RUN_DIR/metrics.jsonl and completions.jsonl.

    Every line is flushed and fsynced before `log` returns: a SIGKILL or power
    loss costs at most the line being written. NaN and Infinity are written as
    Python's json writes them (read back exactly by `read_metrics`).
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics = self._open(self.run_dir / METRICS_FILE)
        self._samples = None  # opened on the first sample: most short runs log none

    @staticmethod
    def _open(path: Path):
        # A run killed mid-line leaves a partial last line; appending after it would
        # glue the next good line onto it, so cut it off before resuming.
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        return open(path, "a", encoding="utf-8")

    @staticmethod
    def _write(f, record: dict) -> None:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def log(self, metrics: dict) -> None:
        self._write(self._metrics, metrics)

    def log_sample(self, sample: dict) -> None:
        if self._samples is None:
            self._samples = self._open(self.run_dir / SAMPLES_FILE)
        self._write(self._samples, sample)

    def close(self) -> None:
        for f in (self._metrics, self._samples):
            if f is not None and not f.closed:
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def read_metrics(path) -> list[dict]:
    """The records of a JSONL file (metrics.jsonl, completions.jsonl, or a run directory).

    Lines that do not parse as a JSON object are skipped: the only way to get
    one is a run killed while writing its last line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        raise UserError(f"no metrics file at {path}: point at a run directory or its {METRICS_FILE}")
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ---------------------------------------------------------------- formatting

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values, width: int = 60) -> str:
    """One block character per value, lowest to highest; bucket means past `width`.

    Non-finite values are dropped. A constant series is drawn at mid height so it
    does not read as "zero".
    """
    vals = [float(v) for v in values if is_number(v) and math.isfinite(float(v))]
    if not vals or width <= 0:
        return ""
    if len(vals) > width:
        n = len(vals)
        vals = [_mean(vals[i * n // width : (i + 1) * n // width]) for i in range(width)]
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return BLOCKS[3] * len(vals)
    return "".join(BLOCKS[round((v - lo) / (hi - lo) * (len(BLOCKS) - 1))] for v in vals)


def _mean(xs):
    return sum(xs) / len(xs)


def is_number(v) -> bool:
    """A real number, or something float() reads as one (numpy and mlx scalars); not text."""
    if isinstance(v, (str, bytes)):
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def fmt(value, kind: str = "num") -> str:
    """Compact numbers: 3 significant digits, no exponent above 1, units by kind.

    kind: "num", "pct" (a fraction shown as a percentage), "s" (seconds), "gb".
    """
    if isinstance(value, int) and kind != "pct":  # bool is an int too; a count stays exact
        text = str(int(value))
    elif not is_number(value):
        return str(value)
    else:
        v = float(value) * (100 if kind == "pct" else 1)
        if not math.isfinite(v):
            text = str(v)
        elif v == 0:
            text = "0"
        elif abs(v) >= 999.5:  # "%.3g" would switch to 1.23e+03
            text = f"{v:.0f}"
        else:
            text = f"{v:.3g}"
    return text + {"num": "", "pct": "%", "s": "s", "gb": " GB"}[kind]


def fmt_duration(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
PLAIN_FIELDS = [("reward", "reward"), ("reward_std", "reward_std"), ("kl", "kl"), ("loss", "loss"), ("len", "completions/mean_length")]


def plain_line(metrics: dict, total_steps: int, sec_per_step=None) -> str:
    """`step 12/200 | reward 0.438 | reward_std 0.21 | kl 0.0012 | loss -0.0031 | len 23.4 | 3.21s/step`."""
    parts = [f"step {int(metrics.get('step', 0))}/{total_steps}"]
    fields = PLAIN_FIELDS[:2] + [(name, key) for name, key in reward_functions(metrics)] + PLAIN_FIELDS[2:]
    for label, key in fields:
        if is_number(metrics.get(key)):
            parts.append(f"{label} {fmt(metrics[key])}")
    if sec_per_step is not None:
        parts.append(f"{sec_per_step:.2f}s/step")
    return " | ".join(parts)


def parse_plain_line(line: str) -> dict:
    """Read a `plain_line` back: {"step": 12, "total_steps": 200, "reward": 0.438, ..., "sec_per_step": 3.21}."""
    line = line.strip()
    if not line.startswith("step "):
        raise ValueError(f"not a metrics line: {line!r}")
    out = {}
    for part in line.split(" | "):
        if part.endswith("s/step") and " " not in part:
            out["sec_per_step"] = float(part[: -len("s/step")])
            continue
        key, _, value = part.partition(" ")
        if key == "step":
            step, _, total = value.partition("/")
            out["step"], out["total_steps"] = int(step), int(total)
        else:
            out[key] = float(value)
    return out


def reward_functions(metrics: dict):
    """(label, key) for each `rewards/<name>/mean`, in the trainer's order."""
    keys = [k for k in metrics if k.startswith("rewards/") and k.endswith("/mean")]
    names = [k[len("rewards/") : -len("/mean")] for k in keys]
    labels = [reward_label(name) for name in names]
    # Two plug-ins with the same function name keep their full names, so no label hides another.
    labels = [label if labels.count(label) == 1 else _one_word(name) for label, name in zip(labels, names)]
    return list(zip(labels, keys))


def reward_label(name: str) -> str:
    """A reward function's short name: `path/to/file.py:fn` and `pkg.mod:fn` show as `fn`."""
    return _one_word(name.rpartition(":")[2] or name)


def _one_word(text: str) -> str:
    # A plain-line label is one word and never contains the " | " separator.
    return "_".join(str(text).replace("|", "_").split()) or "_"


# ---------------------------------------------------------------- the table

# (section, [(metric, label, kind)]); the reward functions' means are inserted after "reward".
SECTIONS = [
    ("reward", [
        ("reward", "reward", "num"),
        ("reward_std", "reward std", "num"),
        ("frac_reward_zero_std", "zero-std groups", "pct"),
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
OFF_SCREEN = {"step", "skipped_update", "completions/min_length", "time/rewards", "time/logprobs"}
KNOWN = {key for _, rows in SECTIONS for key, _, _ in rows} | OFF_SCREEN


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
        rows = [(k, label, kind) for k, label, kind in rows if k in metrics]
        if title == "reward":
            at = 1 if rows and rows[0][0] == "reward" else 0
            rows[at:at] = [(k, f"  {name}", "num") for name, k in reward_functions(metrics)]
        tables[title] = _section_table(title, rows, metrics)
    other = [(k, k, "num") for k in metrics if k not in KNOWN and not _is_reward_function_key(k)]
    tables["other"] = _section_table("other", other, metrics)

    stacks = [["reward"], ["policy"], ["completions", "speed", "other"]]
    cells = [Group(*(tables[t] for t in stack if tables[t] is not None)) for stack in stacks]
    return Columns([c for c in cells if c.renderables], padding=(0, 2))


def _section_table(title: str, rows, metrics: dict) -> Table | None:
    if not rows:
        return None
    t = Table(title=title, title_justify="left", title_style="bold", show_header=False, box=None, padding=(0, 1))
    t.add_column(style="dim", no_wrap=True)
    t.add_column(justify="right", no_wrap=True)
    for key, label, kind in rows:
        t.add_row(label, fmt(metrics[key], kind))
    return t


# ---------------------------------------------------------------- the dashboard


class Dashboard:
    """Live screen on a terminal, one plain line per `log_every` steps elsewhere.

    total_steps: the run's last step (progress and ETA count toward it).
    console: a rich Console (default: stdout).
    refresh_every: seconds between redraws of the live screen; it also redraws
        on every update, so this only keeps the clock and ETA moving mid-step.
    plain: True forces plain lines, False forces the live screen; None picks by
        whether the console is a (non-dumb) terminal.
    log_every: print a plain line every N steps (and at the last step).
    """

    SPARK_WIDTH = 60

    def __init__(self, total_steps: int, console: Console | None = None, refresh_every: float = 1, plain: bool | None = None, log_every: int = 1):
        self.total_steps = int(total_steps)
        self.console = console if console is not None else Console()
        self.refresh_every = refresh_every
        self.plain = (not self.console.is_terminal or self.console.is_dumb_terminal) if plain is None else plain
        self.log_every = max(1, int(log_every))
        self.latest: dict = {}
        self.sample: dict | None = None
        self.rewards: list[float] = []
        self.kls: list[float] = []
        self._step_times = deque(maxlen=10)  # recent seconds/step, for the ETA
        self._last_update = None
        self._start = time.monotonic()
        self._lock = threading.Lock()  # the live refresh thread renders while update() writes
        self._live = None

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
            self.latest = {**metrics, "step": step}
            for series, key in ((self.rewards, "reward"), (self.kls, "kl")):
                if is_number(metrics.get(key)):
                    series.append(float(metrics[key]))
            # The trainer's own step_time excludes our overhead; wall clock is the fallback.
            if is_number(metrics.get("step_time")):
                self._step_times.append(float(metrics["step_time"]))
            elif self._last_update is not None:
                self._step_times.append(now - self._last_update)
            self._last_update = now
        if self._live is not None:
            self._live.refresh()
        elif self.plain and (step % self.log_every == 0 or step == self.total_steps):
            self._print(plain_line(self.latest, self.total_steps, self.sec_per_step))

    def show_sample(self, sample: dict) -> None:
        with self._lock:
            self.sample = sample
        if self._live is not None:
            self._live.refresh()
        elif self.plain:
            best, worst = _best_and_worst(sample)
            parts = [f"sample step {sample.get('step', '?')}", f"prompt {_one_line(sample.get('prompt', ''), 80)}"]
            if best is not None:
                parts.append(f"best {fmt(best[1])}: {_one_line(best[0], 80)}")
                parts.append(f"worst {fmt(worst[1])}: {_one_line(worst[0], 80)}")
            self._print(" | ".join(parts))

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
        return int(self.latest.get("step", 0))

    @property
    def sec_per_step(self):
        return _mean(self._step_times) if self._step_times else None

    # -- the screen

    def render(self):
        """The whole live screen, from stored state only."""
        with self._lock:
            parts = [self._progress(), Text()]
            if self.latest:
                parts += [metrics_table(self.latest), Text(), self._sparklines()]
            if self.sample is not None:
                parts.append(sample_panel(self.sample))
            return Group(*parts)

    def _progress(self):
        spp = self.sec_per_step
        elapsed = time.monotonic() - self._start
        done = min(self.step, self.total_steps)
        pct = 100 * done / self.total_steps if self.total_steps else 100
        if not self.latest:
            info = f"waiting for the first step · elapsed {fmt_duration(elapsed)}"
        else:
            eta = spp * (self.total_steps - done) if spp is not None else None
            rate = f"{spp:.2f}s/step" if spp is not None else "?s/step"
            info = f"{pct:.0f}% · {rate} · elapsed {fmt_duration(elapsed)} · ETA {fmt_duration(eta)}"
        grid = Table.grid(padding=(0, 2), expand=True)
        grid.add_column(no_wrap=True)
        grid.add_column(ratio=1, min_width=10)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row(
            Text(f"step {done}/{self.total_steps}", style="bold"),
            ProgressBar(total=max(self.total_steps, 1), completed=done),
            Text(info),
        )
        return grid

    def _sparklines(self):
        rows = []
        for name, series in (("reward", self.rewards), ("KL", self.kls)):
            if series:
                finite = [v for v in series if math.isfinite(v)] or [float("nan")]
                span = f"{fmt(series[0])} → {fmt(series[-1])}  (min {fmt(min(finite))}, max {fmt(max(finite))})"
                rows.append((name, series, span))
        # Label, sparkline and span on one line: a wrapped sparkline reads as two.
        room = self.console.width - len("reward") - 2 * 2 - max((len(span) for *_, span in rows), default=0) - 1
        width = max(10, min(self.SPARK_WIDTH, room))
        grid = Table.grid(padding=(0, 2))
        for name, series, span in rows:
            grid.add_row(Text(name, style="bold"), Text(sparkline(series, width), style="cyan"), Text(span, style="dim"))
        return grid


def _best_and_worst(sample: dict):
    """((text, reward) best, (text, reward) worst), or (None, None) without completions."""
    completions, rewards = sample.get("completions") or [], sample.get("rewards") or []
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
    body.add_row("prompt", Text(_clip(sample.get("prompt", ""), 300, 4)))
    if sample.get("answer") is not None:
        body.add_row("answer", Text(_clip(sample["answer"], 100, 1)))
    rewards = sample.get("rewards") or []
    if rewards:
        body.add_row("rewards", Text(" ".join(fmt(r) for r in rewards[:32]) + (" …" if len(rewards) > 32 else "")))
    best, worst = _best_and_worst(sample)
    if best is not None:
        body.add_row(Text(f"best {fmt(best[1])}", style="green"), Text(_clip(best[0], 400, 6)))
        body.add_row(Text(f"worst {fmt(worst[1])}", style="red"), Text(_clip(worst[0], 400, 6)))
    return Panel(body, title=f"sample · step {sample.get('step', '?')}", title_align="left")
