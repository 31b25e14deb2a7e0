"""Progress display on rank 0: a rich progress bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("disttrain")


class Progress:
    """``update(step, fields)`` after each logged step; ``close()`` at the end."""

    def __init__(self, total: int, start: int, mode: str = "auto", enabled: bool = True):
        self.enabled = enabled
        use_bar = mode == "bar" or (mode == "auto" and sys.stdout.isatty())
        self.bar = None
        if enabled and use_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, fields: dict[str, float], logged: bool) -> None:
        if not self.enabled:
            return
        info = "  ".join(f"{k} {v:.4g}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.update(self.task, completed=step, **({"info": info} if logged else {}))
        if logged:
            # Always into train.log; on a terminal the bar already shows it on screen.
            log.info("step %d  %s", step, info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
