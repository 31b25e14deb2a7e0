"""One raw result row per benchmark run, appended to bench/results/<bench>.jsonl with what
makes it reproducible (commit, dirty tree, torch version, UTC date): README tables quote
these files, never numbers typed by hand."""
from __future__ import annotations

import datetime
import json
import uuid
from pathlib import Path

import torch

from ddp_overhead import _dirty, _git

RESULTS = Path(__file__).resolve().parent / "results"


def append(bench: str, **fields) -> dict:
    row = {"bench": bench, "run_id": uuid.uuid4().hex[:12], "commit": _git("rev-parse", "HEAD"),
           "dirty": _dirty(), "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / f"{bench}.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    return row
