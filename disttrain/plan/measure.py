"""``plan.validate=true``: short real trainings here, predicted vs measured side by side.

Each strategy that exists in conf/strategy runs through the real CLI in a subprocess (its
own process group, its own run dir); measured figures are read back from its TensorBoard
files: the observer's mean step time over the logged intervals after the first (warm-up),
and the largest training memory over the ranks (GPU: peak allocated; CPU: parameter bytes
plus the growth of peak resident memory once training started).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from disttrain.config.resolvers import config_dir
from disttrain.plan import model as pm
from disttrain.plan.core import compose, human, predictions

#: CLI strategy -> (extra overrides, name of the matching prediction)
CANDIDATES = {
    "single": ([], "single (1 rank)"),
    "ddp": ([], "ddp"),
    "pipeline": (["strategy.schedule=gpipe"], "pipeline"),
}  # param_server: its server and worker ranks step at different rates; not validated yet


def _overrides(argv: list[str]) -> list[str]:
    # hydra.searchpath stays: the measured runs must see the user's config directories.
    return [a for a in argv if not a.startswith(("plan.", "dist.nproc_per_node=", "strategy=", "hydra."))
            or a.startswith("hydra.searchpath=")]


def run_measured(argv: list[str], strategy: str, nproc: int, steps: int, threads: int, extra: list[str],
                 run_dir: Path) -> dict[str, float]:
    """Train ``steps`` steps for real; return measured step seconds and memory growth bytes."""
    from disttrain.observe.report import read_scalars

    every = max(steps // 3, 1)
    cmd = [sys.executable, "-m", "disttrain", *_overrides(argv), f"strategy={strategy}", *extra,
           f"dist.nproc_per_node={nproc}", f"trainer.max_steps={steps}", f"trainer.log_every={every}",
           "checkpoint.every_steps=0", "metrics.straggler_every=0", "trainer.progress=log",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    tags = read_scalars(run_dir)
    steps_s = [v for _, v in tags["train/time_step_s"][1:]] or [v for _, v in tags["train/time_step_s"]]
    growth = max(tags[t][-1][1] for t in tags if t.endswith("/train_mem_gb") and t.startswith("rank"))
    return {"step_s": sum(steps_s) / len(steps_s), "memory_b": growth * 1e9}


def _error(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas * 100:+.0f}%" if meas > 0 else "n/a"


def side_by_side(rows: list[tuple[str, pm.Prediction, dict[str, float]]]) -> str:
    head = ("strategy", "ranks", "pred step ms", "meas step ms", "error", "pred mem", "meas mem", "error")
    lines = [head] + [(name, str(n), f"{p.step_s * 1e3:.2f}", f"{m['step_s'] * 1e3:.2f}",
                       _error(p.step_s, m["step_s"]), human(p.memory_b), human(m["memory_b"]),
                       _error(p.memory_b, m["memory_b"])) for name, n, p, m in rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def validate(cfg: DictConfig, argv: list[str]) -> str:
    """Predict at plan.validate_nproc ranks, run each available strategy, compare."""
    nproc, steps = int(cfg.plan.validate_nproc), int(cfg.plan.validate_steps)
    local = compose(_overrides(argv) + [f"dist.nproc_per_node={nproc}", "plan.device_memory=null",
                                        "plan.bandwidth=null"])
    preds = {p.strategy.split(" m=")[0]: p for p in predictions(local, nproc)[0]}
    threads = max(1, (os.cpu_count() or 1) // nproc)
    rows = []
    available = [s for s in CANDIDATES if (Path(config_dir()) / "strategy" / f"{s}.yaml").exists()]
    with tempfile.TemporaryDirectory(prefix="disttrain-plan-") as tmp:
        for name in available:
            extra, key = CANDIDATES[name]
            n = 1 if name == "single" else nproc
            if name == "pipeline":
                extra = extra + [f"strategy.micro_batches={cfg.plan.micro_batches}"]
            measured = run_measured(argv, name, n, steps, threads, extra, Path(tmp) / name)
            rows.append((name, n, preds[key], measured))
    return f"validation here ({nproc} ranks, {steps} steps each):\n" + side_by_side(rows)
