"""disttrain's DDP against a plain hand-written torch DDP loop and Lightning Fabric's DDP:
same model, data, batch, optimizer, 2 ranks with one thread each (gloo, CPU), runs
interleaved round by round (the order of the variants rotates from round to round, so a
load spike on the shared machine does not always hit the same one).

Every variant is timed the same way: wall clock on rank 0 from the end of the warm-up steps
to the end of the last step, everything the loop does in between included (for disttrain:
logging steps, the stop poll, the observer). Prints, per model size, each variant's median
samples/s and its ratio to the plain loop (goal: disttrain >= 1.0), and with
``--worlds 2 1`` also the 1->2 rank weak-scaling efficiency (throughput(2) / (2 *
throughput(1))). Appends one JSON line per run to bench/results/ddp_overhead.jsonl
(commit, torch version, date, variant, samples/s).

Fabric is measured when ``lightning-fabric`` is installed (``pip install -e .[bench]``),
skipped with a note otherwise.

    .venv/bin/python bench/ddp_overhead.py [--rounds 3] [--steps 200] [--worlds 2]

Diagnostics (the figures behind the README's overhead section): a variant may carry
options after a colon, e.g. ``--variants plain ours "ours:fault.save_on_signal=false"``:

* ``ours:KEY=VALUE,...``: Hydra overrides for disttrain, and ``patch=NAME`` for one of
  ``OURS_PATCHES`` (bench-only monkeypatches that switch off one piece of per-step work);
* ``plain:FLAG,...``: the plain loop with one of ``PLAIN_FLAGS`` added (disttrain's or
  Fabric's settings, one at a time).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ddp_overhead.jsonl"
SIZES = {"mlp-1024": 1024, "mlp-256": 256}
#: the small model's steps are ~6x shorter: it runs 4x --steps, so every timed window lasts seconds.
STEPS_SCALE = {"mlp-1024": 1, "mlp-256": 4}
LOG_EVERY = 50  # disttrain's logging interval (a logging step all-reduces and gathers figures)
BATCH = 64
IN_DIM, DEPTH, CLASSES, DATASET = 512, 3, 10, 8192
LR, MOMENTUM = 0.05, 0.9

#: options of the plain loop, for finding out what makes a variant faster or slower.
PLAIN_FLAGS = {
    "bucket_view": "DDP(gradient_as_bucket_view=True) (disttrain's default)",
    "static_graph": "DDP(static_graph=True)",
    "keep_grads": "optimizer.zero_grad(set_to_none=False)",
    "py_hook": "a Python all-reduce comm hook that times buckets (as disttrain's observer does)",
    "stop_poll": "one extra 1-element all-reduce per step (as disttrain's stop-signal poll does)",
}


def _mlp(hidden: int):
    from disttrain.models import build_mlp

    return build_mlp(IN_DIM, hidden, DEPTH, CLASSES)


def _dataset():
    from disttrain.data import synthetic_classification

    return synthetic_classification(DATASET, IN_DIM, CLASSES)


def _marked(step: int, warmup: int) -> bool:
    """Steps after which a variant takes a timestamp: the end of the warm-up, then every
    LOG_EVERY steps (each window holds exactly one of disttrain's logging steps)."""
    return step >= warmup and step % LOG_EVERY == 0


def _mark() -> tuple[float, float]:
    """(wall clock, CPU seconds of this process, all its threads: gloo's included)."""
    return time.perf_counter(), time.process_time()


def rates(world_size: int, marks: list[tuple[float, float]]) -> tuple[float, float]:
    """(samples/s over the whole timed interval, median samples/s of its LOG_EVERY-step
    windows). The median resists another job's burst on a shared machine."""
    per_window = world_size * BATCH * LOG_EVERY
    walls = [wall for wall, _ in marks]
    windows = [per_window / (b - a) for a, b in zip(walls, walls[1:])]
    return per_window * len(windows) / (walls[-1] - walls[0]), statistics.median(windows)


def cpu_per_step_ms(per_rank_marks: list[list[tuple[float, float]]]) -> float:
    """CPU milliseconds per step, mean over ranks: the work a rank does, waiting excluded,
    so it moves little with the machine's load (unlike samples/s)."""
    steps = LOG_EVERY * (len(per_rank_marks[0]) - 1)
    return statistics.mean(1e3 * (m[-1][1] - m[0][1]) / steps for m in per_rank_marks)


def _teardown() -> None:
    """Barrier, then destroy the group the way disttrain does (disttrain.dist.teardown: a bare
    destroy right after the last backward can deadlock gloo's worker threads)."""
    from disttrain.dist import teardown

    teardown()


def _split(spec: str) -> list[str]:
    return [item for item in spec.split(",") if item]


# ---------------------------------------------------------------------------- plain torch


def plain(rank: int, world_size: int, hidden: int, steps: int, warmup: int, spec: str = "") -> float:
    """The loop people write by hand: DistributedSampler + DataLoader + DDP + SGD."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    flags = set(_split(spec))
    unknown = flags - set(PLAIN_FLAGS)
    if unknown:
        raise ValueError(f"plain: unknown flag(s) {sorted(unknown)}; known: {sorted(PLAIN_FLAGS)}")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(_mlp(hidden), gradient_as_bucket_view="bucket_view" in flags,
                                    static_graph="static_graph" in flags)
    if "py_hook" in flags:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        spans: list[tuple[float, float]] = []

        def hook(state, bucket):
            launched = time.perf_counter()
            return default_hooks.allreduce_hook(None, bucket).then(
                lambda fut: (spans.append((launched, time.perf_counter())), fut.value()[0])[1])

        model.register_comm_hook(None, hook)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    dataset = _dataset()
    loader = DataLoader(dataset, batch_size=BATCH, sampler=DistributedSampler(dataset), drop_last=True)
    batches, marks = iter(loader), []
    for step in range(1, steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad(set_to_none="keep_grads" not in flags)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if "stop_poll" in flags:
            flag = torch.zeros(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            flag.item()
        if _marked(step, warmup):
            marks.append(_mark())
    _teardown()
    return marks


# ---------------------------------------------------------------------------- Lightning Fabric


def fabric_version() -> str | None:
    try:
        import lightning_fabric
    except ImportError:
        return None
    return lightning_fabric.__version__


def fabric(rank: int, world_size: int, hidden: int, steps: int, warmup: int, spec: str = "") -> float:
    """The same loop written for Lightning Fabric (strategy=ddp, gloo, CPU), its defaults."""
    import torch
    from lightning_fabric import Fabric
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    # The ranks are started by disttrain.testing.spawn with torchrun-style variables
    # (LOCAL_RANK, WORLD_SIZE, MASTER_*): Fabric sees processes created externally.
    runner = Fabric(accelerator="cpu", strategy="ddp", devices=world_size, num_nodes=1, precision="32-true")
    runner.launch()
    torch.manual_seed(0)
    model = _mlp(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model, optimizer = runner.setup(model, optimizer)
    # setup_dataloaders swaps in a DistributedSampler (shuffle=True), like the plain loop's.
    loader = runner.setup_dataloaders(DataLoader(_dataset(), batch_size=BATCH, shuffle=True, drop_last=True))
    batches, marks = iter(loader), []
    for step in range(1, steps + 1):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad()
        runner.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        if _marked(step, warmup):
            marks.append(_mark())
    _teardown()
    return marks


# ---------------------------------------------------------------------------- disttrain


def _overrides(hidden: int, steps: int) -> list[str]:
    return ["strategy=ddp", "data=synthetic_classification", "loss=cross_entropy", f"model.in_dim={IN_DIM}",
            f"model.hidden={hidden}", f"model.depth={DEPTH}", f"model.out_dim={CLASSES}", f"data.size={DATASET}",
            f"data.batch_size={BATCH}", f"trainer.max_steps={steps}", f"trainer.log_every={LOG_EVERY}",
            "checkpoint.every_steps=0", "trainer.progress=log", f"optim.lr={LR}", f"optim.momentum={MOMENTUM}",
            "metrics.peak_flops=1e11"]  # skips the start-up matmul probe (MFU's denominator only)


def _patch_null_observer() -> None:
    """No observer: no step timing, comm hook, FLOP count, straggler check, per-rank gather."""
    import disttrain.run
    from disttrain.observe.base import NullObserver

    disttrain.run.build_observer = lambda *args, **kwargs: NullObserver()


def _patch_no_comm_hook() -> None:
    """The observer without its DDP communication-timing hook (DDP's C++ all-reduce)."""
    from disttrain.observe import comm

    comm.attach = lambda model: None


def _patch_no_heartbeat() -> None:
    """The Guard's per-step heartbeat writes (and its batch generator) removed."""
    import disttrain.faults

    disttrain.faults.Guard._batches = lambda self, batches: batches
    disttrain.faults.Heartbeat.enter = lambda self, phase, step=None: None


#: bench-only monkeypatches, each switching off one piece of disttrain's per-step work.
OURS_PATCHES = {"null_observer": _patch_null_observer, "no_comm_hook": _patch_no_comm_hook,
                "no_heartbeat": _patch_no_heartbeat}


def ours(rank: int, world_size: int, hidden: int, steps: int, warmup: int, spec: str = "") -> float:
    """disttrain ``strategy=ddp`` through its real entry point (run_rank: the loop, the
    engine, the observer, the Guard), timed from the end of step ``warmup`` to the end of
    the last step (the final checkpoint after the loop is not counted)."""
    import torch
    from hydra import compose, initialize_config_dir

    import disttrain.run
    from disttrain.config import config_dir

    extra, patches = [], []
    for item in _split(spec):
        (patches if item.startswith("patch=") else extra).append(item)
    for item in patches:
        OURS_PATCHES[item.removeprefix("patch=")]()
    torch.set_num_threads(1)
    marks: list[tuple[float, float]] = []
    real_train = disttrain.run.train

    def timed_train(settings, parts, start):
        inner = parts.after_step  # called on every rank once per step, after the step's logging

        def after_step(step, fields):
            stop = inner(step, fields)
            if _marked(step, warmup):
                marks.append(_mark())
            return stop

        parts.after_step = after_step
        return real_train(settings, parts, start)

    disttrain.run.train = timed_train
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=_overrides(hidden, steps) + extra)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        disttrain.run.run_rank(cfg, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return marks


VARIANTS = {"plain": plain, "ours": ours, "fabric": fabric}


# ---------------------------------------------------------------------------- driver


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _variants(names: list[str]) -> list[str]:
    chosen = []
    for name in names:
        base = name.split(":", 1)[0]
        if base not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {sorted(VARIANTS)} (with :options)")
        if base == "fabric" and fabric_version() is None:
            print(f"skipping {name}: lightning-fabric is not installed (pip install -e .[bench])", flush=True)
            continue
        chosen.append(name)
    return chosen


def main() -> None:
    from disttrain.testing import spawn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200,
                        help=f"steps per run of mlp-1024 (mlp-256: 4x); the first {LOG_EVERY} are warm-up")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--worlds", nargs="+", type=int, default=[2], help="rank counts (2 1: weak scaling too)")
    parser.add_argument("--variants", nargs="+", default=["plain", "ours", "fabric"])
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the raw rows are appended to")
    args = parser.parse_args()
    variants = _variants(args.variants)
    import torch

    base_row = {"bench": "ddp_overhead", "run_id": uuid.uuid4().hex[:12], "commit": _git("rev-parse", "HEAD"),
                "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")), "torch": torch.__version__,
                "lightning_fabric": fabric_version(), "python": platform.python_version(),
                "cpus": os.cpu_count(), "batch_per_rank": BATCH, "log_every": LOG_EVERY,
                "threads_per_rank": 1, "backend": "gloo"}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    #: (model, variant, world) -> per round (samples/s over the interval, median of its windows,
    #: CPU ms per step and rank)
    results: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        order = variants[shift:] + variants[:shift]  # rotate: no variant always runs first
        for name in args.sizes:
            steps = args.steps * STEPS_SCALE[name]
            warmup = LOG_EVERY
            for world in args.worlds:
                for label in order:
                    base, _, spec = label.partition(":")
                    load = os.getloadavg()[0]
                    per_rank = spawn(VARIANTS[base], world, SIZES[name], steps, warmup, spec, timeout=900)
                    mean, window = rates(world, per_rank[0])
                    cpu_ms = cpu_per_step_ms(per_rank)
                    results.setdefault((name, label, world), []).append((mean, window, cpu_ms))
                    row = {**base_row, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "round": round_index, "model": name, "hidden": SIZES[name], "world": world,
                           "steps": steps, "warmup": warmup, "variant": label, "samples_per_s": round(mean, 1),
                           "samples_per_s_window_median": round(window, 1), "windows": len(per_rank[0]) - 1,
                           "cpu_ms_per_step": round(cpu_ms, 3),
                           "loadavg_1m": round(load, 2)}
                    with args.results.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"round {round_index} {name} world={world} {label}: {mean:,.0f} samples/s "
                          f"(window median {window:,.0f}; CPU {cpu_ms:.3f} ms/step/rank; load {load:.1f})", flush=True)
    _summary(args, variants, results)


