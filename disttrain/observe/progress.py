"""Progress display on rank 0: on a terminal a one-line rich bar (step/total, ETA, loss,
throughput) with the log lines printed above it; everywhere the compact step line in the
log (``disttrain.observe.logs.step_line``)."""
from __future__ import annotations

import logging
import sys

from disttrain.observe.logs import si, step_line

log = logging.getLogger("disttrain")


def _bar(total: int, start: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    def text(template: str, **style) -> TextColumn:  # never wrapped onto a second line
        return TextColumn(template, table_column=Column(no_wrap=True, overflow="ellipsis", **style))

    # The console is made on the real stdout before rich swaps it for its proxy (log lines
    # written to the proxy print above the bar); the bar shrinks before any text wraps.
    bar = RichProgress(text("[bold]train"), BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=8)),
                       MofNCompleteColumn(table_column=Column(no_wrap=True)),
                       TimeRemainingColumn(table_column=Column(no_wrap=True)), text("{task.fields[info]}"),
                       console=Console(file=sys.stdout), expand=True)
    task = bar.add_task("train", total=total, completed=start, info="")
    bar.start()
    return bar, task


def bar_info(fields: dict[str, float]) -> str:
    """The bar's own figures: loss and throughput (the rest is in the log line above it)."""
    parts = []
    if "loss" in fields:
        parts.append(f"loss {fields['loss']:.4g}")
    if fields.get("samples_per_s"):
        parts.append(f"{si(fields['samples_per_s'])} samples/s")
    return "  ".join(parts)


class Progress:
    """``update(step, fields, logged)`` after each step; ``close()`` at the end."""

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        self.enabled, self.total = enabled, total
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.bar = self.task = None
        if enabled and use_bar:
            self.bar, self.task = _bar(total, start)

    def update(self, step: int, fields: dict[str, float], logged: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": bar_info(fields)} if logged else {}))
        if logged:
            log.info("%s", step_line(step, self.total, fields))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
