"""disttrain's DDP against a plain hand-written torch DDP loop and Lightning Fabric's DDP:
same model, data, batch, optimizer, 2 ranks with one thread each (gloo, CPU).

Interleaved in one job (the default): each round is one 2-rank job whose ranks run every
variant in turn, ``--reps`` times, in an order that rotates from block to block, on one
process group; each block builds its variant afresh (disttrain through its real entry point
``run_rank``, only the process-group set-up shared). Blocks of the variants follow each other
within seconds, so the load of a shared machine hits them alike, and every ratio is taken
between blocks of the same round and repetition. ``--isolated`` runs every variant in its
own 2-rank job instead (the slower, noisier cross-check).

Every variant is timed the same way: wall clock on rank 0 from the end of the warm-up
(``LOG_EVERY`` steps) to the end of the last step, timestamped every ``LOG_EVERY`` steps
(each window holds exactly one of disttrain's logging steps); everything a loop does in
between counts (for disttrain: logging, the stop poll, the observer, the Guard). Printed
per model size, medians over blocks: samples/s over the timed interval and the median of
its windows, both also as ratios to the plain block of the same round and repetition (goal:
disttrain >= 1.0), and CPU ms per step and rank (all threads of the rank's process: the
work done, waiting excluded, so it moves far less with the machine's load than samples/s).
Appends one JSON line per block to bench/results/ddp_overhead.jsonl (run id, commit,
torch and Fabric versions, date, variant, figures, load average).

Fabric is measured when ``lightning-fabric`` is installed (``pip install -e .[bench]``),
skipped with a note otherwise.

    .venv/bin/python bench/ddp_overhead.py [--rounds 3] [--reps 2] [--steps 150] [--isolated]
    .venv/bin/python bench/ddp_overhead.py --summarize last     # the table of the newest run again

Diagnostics: a variant may carry options after a colon, e.g.
``--variants plain ours "ours:fault.save_on_signal=false" "plain:stop_poll"``:

* ``ours:KEY=VALUE,...``: Hydra overrides for disttrain, and ``patch=NAME`` for one of
  ``OURS_PATCHES`` (bench-only monkeypatches, undone after the block, each switching off
  one piece of disttrain's per-step work);
* ``plain:FLAG,...``: the plain loop with ``PLAIN_FLAGS`` (one setting of disttrain or
  Fabric added at a time).
"""
from __future__ import annotations

import argparse
import datetime
import gc
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
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ddp_overhead.jsonl"
SIZES = {"mlp-1024": 1024, "mlp-256": 256}
#: the small model's steps are ~6x shorter: it runs 4x --steps, so every timed window lasts seconds.
STEPS_SCALE = {"mlp-1024": 1, "mlp-256": 4}
LOG_EVERY = 50  # disttrain's logging interval; also the warm-up and the timing window
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

Marks = list[tuple[float, float]]


def _mlp(hidden: int):
    from disttrain.models import build_mlp

    return build_mlp(IN_DIM, hidden, DEPTH, CLASSES)


def _dataset():
    from disttrain.data import synthetic_classification

    return synthetic_classification(DATASET, IN_DIM, CLASSES)


def _mark() -> tuple[float, float]:
    """(wall clock, CPU seconds of this process, all its threads: gloo's included)."""
    return time.perf_counter(), time.process_time()


def _marked(step: int, warmup: int) -> bool:
    return step >= warmup and step % LOG_EVERY == 0


def _split(spec: str) -> list[str]:
    return [item for item in spec.split(",") if item]


def _forever(loader) -> Iterator[Any]:
    while True:  # a new epoch (a new iterator) whenever the loader runs out
        yield from loader


class Patches:
    """Monkeypatches that are undone when the block ends (``with Patches() as p: p.set(...)``)."""

    def __init__(self):
        self.undo: list[tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self.undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self) -> "Patches":
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, value in reversed(self.undo):
            setattr(owner, name, value)
        self.undo.clear()


# ---------------------------------------------------------------------------- plain torch