def _summary(args, variants: list[str], results) -> None:
    world = max(args.worlds)
    print(f"\n{args.rounds} round(s), {world} ranks; rows appended to {args.results}")
    print("samples/s: median over rounds of each run's whole timed interval | of each run's window median;")
    print("x plain: median over rounds of the ratio to the plain run of the same round (whole interval | window median)")
    print("CPU: median over rounds of CPU ms per step and rank (every thread of the rank's process)")
    for name in args.sizes:
        print(f"{name}:")
        plain_runs = results.get((name, "plain", world))
        for label in variants:
            runs = results[(name, label, world)]
            mean = statistics.median(r[0] for r in runs)
            window = statistics.median(r[1] for r in runs)
            cpu = statistics.median(r[2] for r in runs)
            line = f"  {label:40s} {mean:9,.0f} | {window:9,.0f}   CPU {cpu:7.3f} ms"
            if plain_runs:
                ratio_mean = statistics.median(r[0] / p[0] for r, p in zip(runs, plain_runs))
                ratio_window = statistics.median(r[1] / p[1] for r, p in zip(runs, plain_runs))
                line += f"   x plain {ratio_mean:.3f} | {ratio_window:.3f}"
            if 1 in args.worlds and world > 1:
                one = statistics.median(r[0] for r in results[(name, label, 1)])
                line += f"   weak scaling 1->{world} {mean / (world * one):.3f}"
            print(line)

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
