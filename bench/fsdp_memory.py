"""Memory per rank and step time of ddp, fsdp (FSDP2), DeepSpeed ZeRO-2/3 and fsdp + cpu_offload,
side by side in one run, on 2 gloo ranks, for the reference MLP sized to >= 1 GB of fp32 parameters
(issue 13: is fsdp's memory within 10% of ZeRO-3's, its step time at least as good, and below
DDP's by the sharding factor?).

Every variant runs in its own fresh 2-rank torchrun job through the run's own engine
(``build_engine`` on a composed config, as ``bench/memory.py --zero`` does), so one variant's
freed memory cannot hide another's peak. Memory is measured, not derived from formulas: each
rank resets the kernel's high-water mark (``clear_refs``) just before the engine is built and
reads ``VmHWM`` after the steps; "growth" is that peak minus the resident set at the reset (the
process baseline: interpreter, torch, DeepSpeed's import, the process group). Growth therefore
includes building and initialising the model, DeepSpeed's flattening copies and buckets, FSDP's
all-gathered layers, gradients, AdamW's state and the step's temporaries. ``MALLOC_MMAP_THRESHOLD_``
makes big tensors come from mmap, so freed memory leaves the process. Step time: the steps after
the first (which allocates the optimizer state), each started behind a barrier, slowest rank,
median over steps; also as CPU seconds (process time, gloo's threads included: the work done,
which moves far less with a shared machine's load than wall time).

Appends one JSON line per variant to bench/results/fsdp_memory.jsonl (run id, commit, torch and
DeepSpeed versions, date, load); the last line reads
``fsdp_memory: fsdp/ddp memory X.XX, fsdp/zero3 memory Y.YY, fsdp/zero3 step time Z.ZZ``.

    .venv/bin/python bench/fsdp_memory.py [--variants ddp,fsdp,zero3] [--steps 4]      # all variants: ~12 min
    .venv/bin/python bench/fsdp_memory.py --hidden 1024 --depth 3      # a quick smoke run
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ddp_overhead import _dirty, _git  # the other benchmarks' helpers: the commit for the rows, /proc/self/status
from memory import _kib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "fsdp_memory.jsonl"
RANKS, IN_OUT = 2, 256
OPTIM = ["optim=adamw", "optim.lr=1e-4"]  # torch AdamW, fp32: 8 bytes of state per parameter
VARIANTS = {  # variant -> overrides; "{buckets}": DeepSpeed buckets sized to the model (ds_buckets)
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "zero2": ["strategy=deepspeed", "strategy.zero_stage=2", "{buckets}"],
    "zero3": ["strategy=deepspeed", "strategy.zero_stage=3", "{buckets}"],
    "fsdp_offload": ["strategy=fsdp", "strategy.cpu_offload=true"],
    "fsdp_keep": ["strategy=fsdp", "strategy.reshard_after_forward=false"],  # no backward all-gather
    "zero2_defaults": ["strategy=deepspeed", "strategy.zero_stage=2"],
    "zero3_defaults": ["strategy=deepspeed", "strategy.zero_stage=3"],
}


def ds_buckets(hidden: int) -> list[str]:
    """DeepSpeed's bucket sizes as Hugging Face's Trainer sets them for "auto" (hidden^2
    elements, prefetch 0.9 hidden^2, parameters under 10 hidden elements stay gathered).
    DeepSpeed's own defaults (5e8-element buckets: 2 GB each in fp32, more than this model's
    gradient shard) are measured as ``*_defaults``."""
    zero = {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "stage3_param_persistence_threshold": 10 * hidden}
    return [f"++strategy.config.zero_optimization.{key}={value}" for key, value in zero.items()]


def overrides(variant: str, args) -> list[str]:
    """The run's config: the reference MLP (depth-1 hidden x hidden Linears), AdamW, small batch."""
    model = [f"model.in_dim={IN_OUT}", f"model.hidden={args.hidden}", f"model.depth={args.depth}",
             f"model.out_dim={IN_OUT}", f"data.batch_size={args.batch}"]
    strategy = [o for item in VARIANTS[variant] for o in (ds_buckets(args.hidden) if item == "{buckets}" else [item])]
    return ["model=mlp", *model, *OPTIM, *strategy, *args.extra]


