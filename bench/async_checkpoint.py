"""How long the training loop is blocked by a checkpoint: synchronous save vs
``checkpoint.async_save=true`` (disttrain.checkpoint.background), side by side in one run.

Two ranks (gloo, this machine) each hold half of a >= 1 GB state in tensors of their own (as
FSDP shards are), saved through the run's own Checkpointer: DCP write, per-rank hashing of
each rank's share, manifest, atomic rename. Sync blocks for all of it; async blocks while the
state is copied to host memory, then writes and commits on a background thread over its own
gloo group. Rounds alternate sync and async; medians are reported. Goal (issue 20): async
blocks <= 10% of the sync save. Rows: bench/results/async_checkpoint.jsonl.

    .venv/bin/python bench/async_checkpoint.py [--gib 1.0] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PIECES = 8  # tensors per rank


def _rank(rank: int, world: int, gib: float, rounds: int, root: str) -> dict:
    from disttrain.checkpoint.background import BackgroundSaver
    from disttrain.checkpoint.commit import Checkpointer
    from disttrain.distributed import env, process_group

    process_group.init(env.detect(), "gloo", 600)
    numel = int(gib * 2**30 / 4 / world / PIECES)
    state = {"model": {f"r{rank}.p{i}": torch.randn(numel) for i in range(PIECES)}}
    background = BackgroundSaver()
    times: dict[str, list[float]] = {"sync_block_s": [], "async_block_s": [], "async_commit_s": []}
    try:
        for r in range(rounds):
            sync = Checkpointer(Path(root) / "sync", keep=1)
            start = time.perf_counter()
            sync.save(r + 1, state, {"step": r + 1})
            times["sync_block_s"].append(time.perf_counter() - start)
            asynchronous = Checkpointer(Path(root) / "async", keep=1, background=background)
            start = time.perf_counter()
            asynchronous.save(r + 1, state, {"step": r + 1})
            times["async_block_s"].append(time.perf_counter() - start)
            for tensor in state["model"].values():  # training goes on: the staged copy must not see this
                tensor.add_(1.0)
            asynchronous.wait()
            times["async_commit_s"].append(time.perf_counter() - start)
    finally:
        background.close()
        process_group.teardown(clean=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size over both ranks")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import results_row

    from disttrain.testing import spawn

    with tempfile.TemporaryDirectory(prefix="disttrain-async-") as root:
        per_rank = spawn(_rank, 2, args.gib, args.rounds, root, timeout=1800)
    # a save blocks the loop until the slowest rank returns from it
    worst = {key: [max(rank[key][i] for rank in per_rank) for i in range(args.rounds)] for key in per_rank[0]}
    median = {key: statistics.median(values) for key, values in worst.items()}
    ratio = median["async_block_s"] / median["sync_block_s"]
    print(f"{args.gib:.2f} GiB state over 2 ranks, {args.rounds} rounds (medians of the slowest rank)")
    print(f"{'':>6} {'loop blocked s':>15} {'until committed s':>18}")
    print(f"{'sync':>6} {median['sync_block_s']:>15.3f} {median['sync_block_s']:>18.3f}")
    print(f"{'async':>6} {median['async_block_s']:>15.3f} {median['async_commit_s']:>18.3f}")
    results_row.append("async_checkpoint", gib=args.gib, ranks=2, rounds=args.rounds, **worst,
                       **{"async/sync blocking": round(ratio, 4)})
    print(f"async_checkpoint: loop blocked async/sync {ratio:.3f} "
          f"({median['async_block_s']:.3f} s vs {median['sync_block_s']:.3f} s for {args.gib:.2f} GiB)")


if __name__ == "__main__":
    main()
