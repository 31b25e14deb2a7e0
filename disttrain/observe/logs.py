"""Logging set-up: rank 0 to the console and ``train.log``; other ranks to their own file
(``train.rank<r>.log``) so ranks never interleave in one file. Also the one line per logging
step a person reads (``step_line``); the full figures go to TensorBoard and metrics.jsonl."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(asctime)s %(message)s"  # rank 0's screen: the level only when it matters


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            head, _, tail = text.partition(" ")
            return f"{head} {record.levelname}: {tail}"
        return text


class _CurrentStdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted: while rich's progress bar
    is live that is rich's proxy, which prints the line above the bar instead of through it."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(run_dir: Path, rank: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "train.log" if rank == 0 else f"train.rank{rank}.log"
    formatter = logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's console handler too: one format, no duplicates
        root.removeHandler(handler)
        if getattr(handler, "_disttrain", False):
            handler.close()
    file_handler = logging.FileHandler(run_dir / name)
    file_handler.setFormatter(formatter)
    handlers: list[logging.Handler] = [file_handler]
    if rank == 0:
        console: logging.Handler = _CurrentStdout()
        console.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT, datefmt="%H:%M:%S"))
    else:  # other ranks: only warnings and errors on screen
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(formatter)
    handlers.append(console)
    for handler in handlers:
        handler._disttrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def si(value: float) -> str:
    """3 significant digits with a k/M/G suffix: 12913 -> '12.9k'."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    """'2.4 ms', '310 us', '1.52 s'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} us"


def _share(part: float | None, whole: float) -> str | None:
    return f"{100 * part / whole:.0f}%" if part is not None and whole > 0 else None


def step_line(step: int, total: int, fields: dict[str, float]) -> str:
    """``step 120/200  loss 0.0296  12.9k samples/s  2.4 ms/step (comm 56%, data 4%)  mfu 3.1%
    mem 0.42 GiB``: the figures present in ``fields`` (the loop's flushed interval), each once."""
    parts = [f"step {step}/{total}"]
    if "loss" in fields:
        loss = fields["loss"]
        parts.append(f"loss {loss:.4g}" if math.isfinite(loss) else f"loss {loss}")
    if fields.get("samples_per_s"):
        parts.append(f"{si(fields['samples_per_s'])} samples/s")
    if fields.get("tokens_per_s"):
        parts.append(f"{si(fields['tokens_per_s'])} tokens/s")
    step_s = fields.get("time_step_s")
    if step_s:
        split = [f"{name} {share}" for name, key in (("comm", "time_comm_s"), ("data", "data_wait_s"))
                 if (share := _share(fields.get(key), step_s)) is not None]
        parts.append(f"{duration(step_s)}/step" + (f" ({', '.join(split)})" if split else ""))
    if fields.get("mfu"):
        parts.append(f"mfu {100 * fields['mfu']:.3g}%")
    if fields.get("peak_mem_gb"):
        parts.append(f"mem {fields['peak_mem_gb'] * 1e9 / 2**30:.3g} GiB")
    return "  ".join(parts)
