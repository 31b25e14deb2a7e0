"""Synchronous vs asynchronous data parallelism with and without a straggler.

The same MLP regression run by ``ddp`` (2 ranks) and by ``param_server`` (1 server + 2
workers) with max_staleness 0, 4 and null; once with equal workers, once with one worker
slowed about 2x (its forward sleeps one normal step time). Each run logs once, at its
last step, so the only loop-level sync point is the end. Printed side by side:

* samples/s: samples of all workers over the run's training interval (the loop's meter);
* fast-worker pushes/s vs slow-worker pushes/s over the run (param_server's counters);
* final training loss and MSE of the final weights on the whole data set.

Run: ``.venv/bin/python bench/param_server.py [--steps 200] [--batch 256]``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from disttrain.engine import builders  # noqa: E402
from disttrain.checkpoint.commit import load_model_state  # noqa: E402

VARIANTS = [("ddp", ["strategy=ddp", "dist.nproc_per_node=2"], 1),
            ("ps s=0", ["strategy=param_server", "dist.nproc_per_node=3", "strategy.max_staleness=0"], 2),
            ("ps s=4", ["strategy=param_server", "dist.nproc_per_node=3", "strategy.max_staleness=4"], 2),
            ("ps s=inf", ["strategy=param_server", "dist.nproc_per_node=3", "strategy.max_staleness=null"], 2)]


def run(name: str, overrides: list[str], args, run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "disttrain", *overrides, f"trainer.max_steps={args.steps}",
           f"trainer.log_every={args.steps}", "checkpoint.every_steps=0", f"data.batch_size={args.batch}",
           "trainer.progress=log", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    text = proc.stdout + proc.stderr + "".join(p.read_text() for p in run_dir.rglob("*.log"))
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{text[-3000:]}")
    line = re.findall(rf"step {args.steps}  loss (\S+)  samples_per_s (\S+)", text)[-1]
    pushes = re.findall(r"pushes/s per worker \[([^\]]*)\]", text)
    return {"loss": float(line[0]), "samples_per_s": float(line[1]), "mse": evaluate(run_dir),
            "pushes": pushes[-1] if pushes else "-"}


def evaluate(run_dir: Path) -> float:
    cfg = OmegaConf.load(run_dir / ".hydra" / "resolved.yaml")
    model = builders.model_builder(cfg)()
    inputs, targets = builders.build_dataset(cfg).tensors
    with torch.no_grad():
        model.load_state_dict(load_model_state(run_dir))
        return torch.nn.functional.mse_loss(model(inputs), targets).item()


def straggler(slow_rank: int, delay_s: float) -> list[str]:
    return ["model._target_=disttrain.models.straggler.slow_mlp", f"+model.slow_rank={slow_rank}",
            f"+model.delay_s={delay_s:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, _ in VARIANTS:
            rows.append((name, "equal", run(name, overrides, args, Path(tmp) / f"{len(rows)}")))
        # one normal step of one worker = its batch / its share of ddp's throughput
        delay = args.batch / (rows[0][2]["samples_per_s"] / 2)
        for name, overrides, slow_rank in VARIANTS:
            rows.append((name, f"1 slow (+{delay * 1e3:.0f} ms)",
                         run(name, overrides + straggler(slow_rank, delay), args, Path(tmp) / f"{len(rows)}")))
    base = {kind: r["samples_per_s"] for name, kind, r in rows if name == "ddp"}
    print(f"\n{args.steps} steps per worker, batch {args.batch} per worker, 2 workers\n")
    print(f"{'variant':<10} {'workers':<22} {'samples/s':>10} {'vs ddp':>7} {'final loss':>11} {'final MSE':>10}  "
          f"pushes/s per worker")
    for name, kind, r in rows:
        print(f"{name:<10} {kind:<22} {r['samples_per_s']:>10.0f} {r['samples_per_s'] / base[kind]:>6.2f}x "
              f"{r['loss']:>11.4f} {r['mse']:>10.4f}  {r['pushes']}")


if __name__ == "__main__":
    main()