def held_bytes(model) -> int:
    """Parameter bytes this rank stores: a DTensor's local shard (FSDP), a ZeRO-3 partition
    (``ds_tensor``), or the whole tensor."""
    total = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def child(variant: str, out_dir: str, args) -> None:
    """One rank of a 2-rank torchrun job: peak memory and step time of ``variant``."""
    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir
    from disttrain.distributed import env
    from disttrain.distributed import process_group as dist_setup
    from disttrain.engine import builders
    from disttrain.engine.build import build_engine

    torch.set_num_threads(1)
    world = env.detect()
    device = dist_setup.init(world, "gloo", 1800)
    if "deepspeed" in VARIANTS[variant][0]:
        import deepspeed  # noqa: F401  (its import is the process baseline, not model-state memory)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(variant, args))
    param_bytes = sum(p.numel() * p.element_size() for p in builders.model_factory(cfg).meta().parameters())
    g = torch.Generator().manual_seed(world.rank)
    batch = [(torch.randn(args.batch, IN_OUT, generator=g), torch.randn(args.batch, IN_OUT, generator=g))]
    gc.collect()
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _kib("VmRSS")
    start = time.perf_counter()
    strategy, engine = build_engine(cfg, world, device, Path(out_dir))
    build_s = time.perf_counter() - start
    step_s, cpu_s = [], []
    for _ in range(args.steps):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        engine.train_step(batch, torch.nn.MSELoss())
        step_s.append(time.perf_counter() - start)
        cpu_s.append(time.process_time() - cpu)
    result = {"rank": world.rank, "param_bytes": param_bytes, "held_param_bytes": held_bytes(strategy.model),
              "baseline_mb": baseline / 1024, "peak_rss_mb": _kib("VmHWM") / 1024,
              "growth_mb": (_kib("VmHWM") - baseline) / 1024, "build_s": build_s, "step_s": step_s,
              "cpu_s": cpu_s}
    Path(out_dir, f"{variant}-{world.rank}.json").write_text(json.dumps(result))
    engine.close()
    dist_setup.teardown()


def measure(variant: str, args) -> dict:
    """``variant`` in a fresh 2-rank torchrun job; per-rank figures folded to the worst rank."""
    torchrun = Path(sys.executable).with_name("torchrun")
    passthrough = [f"--hidden={args.hidden}", f"--depth={args.depth}", f"--batch={args.batch}",
                   f"--steps={args.steps}", *[f"--extra={e}" for e in args.extra]]
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-mem-") as out:
        proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={RANKS}", str(Path(__file__).resolve()),
                               "--child", variant, out, *passthrough], cwd=ROOT, capture_output=True, text=True,
                              timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        ranks = [json.loads(Path(out, f"{variant}-{r}.json").read_text()) for r in range(RANKS)]
    def timed(key: str) -> float:  # the median step of the slowest rank
        return statistics.median(max(r[key][i] for r in ranks) for i in range(1, args.steps))

    return {"variant": variant, "param_bytes": ranks[0]["param_bytes"],
            "held_param_mb": max(r["held_param_bytes"] for r in ranks) / 2**20,
            **{k: max(r[k] for r in ranks) for k in ("peak_rss_mb", "growth_mb", "baseline_mb", "build_s")},
            "step_s": timed("step_s"), "cpu_s": timed("cpu_s"), "per_rank": ranks}


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """fsdp/ddp and fsdp/zero3 (growth and step time) where both variants ran."""
    out = {}
    for ref in ("ddp", "zero3"):
        if "fsdp" in rows and ref in rows:
            out[f"fsdp/{ref} memory"] = rows["fsdp"]["growth_mb"] / rows[ref]["growth_mb"]
            out[f"fsdp/{ref} step time"] = rows["fsdp"]["step_s"] / rows[ref]["step_s"]
            out[f"fsdp/{ref} cpu time"] = rows["fsdp"]["cpu_s"] / rows[ref]["cpu_s"]
    return out


