"""Real short trainings through the CLI, and the two host terms the plan adds to every row,
measured from such a run of a tiny model (cached per host, rank count and strategy): the
training loop's own time per step (data loading, observer, the strategy's per-step calls
that do not scale with the model) and the framework memory a rank adds to its model's bytes
(autograd and communication buffers: several MB on CPU, which matters for small models).

Memory on CPU is measured with tensors of 64 KiB and more served from mmap (``MALLOC``), so
a freed tensor leaves the resident set and the peak counts live bytes (what the allocator's
peak is on a GPU) rather than glibc's reuse of freed heap; that mode makes fresh pages cost
page faults every step, so step time is measured in a separate run without it.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: the tiny model of the calibration run: its own compute and bytes are negligible
#: (hidden 32: even layers, so a 4-stage pipeline gets parameters on every stage; all tensors < 64 KiB)
TINY = ["model=mlp", "model.hidden=32", "model.depth=4", "optim=sgd", "data=synthetic", "data.batch_size=8"]
CAL_STEPS = 40
#: glibc's default threshold grows to 32 MiB after the first frees, keeping freed tensors resident
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}


def run_real(overrides: list[str], strategy: str, nproc: int, steps: int, threads: int, extra: list[str],
             run_dir: Path, timeout: float = 300, live_memory: bool = False,
             every: int | None = None) -> dict[str, float]:
    """Train ``steps`` steps for real; return the mean step seconds after the first logged
    interval (warm-up; ``every`` steps each, default a third of the run), the median of those
    intervals' step seconds, and the largest training memory over the ranks (bytes; live bytes
    with ``live_memory``)."""
    from disttrain.observe.report import read_scalars

    every = every or max(steps // 3, 1)
    cmd = [sys.executable, "-m", "disttrain", *overrides, f"strategy={strategy}", *extra,
           f"dist.nproc_per_node={nproc}", f"trainer.max_steps={steps}", f"trainer.log_every={every}",
           "checkpoint.every_steps=0", "metrics.straggler_every=0", "trainer.progress=log",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(MALLOC if live_memory else {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    tags = read_scalars(run_dir)
    steps_s = [v for _, v in tags["train/time_step_s"][1:]] or [v for _, v in tags["train/time_step_s"]]
    growth = max(tags[t][-1][1] for t in tags if t.endswith("/train_mem_gb") and t.startswith("rank"))
    # ranks outside the loop (parameter-server workers) write theirs (engine.run)
    free = [json.loads(p.read_text())["train_mem_b"] for p in sorted((run_dir / "memory").glob("rank*.json"))]
    return {"step_s": sum(steps_s) / len(steps_s), "step_median_s": statistics.median(steps_s),
            "memory_b": max([growth * 1e9, *free])}


def cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "disttrain" / "plan_host.json"


def _key(nproc: int, threads: int, strategy: str) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return (f"{platform.node()}|{device}|torch {torch.__version__}|{nproc} ranks x {threads} threads|{strategy}|"
            f"{' '.join(TINY)}")


def cached(key: str, measure) -> tuple[dict, str]:
    """(the entry stored under ``key`` in the host-term cache, where it comes from); on a miss
    ``measure()`` makes it now and it is merged into the file as it is then (another plan may
    have written meanwhile). Every host term (loop, framework, kernel code, overhead runs)."""
    path = cache_file()
    stored = json.loads(path.read_text()) if path.exists() else {}
    if key in stored:
        return stored[key], f"cached in {path}"
    entry = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**fresh, key: entry}, indent=1))
    return entry, "measured now"


def framework(nproc: int, threads: int, strategy: str | None = None,
              extra: tuple[str, ...] = ()) -> tuple[float, float, str]:
    """(loop overhead s per step, framework bytes per rank, where they come from) of
    ``strategy`` (default: ddp, single at one rank) from the cache, or measured now by a tiny
    run of ``nproc`` ranks here and stored. The tiny model's tensors stay under the mmap
    threshold, so one run gives both its step time and its live memory."""
    strategy = strategy or ("single" if nproc == 1 else "ddp")

    def measure() -> dict:
        with tempfile.TemporaryDirectory(prefix="disttrain-plan-host-") as tmp:
            return run_real(TINY, strategy, nproc, CAL_STEPS, threads, list(extra), Path(tmp) / "run",
                            live_memory=True)

    entry, where = cached(_key(nproc, threads, " ".join([strategy, *extra])), measure)
    return entry["step_s"], entry["memory_b"], where
