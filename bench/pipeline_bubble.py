"""Pipeline bubble: measured idle fraction vs each schedule's theory, GPipe, 1F1B,
interleaved 1F1B and the zero-bubble schedules (interleaved ZB, ZBV, DualPipeV).

Two ranks (p=2, one thread each), 8 x Linear(1024)+ReLU, global batch 128, SGD; the
multi-stage schedules run 2 stages per rank (looped, or a V for ZBV / DualPipeV); for m in
1,2,4,8,16 micro-batches and every schedule that accepts m (the strategy's own validation
decides), in interleaved rounds:

- step time and throughput relative to the naive layer split (strategy=model_parallel
  mode=layer, which is GPipe with m=1) and to the unsplit model on one rank;
- measured bubble: mean over stages of idle/(busy+idle), busy = time inside the stage's
  forward/backward of a micro-batch (the same figure disttrain logs as pipeline/bubble);
- peak activation memory per stage: the most autograd-saved bytes alive at once (weights
  excluded), counted with saved-tensor hooks: GPipe holds m micro-batches, 1F1B at most p.

Theory: (p-1)/(m+p-1) for GPipe / 1F1B, (p-1)/(v*m+p-1) interleaved; for the zero-bubble
schedules the idle fraction of torch's own action lists with unit-time F, I and W.
Appends one JSON line per (schedule, m) to bench/results/pipeline_bubble.jsonl (medians over
the rounds, run id, commit); ``--summarize last`` prints a run's table as Markdown.

    .venv/bin/python bench/pipeline_bubble.py [--rounds 3] [--steps 8] [--hidden 1024]
    .venv/bin/python bench/pipeline_bubble.py --summarize last
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import uuid
import statistics
import sys
import time
from pathlib import Path

MICRO = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev")
BATCH = 128
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pipeline_bubble.jsonl"


def _stages_per_rank(schedule: str) -> int:
    from disttrain.strategies.pipeline_schedules import SCHEDULES as KNOWN

    return 2 if KNOWN[schedule].multi else 1


def _accepted(schedule: str, m: int, ranks: int) -> bool:
    """Whether the strategy's validation takes this (schedule, m) on ``ranks`` ranks."""
    from disttrain.strategies.pipeline_schedules import SCHEDULES as KNOWN, check_schedule

    if schedule not in KNOWN:
        return False  # not in this torch
    try:
        check_schedule(m, schedule, _stages_per_rank(schedule), ranks, "strategy.")
    except ValueError:
        return False
    return True


class SavedBytes:
    """Bytes of activations saved for backward that are alive right now, and the peak."""

    def __init__(self, params):
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.now = self.peak = 0

    def hooks(self):
        import torch

        meter = self

        class Held:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                meter.now += self.n
                meter.peak = max(meter.peak, meter.now)

            def __del__(self):
                meter.now -= self.n

        def pack(t):
            if t.untyped_storage().data_ptr() in self.skip:
                return t
            return Held(t)

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t if isinstance(h, Held) else h)


def _context(hidden: int):
    import torch
    from omegaconf import OmegaConf

    from disttrain.distributed import env
    from disttrain.parallel.materialize import ModelFactory
    from disttrain.models import build_mlp
    from disttrain.strategies.base import SetupContext

    factory = ModelFactory(build=lambda: build_mlp(in_dim=hidden, hidden=hidden, depth=7, out_dim=hidden),
                           seed=0)  # 8 Linear+ReLU blocks
    cfg = OmegaConf.create({"dist": {"dp": None, "pp": None, "tp": None}, "data": {"batch_size": BATCH}})
    return factory, SetupContext(world=env.detect(), device=torch.device("cpu"), model=factory, cfg=cfg, run_dir=None)


def _pipeline(schedule: str, m: int, steps: int, hidden: int, batch) -> dict:
    import torch

    from disttrain.strategies.pipeline import Pipeline

    from disttrain.engine.step import Engine
    from disttrain.strategies.precision import Precision

    _, ctx = _context(hidden)
    strategy = Pipeline(micro_batches=m, schedule=schedule, stages_per_rank=_stages_per_rank(schedule),
                        balance="params")
    strategy.setup(ctx)
    optimizer = torch.optim.SGD(strategy.model.parameters(), lr=1e-3)
    engine = Engine(strategy, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), Precision(32), None)
    loss_fn = torch.nn.MSELoss()
    engine.train_step([batch], loss_fn)  # warm-up: shape inference, allocator
    meter = SavedBytes(list(strategy.model.parameters()))
    bubbles, start = [], time.perf_counter()
    with meter.hooks():
        for _ in range(steps):
            bubbles.append(engine.train_step([batch], loss_fn).extra["pipeline/bubble"])
    elapsed = (time.perf_counter() - start) / steps
    return {"step_s": elapsed, "bubble": statistics.mean(bubbles), "theory": strategy._theory(),
            "act_mb": meter.peak / 2**20}


