"""Does asynchrony win where it should? DDP on 2 ranks vs the parameter server (1 server +
2 free-running workers, ``max_staleness`` 4, ``staleness_lr=inverse``), side by side in one run, with equal workers and
with one worker slowed by a sleep of one normal step (a sleep leaves the cores to the others,
so the comparison measures the algorithm, not the 2-core contention).

Synchronous training runs at the pace of its slowest rank: with one worker 2x slower, DDP
halves its throughput, while the parameter server's fast worker keeps computing (the limit
is 1.5x DDP). Per run it reports throughput (samples/s over the whole run), the time to reach
a target training loss (the loss the straggling DDP run has after 3/4 of its steps), the
final loss and the servers' staleness histogram; it plots loss vs wall time (PNG) and appends
one JSON line per run to bench/results/ps_straggler.jsonl. The last line reads
``ps_straggler: throughput ps/ddp X.XX, time-to-loss ps/ddp Y.YY, equal workers ps/ddp Z.ZZ``.

Each variant runs ``--repeats`` times (DDP and PS alternating; the equal rounds first, which
fix the straggler's sleep at the fastest equal DDP step) and reports its fastest round: on a shared 2-core machine one slow round would otherwise decide a ratio.

Run: ``.venv/bin/python bench/ps_straggler.py [--steps 300] [--batch 128] [--repeats 2]``.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ps_straggler.jsonl"
PLOT = ROOT / "bench" / "results" / "ps_straggler.png"
MODEL = ["model._target_=disttrain.models.straggler.slow_mlp", "model.hidden=512",
         "model.depth=4", "data.size=16384"]
DDP = ["strategy=ddp", "dist.nproc_per_node=2"]
PS = ["strategy=param_server", "dist.nproc_per_node=3", "strategy.max_staleness=4", "strategy.staleness_lr=inverse"]


def run(overrides: list[str], args, run_dir: Path) -> list[dict]:
    """One training run through the CLI; its metrics.jsonl rows (one per logging step)."""
    cmd = [sys.executable, "-m", "disttrain", *MODEL, *overrides, "optim=sgd", f"trainer.max_steps={args.steps}",
           "trainer.log_every=10", "checkpoint.every_steps=0", f"data.batch_size={args.batch}",
           "trainer.progress=log", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if "loss" in row and row.get("elapsed_s") is not None]


def histogram(run_dir: Path) -> dict[int, int]:
    """The server's staleness histogram at its last logging step (its own log line)."""
    found = re.findall(r"histogram (\{[^}]*\})", (run_dir / "train.log").read_text())
    return ast.literal_eval(found[-1]) if found else {}


def time_to(rows: list[dict], target: float) -> float:
    return next((row["elapsed_s"] for row in rows if row["loss"] <= target), float("nan"))


def summarize(name: str, rows: list[dict], args, samples_per_step: int) -> dict:
    last = rows[-1]
    return {"variant": name, "samples_per_s": args.steps * samples_per_step / last["elapsed_s"],
            "elapsed_s": last["elapsed_s"], "final_loss": last["loss"],
            "curve": [(round(r["elapsed_s"], 4), r["loss"]) for r in rows]}


def plot(results: dict[str, dict], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        times, losses = zip(*result["curve"])
        ax.plot(times, losses, label=name, linestyle="-" if "ps" in name else "--")
    ax.axhline(target, color="grey", linewidth=0.8, label="target loss")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("training loss (mean over 10 steps)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("DDP vs parameter server (s=4), 2 workers")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of the four runs; each variant reports its fastest round (the machine "
                             "is shared: one slow round must not decide a ratio)")
    args = parser.parse_args()
    per_step = 2 * args.batch  # two workers (or ranks) of one batch each
    rounds: list[dict[str, dict]] = [{} for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        def one(rep: int, name: str, overrides: list[str]) -> None:
            result = summarize(name, run(overrides, args, Path(tmp) / f"{name}{rep}"), args, per_step)
            if name.startswith("ps"):
                result["staleness"] = histogram(Path(tmp) / f"{name}{rep}")
            rounds[rep][name] = {**result, "repeat": rep}

        for rep in range(args.repeats):
            one(rep, "ddp equal", DDP)
            one(rep, "ps equal", PS)
        # the straggler sleeps one normal step: the fastest equal DDP round's
        delay = min(r["ddp equal"]["elapsed_s"] for r in rounds) / args.steps
        slow = [f"+model.delay_s={delay:.4f}"]
        for rep in range(args.repeats):
            one(rep, "ddp straggler", DDP + ["+model.slow_rank=1"] + slow)
            one(rep, "ps straggler", PS + ["+model.slow_rank=2"] + slow)
    best = {name: min((r[name] for r in rounds), key=lambda result: result["elapsed_s"]) for name in rounds[0]}
    ddp_curve = best["ddp straggler"]["curve"]
    target = ddp_curve[int(len(ddp_curve) * 0.75) - 1][1]
    for results in rounds:
        for result in results.values():
            result["time_to_target_s"] = time_to([{"elapsed_s": t, "loss": v} for t, v in result["curve"]], target)
            result["chosen"] = result is best[result["variant"]]
    x = best["ps straggler"]["samples_per_s"] / best["ddp straggler"]["samples_per_s"]
    y = best["ps straggler"]["time_to_target_s"] / best["ddp straggler"]["time_to_target_s"]
    z = best["ps equal"]["samples_per_s"] / best["ddp equal"]["samples_per_s"]
    _record(rounds, args, delay, target, x, y, z)
    plot(best, target)
    print(f"\n{args.steps} steps, batch {args.batch} per worker, 2 workers; straggler sleeps {delay * 1e3:.1f} ms "
          f"per step; target loss {target:.4g}; fastest of {args.repeats} round(s) per variant\n")
    print(f"{'variant':<15} {'samples/s':>10} {'time (s)':>9} {'to target (s)':>14} {'final loss':>11}  staleness")
    for name, r in best.items():
        print(f"{name:<15} {r['samples_per_s']:>10.0f} {r['elapsed_s']:>9.2f} {r['time_to_target_s']:>14.2f} "
              f"{r['final_loss']:>11.4g}  {r.get('staleness', '-')}")
    print(f"plot: {PLOT.relative_to(ROOT)}")
    print(f"ps_straggler: throughput ps/ddp {x:.2f}, time-to-loss ps/ddp {y:.2f}, equal workers ps/ddp {z:.2f}")


def _record(rounds: list[dict], args, delay: float, target: float, x: float, y: float, z: float) -> None:
    """Every run of every round (``chosen``: the one the ratios use)."""
    import torch
    from ddp_overhead import _dirty  # the benchmarks' helper: code changed since the commit

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    base = {"bench": "ps_straggler", "run_id": uuid.uuid4().hex[:12], "commit": git("rev-parse", "HEAD"),
            "dirty": _dirty(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "steps": args.steps,
            "batch_per_worker": args.batch, "repeats": args.repeats, "delay_s": round(delay, 5),
            "target_loss": target, "throughput_ratio": round(x, 3), "time_to_loss_ratio": round(y, 3),
            "equal_ratio": round(z, 3)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as handle:
        for results in rounds:
            for result in results.values():
                row = {**base, **{k: v for k, v in result.items() if k != "curve"}}
                row["staleness"] = {str(k): v for k, v in row.get("staleness", {}).items()}
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