def plain_block(hidden: int, steps: int, warmup: int, spec: str = "") -> Marks:
    """The loop people write by hand: DistributedSampler + DataLoader + DDP + SGD (on the
    process group that is up)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    flags = set(_split(spec))
    unknown = flags - set(PLAIN_FLAGS)
    if unknown:
        raise ValueError(f"plain: unknown flag(s) {sorted(unknown)}; known: {sorted(PLAIN_FLAGS)}")
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
    batches = _forever(DataLoader(dataset, batch_size=BATCH, sampler=DistributedSampler(dataset), drop_last=True))
    marks: Marks = []
    for step in range(1, steps + 1):
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
    return marks


# ---------------------------------------------------------------------------- Lightning Fabric


def fabric_version() -> str | None:
    try:
        import lightning_fabric
    except ImportError:
        return None
    return lightning_fabric.__version__


_FABRIC: list = []


def fabric_block(hidden: int, steps: int, warmup: int, spec: str = "") -> Marks:
    """The same loop written for Lightning Fabric (strategy=ddp, gloo, CPU), its defaults."""
    import torch
    import torch.distributed as dist
    from lightning_fabric import Fabric
    from torch.utils.data import DataLoader

    if spec:
        raise ValueError(f"fabric takes no options (got {spec!r})")
    if not _FABRIC:
        # The ranks are started by disttrain.testing.spawn with torchrun-style variables
        # (LOCAL_RANK, WORLD_SIZE, MASTER_*): Fabric sees processes created externally, and
        # keeps a process group that is already up.
        runner = Fabric(accelerator="cpu", strategy="ddp", devices=dist.get_world_size(), num_nodes=1,
                        precision="32-true")
        runner.launch()
        _FABRIC.append(runner)
    runner = _FABRIC[0]
    torch.manual_seed(0)
    model = _mlp(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model, optimizer = runner.setup(model, optimizer)
    # setup_dataloaders swaps in a DistributedSampler (shuffle=True), like the plain loop's.
    batches = _forever(runner.setup_dataloaders(DataLoader(_dataset(), batch_size=BATCH, shuffle=True,
                                                           drop_last=True)))
    marks: Marks = []
    for step in range(1, steps + 1):
        x, y = next(batches)
        optimizer.zero_grad()
        runner.backward(torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()
        if _marked(step, warmup):
            marks.append(_mark())
    return marks


# ---------------------------------------------------------------------------- disttrain


def _overrides(hidden: int, steps: int) -> list[str]:
    return ["strategy=ddp", "data=synthetic_classification", "loss=cross_entropy", f"model.in_dim={IN_DIM}",
            f"model.hidden={hidden}", f"model.depth={DEPTH}", f"model.out_dim={CLASSES}", f"data.size={DATASET}",
            f"data.batch_size={BATCH}", f"trainer.max_steps={steps}", f"trainer.log_every={LOG_EVERY}",
            "checkpoint.every_steps=0", "trainer.progress=log", f"optim.lr={LR}", f"optim.momentum={MOMENTUM}",
            "metrics.peak_flops=1e11"]  # skips the start-up matmul probe (MFU's denominator only)


def _patch_null_observer(p: Patches) -> None:
    """No observer: no step timing, comm hook, FLOP count, straggler check, per-rank gather."""
    import disttrain.engine.run
    from disttrain.observe.base import NullObserver

    p.set(disttrain.engine.run, "build_observer", lambda *args, **kwargs: NullObserver())


def _patch_no_comm_hook(p: Patches) -> None:
    """The observer without its DDP communication-timing hook (DDP's C++ all-reduce)."""
    from disttrain.observe import comm_timing

    p.set(comm_timing, "attach", lambda model: None)


def _patch_no_heartbeat(p: Patches) -> None:
    """The Guard's per-step heartbeat writes (and its batch generator) removed."""
    import disttrain.resilience.guard
    import disttrain.resilience.watchdog

    p.set(disttrain.resilience.guard.Guard, "_batches", lambda self, batches: batches)
    p.set(disttrain.resilience.watchdog.Heartbeat, "enter", lambda self, phase, step=None: None)


#: bench-only monkeypatches, each switching off one piece of disttrain's per-step work.
OURS_PATCHES: dict[str, Callable[[Patches], None]] = {
    "null_observer": _patch_null_observer, "no_comm_hook": _patch_no_comm_hook, "no_heartbeat": _patch_no_heartbeat}


def ours_block(hidden: int, steps: int, warmup: int, spec: str = "", shared_group: bool = True) -> Marks:
    """disttrain ``strategy=ddp`` through its real entry point ``run_rank`` (the loop, the
    engine, the observer, the Guard, rank 0's TensorBoard and log), timed by the steps'
    ``after_step`` callback. ``shared_group``: keep the process group that is up (run_rank's
    own init and teardown are skipped, nothing else)."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    import disttrain.engine.run
    from disttrain.config.resolvers import config_dir

    extra = [item for item in _split(spec) if not item.startswith("patch=")]
    marks: Marks = []
    with Patches() as p:
        for item in _split(spec):
            if item.startswith("patch="):
                OURS_PATCHES[item.removeprefix("patch=")](p)
        real_train = disttrain.engine.run.train

        def timed_train(settings, parts, start):
            inner = parts.after_step  # every rank, once per step, after the step's logging

            def after_step(step, fields):
                stop = inner(step, fields)
                if _marked(step, warmup):
                    marks.append(_mark())
                return stop

            parts.after_step = after_step
            return real_train(settings, parts, start)

        p.set(disttrain.engine.run, "train", timed_train)
        if shared_group:
            p.set(disttrain.engine.run.dist_setup, "init", lambda world, backend, timeout_s: _cpu())
            p.set(disttrain.engine.run.dist_setup, "teardown", lambda clean=True: dist.barrier() if clean else None)
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name="config", overrides=_overrides(hidden, steps) + extra)
        run_dir = Path(tempfile.mkdtemp(prefix="bench-ddp-"))  # rank 0's is used (run_rank agrees)
        try:
            disttrain.engine.run.run_rank(cfg, run_dir)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return marks


def _cpu():
    import torch

    return torch.device("cpu")


BLOCKS = {"plain": plain_block, "ours": ours_block, "fabric": fabric_block}


# ---------------------------------------------------------------------------- jobs (one per rank)


def interleaved_job(rank: int, world_size: int, hidden: int, steps: int, labels: list[str], reps: int,
                    first: int) -> list[tuple[str, Marks]]:
    """One process group, every variant ``reps`` times in a rotating order; (label, marks) per block."""
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    dist_setup.init(env.detect(), "gloo")
    out = []
    try:
        for rep in range(reps):
            shift = (first + rep) % len(labels)
            for label in labels[shift:] + labels[:shift]:
                base, _, spec = label.partition(":")
                gc.collect()  # the previous block's garbage is not this block's cost
                out.append((label, BLOCKS[base](hidden, steps, LOG_EVERY, spec)))
    finally:
        dist_setup.teardown()
    return out


def isolated_job(rank: int, world_size: int, hidden: int, steps: int, label: str) -> list[tuple[str, Marks]]:
    """One variant alone in its 2-rank job (disttrain: run_rank with its own process group)."""
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    base, _, spec = label.partition(":")
    if base == "ours":
        return [(label, ours_block(hidden, steps, LOG_EVERY, spec, shared_group=False))]
    dist_setup.init(env.detect(), "gloo")
    try:
        return [(label, BLOCKS[base](hidden, steps, LOG_EVERY, spec))]
    finally:
        dist_setup.teardown()


# ---------------------------------------------------------------------------- driver


def figures(world_size: int, per_rank: list[Marks]) -> dict[str, float]:
    """samples/s over the timed interval and the median of its windows (rank 0's clock),
    CPU ms per step and rank (mean over ranks)."""
    marks = per_rank[0]
    per_window = world_size * BATCH * LOG_EVERY
    walls = [wall for wall, _ in marks]
    windows = [per_window / (b - a) for a, b in zip(walls, walls[1:])]
    steps = LOG_EVERY * (len(marks) - 1)
    cpu = statistics.mean(1e3 * (m[-1][1] - m[0][1]) / steps for m in per_rank)
    return {"samples_per_s": per_window * len(windows) / (walls[-1] - walls[0]),
            "samples_per_s_window_median": statistics.median(windows), "cpu_ms_per_step": cpu,
            "windows": len(windows)}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _dirty() -> bool:
    """Whether tracked code differs from the commit a row names; rows an earlier run appended
    under bench/results do not count."""
    return bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results"))


def _variants(names: list[str]) -> list[str]:
    chosen = []
    for name in names:
        base = name.split(":", 1)[0]
        if base not in BLOCKS:
            raise SystemExit(f"unknown variant {name!r}; known: {sorted(BLOCKS)} (with :options)")
        if base == "fabric" and fabric_version() is None:
            print(f"skipping {name}: lightning-fabric is not installed (pip install -e .[bench])", flush=True)
            continue
        chosen.append(name)
    if "plain" not in chosen:
        raise SystemExit("the plain variant is the reference of every ratio: keep it in --variants")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="jobs per model size")
    parser.add_argument("--reps", type=int, default=2, help="blocks of every variant per job (interleaved mode)")
    parser.add_argument("--steps", type=int, default=150,
                        help=f"steps per block of mlp-1024 (mlp-256: 4x); the first {LOG_EVERY} are warm-up")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=["plain", "ours", "fabric"])
    parser.add_argument("--isolated", action="store_true", help="every variant in its own job")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON-lines file the raw rows are appended to")
    parser.add_argument("--summarize", metavar="RUN_ID", help="print the table of an earlier run from --results "
                        "(\"last\": the newest run) and exit")
    args = parser.parse_args()
    if args.summarize:
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        run_id = rows[-1]["run_id"] if args.summarize == "last" else args.summarize
        summary([row for row in rows if row["run_id"] == run_id], args.results)
        return
    if args.steps < 2 * LOG_EVERY:
        parser.error(f"--steps must be at least {2 * LOG_EVERY}: {LOG_EVERY} warm-up steps and one timed window")
    run(args, _variants(args.variants))


def run(args, variants: list[str]) -> None:
    from disttrain.testing import spawn
    import torch

    world = 2
    base_row = {"bench": "ddp_overhead", "run_id": uuid.uuid4().hex[:12], "commit": _git("rev-parse", "HEAD"),
                "dirty": _dirty(), "torch": torch.__version__,
                "lightning_fabric": fabric_version(), "python": platform.python_version(), "cpus": os.cpu_count(),
                "mode": "isolated" if args.isolated else "interleaved", "world": world, "backend": "gloo", "threads_per_rank": 1,
                "batch_per_rank": BATCH, "log_every": LOG_EVERY}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for round_index in range(args.rounds):
        for name in args.sizes:
            steps = args.steps * STEPS_SCALE[name]
            load = os.getloadavg()[0]
            if args.isolated:
                shift = round_index % len(variants)
                jobs = [(isolated_job, (SIZES[name], steps, label)) for label in variants[shift:] + variants[:shift]]
            else:
                jobs = [(interleaved_job, (SIZES[name], steps, variants, args.reps, round_index))]
            for fn, job_args in jobs:
                per_rank = spawn(fn, world, *job_args, timeout=1800, finish_grace=120)
                seen: dict[str, int] = {}
                for index, (label, _) in enumerate(per_rank[0]):
                    rep = seen[label] = seen.get(label, -1) + 1
                    fig = figures(world, [blocks[index][1] for blocks in per_rank])
                    row = {**base_row, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "round": round_index, "rep": rep, "model": name, "hidden": SIZES[name], "steps": steps,
                           "warmup": LOG_EVERY, "variant": label, **{k: round(v, 3) for k, v in fig.items()},
                           "loadavg_1m": round(load, 2)}
                    rows.append(row)
                    with args.results.open("a", encoding="utf-8") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"round {round_index} rep {rep} {name} {label}: {fig['samples_per_s']:,.0f} samples/s "
                          f"(window median {fig['samples_per_s_window_median']:,.0f}; CPU {fig['cpu_ms_per_step']:.3f} "
                          f"ms/step/rank; load {load:.1f})", flush=True)
    summary(rows, args.results)


def summary(rows: list[dict], results: Path) -> None:
    """Medians over the blocks of one run; every ratio pairs a block with the plain block of
    the same round and repetition (same size)."""
    first = rows[0]
    rounds, reps = 1 + max(row["round"] for row in rows), 1 + max(row["rep"] for row in rows)
    how = ("every variant in its own 2-rank job" if first["mode"] == "isolated" else
           f"x {reps} rep(s), variants interleaved in one 2-rank job per round")
    print(f"\nrun {first['run_id']} ({first['date'][:10]}, commit {first['commit'][:10]}"
          f"{' + local changes' if first['dirty'] else ''}, torch {first['torch']}, lightning-fabric "
          f"{first['lightning_fabric']}): {rounds} round(s) {how}; rows in {results}")
    print("samples/s: whole timed interval | median of its windows;  x plain: the same two as ratios to the "
          "paired plain block;  CPU: ms per step and rank, and its ratio to plain's (> 1: more work)")
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        plain = {(row["round"], row["rep"]): row for row in mine if row["variant"] == "plain"}
        print(f"{model}:")
        for label in dict.fromkeys(row["variant"] for row in mine):
            blocks = [row for row in mine if row["variant"] == label]

            def med(key: str, ratio: bool = False) -> float:
                return statistics.median(row[key] / plain[(row["round"], row["rep"])][key] if ratio else row[key]
                                         for row in blocks)

            print(f"  {label:44s} {med('samples_per_s'):9,.0f} | {med('samples_per_s_window_median'):9,.0f}"
                  f"   x plain {med('samples_per_s', True):.3f} | {med('samples_per_s_window_median', True):.3f}"
                  f"   CPU {med('cpu_ms_per_step'):6.3f} ms  x {med('cpu_ms_per_step', True):.3f}"
                  f"   ({len(blocks)} blocks)")

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
