"""What `grpo-mlx eval` shows: a progress bar over the prompts decoded (stderr) and the summary table (stdout)."""

from __future__ import annotations

import math
import time

from ..ui.display import wants_plain_lines

class EvalProgress:
    """A rich progress bar over prompts decoded on a terminal; plain lines on stderr otherwise."""

    PLAIN_EVERY = 2.0  # seconds between plain lines

    def __init__(self, console=None, plain: bool | None = None):
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.plain = wants_plain_lines(self.console) if plain is None else plain
        self.total = self.done = 0
        self._bar = self._task = None
        self._last_line = -math.inf

    def start(self, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.total = total
        if not self.plain:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self._task = self._bar.add_task("greedy", total=total)
            self._bar.start()

    def advance(self, phase: str, prompts: int) -> None:
        self.done += prompts
        if self._bar is not None:
            self._bar.update(self._task, advance=prompts, description=phase)
        elif time.monotonic() - self._last_line >= self.PLAIN_EVERY or self.done >= self.total:
            self._last_line = time.monotonic()
            self.console.print(f"eval {phase} {self.done}/{self.total} prompts", highlight=False)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def summary_table(result: dict):
    """A rich table of the headline numbers: accuracy, pass@k, maj@K."""
    from rich.table import Table

    settings = result["settings"]
    table = Table(title=f"{settings['dataset']} ({settings['split']}), {result['num_examples']} problems")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy (greedy)", f"{result['accuracy']:.2%} ({result['correct']}/{result['num_examples']})")
    for key, value in result.items():
        if key.startswith(("pass@", "maj@")):
            table.add_row(f"{key} (T={settings['temperature']:g})", f"{value:.2%}")
    table.add_row("greedy cut at max tokens", str(result["greedy_truncated"]))
    for key, label in (("turns/mean", "turns per problem (greedy)"), ("tools/calls_per_trajectory", "tool calls per problem (greedy)")):
        if key in result:
            table.add_row(label, f"{result[key]:.2f}")
    if result.get("skipped_long_prompts"):
        table.add_row(f"skipped: prompt over {settings['max_prompt_length']} tokens", str(result["skipped_long_prompts"]))
    return table
