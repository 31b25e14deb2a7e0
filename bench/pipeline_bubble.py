"""Pipeline bubble: measured idle fraction vs theory (p-1)/(m+p-1), GPipe vs 1F1B.

Two ranks (p=2 stages, one thread each), 8 x Linear(1024)+ReLU, global batch 128,
SGD; for m in 1,2,4,8,16 micro-batches and both schedules, in interleaved rounds:

- step time and throughput relative to the naive layer split (strategy=model_parallel
  mode=layer, which is GPipe with m=1) and to the unsplit model on one rank;
- measured bubble: mean over stages of idle/(busy+idle), busy = time inside the stage's
  forward/backward of a micro-batch (the same figure disttrain logs as pipeline/bubble);
- peak activation memory per stage: the most autograd-saved bytes alive at once (weights
  excluded), counted with saved-tensor hooks: GPipe holds m micro-batches, 1F1B at most p.

    .venv/bin/python bench/pipeline_bubble.py [--rounds 3] [--steps 8] [--hidden 1024]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

MICRO = (1, 2, 4, 8, 16)
SCHEDULES = ("gpipe", "1f1b")
BATCH = 128


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
    strategy = Pipeline(micro_batches=m, schedule=schedule, balance="params")
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
                if schedule == "1f1b" and m < world:
                    continue  # 1F1B needs at least one micro-batch per stage
                row = _pipeline(schedule, m, steps, hidden, batch)
                results.setdefault((schedule, m), []).append(row)
        dist.barrier()
        if rank == 0:
            results.setdefault("unsplit", []).append(_unsplit(steps, hidden, batch))
        dist.barrier()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist_setup.teardown()


def table(ranks: list[dict]) -> str:
    unsplit = statistics.median(ranks[0]["unsplit"])
    layer = statistics.median(r["step_s"] for r in ranks[0][("gpipe", 1)])
    lines = [f"p=2 stages, global batch {BATCH}; medians over rounds. unsplit model on 1 rank: {unsplit*1e3:.1f} ms/step",
             f"{'schedule':9} {'m':>3} {'step ms':>8} {'vs layer':>9} {'vs unsplit':>11} {'bubble':>7} "
             f"{'theory':>7} {'gap pts':>8} {'act MB s0':>10} {'act MB s1':>10}"]
    for m in MICRO:
        for schedule in SCHEDULES:
            if (schedule, m) not in ranks[0]:
                continue
            rows = [r[(schedule, m)] for r in ranks]
            step = statistics.median(x["step_s"] for x in rows[0])
            bubble = statistics.median(x["bubble"] for x in rows[0])
            theory = rows[0][0]["theory"]
            acts = [max(x["act_mb"] for x in r) for r in rows]
            lines.append(f"{schedule:9} {m:>3} {step*1e3:>8.1f} {layer/step:>9.2f} {unsplit/step:>11.2f} "
                         f"{bubble:>7.2f} {theory:>7.2f} {100*(bubble-theory):>8.1f} {acts[0]:>10.1f} {acts[1]:>10.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    args = parser.parse_args()
    import tempfile

    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from disttrain.distributed.process_group import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(worker, args=(2, free_port(), args.rounds, args.steps, args.hidden, out),
                           nprocs=2, start_method="spawn")
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    print(table(ranks))


if __name__ == "__main__":
    main()
