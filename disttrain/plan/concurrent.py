"""Host figures measured the way the planned run will execute: ``nproc`` processes at once,
each with the threads a rank gets (``cpu_count // nproc`` on a CPU host), so a rank's
compute is timed while its peers compete for the same cores; then, from the same
processes, the latency and bandwidth of gloo all-reduce, all-gather and point-to-point
sends, fitted over several message sizes (t = hops·α + volume / B), not one number.
"""
from __future__ import annotations

import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from disttrain.distributed import forkserver

SIZES = (1 << 10, 1 << 16, 1 << 20, 1 << 22)  # floats: 4 KB .. 16 MB
WARMUP_ROUNDS, ROUNDS = 4, 8  # per batch size: discarded, then timed
MAX_PROCS = 8  # a plan for more ranks probes 8 at once (said in the plan's notes)


def _timed(fn, reps: int = 5) -> float:
    fn()  # warm-up: connections, buffers
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fit(points: list[tuple[float, float]], hops: int) -> tuple[float, float]:
    """(latency per hop, bandwidth) from least squares of t = c + x / B over (x, t)."""
    n = len(points)
    mx, mt = sum(x for x, _ in points) / n, sum(t for _, t in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (t - mt) for x, t in points) / sxx if sxx else 0.0
    slope = max(slope, 1e-13)
    intercept = max(mt - slope * mx, 0.0)
    return intercept / max(hops, 1), 1.0 / slope


def collective_curves(rank: int, world: int) -> dict[str, tuple[float, float]]:
    """{op: (latency s per hop, bandwidth B/s)}; volumes follow the ring formulas the model uses."""
    curves: dict[str, list[tuple[float, float]]] = {"allreduce": [], "allgather": [], "p2p": []}
    peer = rank ^ 1 if (rank ^ 1) < world else None
    for numel in SIZES:
        size = numel * 4
        buf = torch.ones(numel)
        curves["allreduce"].append((2 * (world - 1) / world * size, _timed(lambda: dist.all_reduce(buf))))
        shard = torch.ones(numel // world)
        out = torch.empty(shard.numel() * world)
        curves["allgather"].append(((world - 1) / world * size,
                                    _timed(lambda: dist.all_gather_into_tensor(out, shard))))

        def ping_pong():
            if peer is None:
                return
            if rank % 2 == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)

        curves["p2p"].append((size, _timed(ping_pong) / 2))
    hops = {"allreduce": 2 * (world - 1), "allgather": world - 1, "p2p": 1}
    return {op: _fit(points, hops[op]) for op, points in curves.items()}


def alternated(step, batches: tuple[int, ...], sync) -> list[tuple[float, float]]:
    """Per batch size (0: none, timed as zeros), the median (forward+backward s, update s) of
    ``ROUNDS`` calls of ``step(batch)``, the batches in turn within each round so that every
    figure comes from the same seconds (``plan.probe.StepTimer``); ``sync()`` before each timed
    call keeps the ranks stepping at once, the contention the run will see."""
    wanted = list(dict.fromkeys(b for b in batches if b))
    # discarded rounds: a fresh process times its first steps up to 1.8x slow (gpt_tiny,
    # 4 samples, 2 threads: 7.2, 4.6, 3.9 ms), and the run it predicts is measured warm
    for _ in range(WARMUP_ROUNDS):
        for batch in wanted:
            step(batch)
    samples: dict[int, list] = {batch: [] for batch in wanted}
    for _ in range(ROUNDS):
        for batch in wanted:
            sync()
            samples[batch].append(step(batch))
    return [(statistics.median(t[0] for t in samples[b]), statistics.median(t[1] for t in samples[b]))
            if b else (0.0, 0.0) for b in batches]


def _worker(rank: int, world: int, port: int, cfg: DictConfig, batches: tuple[int, ...], threads: int,
            queue) -> None:
    from disttrain.plan.probe import StepTimer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", r".*all_gather_into_tensor", FutureWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        times = alternated(StepTimer(cfg, threads, batches).step if any(batches) else None, batches, dist.barrier)
        dist.barrier()
        links = collective_curves(rank, world) if world > 1 else {}
        queue.put((rank, times, links))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _collect(queue, procs: list, timeout: float) -> list:
    """Every rank's result; a rank that died first fails the probe at once, not at the timeout."""
    import queue as queues

    results, deadline = [], time.monotonic() + timeout
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=1.0))
        except queues.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"plan probe: a rank exited with {dead}" if dead else
                                   f"plan probe: no result within {timeout:.0f} s") from None
    return results


def probe(cfg: DictConfig, nproc: int, batches: tuple[int, ...], threads: int,
          timeout: float = 300) -> tuple[list[tuple[float, float]], dict, int]:
    """Per batch size in ``batches``: the ranks' median (forward+backward s, update s) timed
    by min(nproc, MAX_PROCS) processes at once; the collective curves among them; and how
    many processes ran."""
    from disttrain.distributed.process_group import free_port

    world = max(1, min(nproc, MAX_PROCS))
    ctx = forkserver.context("disttrain.engine.builders")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cfg, batches, threads, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    try:
        results = sorted(_collect(queue, procs, timeout))
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    per_batch = [(statistics.median(r[1][i][0] for r in results), statistics.median(r[1][i][1] for r in results))
                 for i in range(len(batches))]
    return per_batch, results[0][2], world
