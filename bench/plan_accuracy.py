"""How close `disttrain plan` comes to what the run measures here: `plan.validate` over every
strategy that runs on this host (single at 1 rank; ddp, fsdp, DeepSpeed ZeRO 1-3, pipeline
(GPipe), tensor parallel, param_server at 2 and 4 ranks) for the reference MLP and GPT.
Each prediction is made at the planned rank count by that many probe processes stepping at
once (the contention of the run), then each strategy trains for real through the CLI.

    .venv/bin/python bench/plan_accuracy.py [--ranks 1,2,4] [--only mlp|gpt] [--steps 40] [--repeats 3] [--keep-cache]
    .venv/bin/python bench/plan_accuracy.py --readme RUN_ID   # the README's table from the results file

Every host term (loop and framework, kernel code, each strategy's overhead run) is measured
afresh in this run, in a cache of its own, unless --keep-cache reuses the user's plan_host.json:
a term measured hours earlier under another load would otherwise stay in every later run.

Prints one predicted-vs-measured table (step time and peak memory per rank; error =
(predicted - measured) / measured) and ends with
``plan_accuracy: worst step-time error N%, worst memory error M% over K runs``;
appends one JSON row per run to bench/results/plan_accuracy.jsonl (commit, torch, date, load).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_overhead import _dirty, _git  # noqa: E402  (the benchmarks' helper: the commit for the rows)

from disttrain.plan.core import check, compose  # noqa: E402
from disttrain.plan.measure import validate_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "plan_accuracy.jsonl"
CONFIGS = {
    # model states dominate memory here (3.2 M params x 16 B), so the memory model is tested
    "mlp": ["model.hidden=1024", "model.depth=4", "optim=adamw", "data.batch_size=64", "plan.micro_batches=4"],
    # attention, embeddings, cross-entropy; activations matter
    "gpt": ["experiment=gpt_text", "plan.micro_batches=4"],
}

#: short names for --strategies (the rows' own names have a space)
ALIASES = {"tensor": "tensor parallel", "tp": "tensor parallel", "ps": "param_server"}


def table(rows: list[dict]) -> str:
    head = ("model", "strategy", "ranks", "pred step ms", "meas step ms", "error", "pred mem MB",
            "meas mem MB", "error")
    lines = [head] + [(r["model"], r["strategy"], str(r["ranks"]), f"{r['pred_step_s'] * 1e3:.1f}",
                       f"{r['meas_step_s'] * 1e3:.1f}", f"{r['step_error'] * 100:+.0f}%", f"{r['pred_mem_b'] / 1e6:.1f}",
                       f"{r['meas_mem_b'] / 1e6:.1f}", f"{r['mem_error'] * 100:+.0f}%") for r in rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def record(rows: list[dict], args) -> None:
    import torch

    base = {"bench": "plan_accuracy", "run_id": uuid.uuid4().hex[:12], "commit": _git("rev-parse", "HEAD"),
            "dirty": _dirty(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "steps": args.steps, "repeats": args.repeats, "fresh_host_terms": not args.keep_cache}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({**base, **{k: round(v, 6) if isinstance(v, float) else v
                                               for k, v in row.items()}}) + "\n")


ORDER = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3", "pipeline", "tensor parallel", "param_server")
LABELS = {"mlp": "MLP 4×1024, batch 64", "gpt": "gpt_tiny, batch 16×64"}


def readme_table(run_id: str) -> str:
    """One run's rows as the README prints them: per model and strategy, "2 · 4" ranks."""
    rows = [r for r in map(json.loads, RESULTS.read_text().splitlines()) if r["run_id"] == run_id]
    if not rows:
        raise SystemExit(f"no rows of run {run_id} in {RESULTS}")

    def pct(x: float) -> str:
        return f"{x * 100:+.0f}%".replace("-", "−")

    out = ["| model | strategy | ranks | step ms | error | memory MB | error |", "|---|---|---|---|---|---|---|"]
    for model in LABELS:
        label = LABELS[model]
        for strategy in ORDER:
            sel = sorted((r for r in rows if r["model"] == model and r["strategy"] == strategy), key=lambda r: r["ranks"])
            if not sel:
                continue
            cells = [" · ".join(str(r["ranks"]) for r in sel),
                     " · ".join(f"{r['pred_step_s'] * 1e3:.1f} / {r['meas_step_s'] * 1e3:.1f}" for r in sel),
                     " · ".join(pct(r["step_error"]) for r in sel),
                     " · ".join(f"{r['pred_mem_b'] / 1e6:.1f} / {r['meas_mem_b'] / 1e6:.1f}" for r in sel),
                     " · ".join(pct(r["mem_error"]) for r in sel)]
            out.append(f"| {label} | {strategy} | " + " | ".join(cells) + " |")
            label = ""
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3,
                        help="launches of each timed run, each with its own probes and overhead run (fastest of each)")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--only", choices=sorted(CONFIGS))
    parser.add_argument("--strategies", default="",
                        help="comma list of rows (default: all that run here); tensor = tensor parallel")
    parser.add_argument("--keep-cache", action="store_true", help="reuse the host terms in plan_host.json")
    parser.add_argument("--readme", metavar="RUN_ID", help="print that run's README table and exit")
    args = parser.parse_args()
    if args.readme:
        print(readme_table(args.readme))
        return
    if not args.keep_cache:
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="plan-accuracy-cache-")
    only = [ALIASES.get(s, s) for s in args.strategies.split(",") if s] or None
    rows, start = [], time.perf_counter()
    for name, overrides in CONFIGS.items():
        if args.only and name != args.only:
            continue
        for nproc in (int(n) for n in args.ranks.split(",")):
            argv = overrides + [f"plan.validate_steps={args.steps}", f"plan.validate_nproc={nproc}",
                                f"plan.validate_repeats={args.repeats}"]
            cfg = compose(argv)
            check(cfg)
            load = os.getloadavg()[0]
            for row in validate_rows(cfg, argv, only):
                rows.append({"model": name, **row, "loadavg_1m": load, "loadavg_after": os.getloadavg()[0]})
                print(f"{name} {row['strategy']} x{nproc}: step {row['step_error'] * 100:+.0f}%, "
                      f"memory {row['mem_error'] * 100:+.0f}%", flush=True)
    record(rows, args)
    print(table(rows))
    loads = [r["loadavg_1m"] for r in rows]
    print(f"({time.perf_counter() - start:.0f} s; load average {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores)")
    worst_step = max(abs(r["step_error"]) for r in rows) * 100
    worst_mem = max(abs(r["mem_error"]) for r in rows) * 100
    print(f"plan_accuracy: worst step-time error {worst_step:.0f}%, worst memory error {worst_mem:.0f}% "
          f"over {len(rows)} runs")


if __name__ == "__main__":
    main()