def table(rows: dict[str, dict]) -> str:
    """MB per rank (the worst rank); growth = peak RSS - baseline; x ddp / x zero3: growth and
    wall step time as ratios; CPU s: process time of a step, all threads (less load-sensitive)."""
    lines = [f"{'variant':15} {'params held MB':>14} {'peak RSS MB':>11} {'baseline':>8} {'growth MB':>9} "
             f"{'x ddp':>6} {'x zero3':>7} {'step s':>7} {'x ddp':>6} {'x zero3':>7} {'CPU s':>6} {'build s':>7}"]

    def ratio(r: dict, ref: str, key: str, width: int) -> str:
        return f"{r[key] / rows[ref][key]:{width}.2f}" if ref in rows else f"{'-':>{width}}"

    for name, r in rows.items():
        lines.append(f"{name:15} {r['held_param_mb']:14.1f} {r['peak_rss_mb']:11.1f} {r['baseline_mb']:8.1f} "
                     f"{r['growth_mb']:9.1f} {ratio(r, 'ddp', 'growth_mb', 6)} {ratio(r, 'zero3', 'growth_mb', 7)} "
                     f"{r['step_s']:7.2f} {ratio(r, 'ddp', 'step_s', 6)} {ratio(r, 'zero3', 'step_s', 7)} "
                     f"{r['cpu_s']:6.2f} {r['build_s']:7.1f}")
    return "\n".join(lines)


def record(rows: dict[str, dict], args, loads: dict[str, float]) -> str:
    import torch

    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    base = {"bench": "fsdp_memory", "run_id": uuid.uuid4().hex[:12], "commit": _git("rev-parse", "HEAD"),
            "dirty": _dirty(), "torch": torch.__version__,
            "deepspeed": ds_version, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "world": RANKS, "backend": "gloo", "threads_per_rank": 1,
            "model": {"in_dim": IN_OUT, "hidden": args.hidden, "depth": args.depth, "out_dim": IN_OUT},
            "optimizer": "torch AdamW fp32", "batch_per_rank": args.batch, "steps": args.steps,
            "extra_overrides": args.extra, **{k: round(v, 4) for k, v in ratios(rows).items()}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as handle:
        for name, r in rows.items():
            row = {**base, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items() if k != "per_rank"},
                   "per_rank": r["per_rank"], "loadavg_1m": loads[name]}
            handle.write(json.dumps(row) + "\n")
    return base["run_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--hidden", type=int, default=5632)
    parser.add_argument("--depth", type=int, default=9, help="hidden blocks: depth-1 hidden x hidden Linears")
    parser.add_argument("--batch", type=int, default=8, help="samples per rank")
    parser.add_argument("--steps", type=int, default=4, help="AdamW steps; the first is not timed")
    parser.add_argument("--extra", action="append", default=[], help="a Hydra override for every variant")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args)
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not timed")
    rows, loads = {}, {}
    for variant in args.variants.split(","):
        loads[variant] = round(os.getloadavg()[0], 2)
        rows[variant] = measure(variant, args)
        r = rows[variant]
        print(f"{variant}: growth {r['growth_mb']:.0f} MB, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"step {r['step_s']:.2f} s (load {loads[variant]})", flush=True)
    run_id = record(rows, args, loads)
    first = next(iter(rows.values()))
    print(f"\nMLP {IN_OUT}-{args.hidden}x{args.depth}-{IN_OUT}: {first['param_bytes'] / 1e9:.3f} GB of fp32 "
          f"parameters; torch AdamW; batch {args.batch} per rank; {RANKS} gloo ranks, 1 thread each; "
          f"max over ranks; run {run_id} in {RESULTS.relative_to(ROOT)}\n")
    print(table(rows))
    r = ratios(rows)
    if len(r) == 6:
        print(f"fsdp_memory: fsdp/ddp memory {r['fsdp/ddp memory']:.2f}, fsdp/zero3 memory "
              f"{r['fsdp/zero3 memory']:.2f}, fsdp/zero3 step time {r['fsdp/zero3 step time']:.2f}")


if __name__ == "__main__":
    main()
