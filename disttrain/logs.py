"""Logging set-up: rank 0 to the console and ``train.log``; other ranks to their own file
(``train.rank<r>.log``) so ranks never interleave in one file."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"


def setup_logging(run_dir: Path, rank: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "train.log" if rank == 0 else f"train.rank{rank}.log"
    formatter = logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's console handler too: one format, no duplicates
        root.removeHandler(handler)
        if getattr(handler, "_disttrain", False):
            handler.close()
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / name)]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    else:  # other ranks: only warnings and errors on screen
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        handlers.append(console)
    for handler in handlers:
        handler._disttrain = True  # type: ignore[attr-defined]
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