def _unsplit(steps: int, hidden: int, batch) -> float:
    """Step time of the whole model on one rank (rank 0; the other waits at a barrier)."""
    import torch

    factory, _ = _context(hidden)
    model = factory.full()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(batch[0]), batch[1]).backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.mean(times)


def worker(rank: int, world: int, port: int, rounds: int, steps: int, hidden: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    torch.set_num_threads(1)
    dist_setup.init(env.detect(), "gloo", 600)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(BATCH, hidden, generator=g), torch.randn(BATCH, hidden, generator=g))
    results: dict = {}
    for _ in range(rounds):
        for m in MICRO:
            for schedule in SCHEDULES:
                if not _accepted(schedule, m, world):
                    continue  # e.g. 1F1B needs at least one micro-batch per stage
                row = _pipeline(schedule, m, steps, hidden, batch)
                results.setdefault((schedule, m), []).append(row)
        dist.barrier()
        if rank == 0:
            results.setdefault("unsplit", []).append(_unsplit(steps, hidden, batch))
        dist.barrier()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist_setup.teardown()


def rows_of(ranks: list[dict]) -> list[dict]:
    """One row per (schedule, m): medians over the rounds, peak activation MB per rank."""
    unsplit = statistics.median(ranks[0]["unsplit"])
    layer = statistics.median(r["step_s"] for r in ranks[0][("gpipe", 1)])
    rows = []
    for m in MICRO:
        for schedule in SCHEDULES:
            if (schedule, m) not in ranks[0]:
                continue
            runs = [r[(schedule, m)] for r in ranks]
            step = statistics.median(x["step_s"] for x in runs[0])
            rows.append({"schedule": schedule, "m": m, "stages_per_rank": _stages_per_rank(schedule),
                         "step_ms": round(step * 1e3, 2), "vs_layer": round(layer / step, 3),
                         "vs_unsplit": round(unsplit / step, 3), "unsplit_ms": round(unsplit * 1e3, 2),
                         "bubble": round(statistics.median(x["bubble"] for x in runs[0]), 4),
                         "theory": round(runs[0][0]["theory"], 4),
                         "act_mb": [round(max(x["act_mb"] for x in r), 2) for r in runs]})
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["schedule", "m", "step ms", "vs layer", "vs unsplit", "bubble", "theory", "gap (pts)",
            "act. MB rank 0 / 1"]
    body = [[r["schedule"], r["m"], f"{r['step_ms']:.0f}", f"{r['vs_layer']:.2f}", f"{r['vs_unsplit']:.2f}",
             f"{r['bubble']:.2f}", f"{r['theory']:.2f}", f"{100 * (r['bubble'] - r['theory']):+.1f}",
             " / ".join(f"{a:.1f}" for a in r["act_mb"])] for r in rows]
    if markdown:
        return "\n".join("| " + " | ".join(str(c) for c in line) + " |"
                         for line in [head, ["---"] * len(head), *body])
    return "\n".join("".join(f"{str(c):>{w}}" for c, w in zip(line, (17, 4, 9, 10, 12, 8, 8, 11, 20)))
                     for line in [head, *body])


def _commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def record(rows: list[dict], args, results: Path) -> str:
    """Append the run's rows (with what is needed to tell runs apart) to ``results``."""
    import torch

    run = {"bench": "pipeline_bubble", "run_id": uuid.uuid4().hex[:12], "commit": _commit(),
           "torch": torch.__version__, "cpus": os.cpu_count(), "ranks": 2, "batch": BATCH, "hidden": args.hidden,
           "rounds": args.rounds, "steps": args.steps, "loadavg_1m": round(os.getloadavg()[0], 2),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(run | row) + "\n")
    return run["run_id"]


def summarize(results: Path, run_id: str) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    run_id = rows[-1]["run_id"] if run_id == "last" else run_id
    mine = [r for r in rows if r["run_id"] == run_id]
    first = mine[0]
    print(f"run {run_id} ({first['date'][:10]}, commit {first['commit'][:12]}, torch {first['torch']}, "
          f"{first['rounds']} rounds x {first['steps']} steps, load {first['loadavg_1m']}); unsplit model on "
          f"1 rank: {first['unsplit_ms']:.0f} ms/step; rows in {results}\n")
    print(table(mine, markdown=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the rows are appended to")
    parser.add_argument("--summarize", metavar="RUN_ID", help="print an earlier run's table ('last': the newest)")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.results, args.summarize)
        return
    import tempfile

    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, str(ROOT))
    from disttrain.distributed.process_group import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(2, free_port(), args.rounds, args.steps, args.hidden, out),
                           nprocs=2, start_method="spawn")
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    rows = rows_of(ranks)
    run_id = record(rows, args, args.results)
    print(table(rows))
    print(f"\nrun {run_id} appended to {args.results}")


if __name__ == "__main__":
    main()
