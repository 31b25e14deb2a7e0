"""disttrain's DDP against a plain hand-written torch DDP loop: same model, data, batch,
2 ranks with one thread each, runs interleaved round by round.

Prints, per model size, the throughput ratio ours/plain on 2 ranks (goal >= 0.99) and the
1->2 rank weak-scaling efficiency of both (throughput(2) / (2 * throughput(1))).

    .venv/bin/python bench/ddp_overhead.py [--rounds 3] [--steps 200]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {"mlp-1024": 1024, "mlp-256": 256}
BATCH = 64


def _overrides(hidden: int, steps: int, warmup: int) -> list[str]:
    return ["strategy=ddp", "data=synthetic_classification", "loss=cross_entropy", "model.in_dim=512",
            f"model.hidden={hidden}", "model.depth=3", "model.out_dim=10", f"data.batch_size={BATCH}",
            f"trainer.max_steps={steps}", f"trainer.log_every={warmup}", "checkpoint.every_steps=0",
            "trainer.progress=log", "optim.momentum=0.9"]


def ours(rank: int, world_size: int, hidden: int, steps: int, warmup: int) -> float:
    """Samples/s of disttrain after the warm-up interval, read from its own TensorBoard log."""
    import torch
    from hydra import compose, initialize_config_dir

    from disttrain.config import config_dir
    from disttrain.run import run_rank

    torch.set_num_threads(1)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=_overrides(hidden, steps, warmup))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    run_rank(cfg, run_dir)
    if rank != 0:
        return 0.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    step_times = [e.value for e in events.Scalars("train/time_step_s")][1:]  # skip warm-up interval
    return world_size * BATCH / statistics.mean(step_times)


def plain(rank: int, world_size: int, hidden: int, steps: int, warmup: int) -> float:
    """The loop people write by hand: DistributedSampler + DataLoader + DDP + SGD."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from disttrain.data import synthetic_classification
    from disttrain.models import build_mlp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DistributedDataParallel(build_mlp(512, hidden, 3, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = synthetic_classification(8192, 512, 10)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=DistributedSampler(dataset), drop_last=True)
    batches = iter(loader)
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    return world_size * BATCH * (steps - warmup) / elapsed


def main() -> None:
    from disttrain.testing import spawn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    warmup = args.steps // 4
    results: dict[tuple[str, str, int], list[float]] = {}
    for round_index in range(args.rounds):
        for name, hidden in SIZES.items():
            for world in (2, 1):
                for label, fn in (("plain", plain), ("ours", ours)):
                    value = spawn(fn, world, hidden, args.steps, warmup, timeout=900)[0]
                    results.setdefault((name, label, world), []).append(value)
                    print(f"round {round_index} {name} {label} world={world}: {value:,.0f} samples/s", flush=True)
    print("\nmodel      plain 2r   ours 2r   ours/plain   weak-scaling plain   weak-scaling ours")
    for name in SIZES:
        med = {k: statistics.median(v) for k, v in results.items() if k[0] == name}
        p2, o2, p1, o1 = med[(name, "plain", 2)], med[(name, "ours", 2)], med[(name, "plain", 1)], med[(name, "ours", 1)]
        print(f"{name:9s} {p2:9,.0f} {o2:9,.0f} {o2 / p2:11.3f} {p2 / (2 * p1):20.3f} {o2 / (2 * o1):19.3f}")


if __name__ == "__main__":
    main()
