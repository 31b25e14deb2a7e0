"""Step time and loss after N steps for trainer.precision = 32 / bf16 / fp16, side by side,
on the tiny GPT over the shipped text corpus (Single strategy, one thread, same seed and
batches for every precision; rounds interleaved so load spikes hit every variant).

On CPU, bf16 only pays off where the CPU has bf16 matrix units (AMX / AVX512-BF16); on
others autocast's casts cost more than they save. fp16 on CPU exists for testing; on a GPU
(run it there) both are expected to beat fp32.

    .venv/bin/python bench/precision.py [--steps 40] [--rounds 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

PRECISIONS = ("32", "bf16", "fp16")


def run(precision: str, args, extra: tuple[str, ...] = (), first: list | None = None) -> tuple[float, float]:
    """(median seconds per step after 5 warm-up steps, mean loss of the last 5 steps); ``extra``
    overrides (e.g. trainer.compile=true); ``first`` gets the first step's seconds appended."""
    from hydra import compose, initialize_config_dir

    from disttrain.engine import builders
    from disttrain.distributed import env
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.build import build_engine

    overrides = ["experiment=gpt_text", "strategy=single", f"trainer.precision={precision}",
                 f"data.batch_size={args.batch}", *extra]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    device = torch.device(args.device)
    _, engine = build_engine(cfg, env.detect({}), device, Path("."))  # the run's engine
    loader, sampler = builders.build_loader(cfg, builders.build_dataset(cfg), (0, 1))
    loss_fn, batches, times, losses = builders.build_loss(cfg), iter(loader), [], []
    for _ in range(args.steps):
        batch = [t.to(device) for t in next(batches)]
        start = time.perf_counter()
        stats = engine.train_step([batch], loss_fn)
        losses.append(stats.loss.item())  # .item() syncs a GPU, so the time is the whole step
        times.append(time.perf_counter() - start)
        sampler.advance(1)
    if first is not None:
        first.append(times[0])
    return statistics.median(times[5:]), sum(losses[-5:]) / 5


def parse_args(doc: str) -> argparse.Namespace:
    """The options of the one-rank step-time benchmarks (this one and compile_speedup.py)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args


def main() -> None:
    args = parse_args(__doc__)
    results: dict[str, list[tuple[float, float]]] = {p: [] for p in PRECISIONS}
    for _ in range(args.rounds):
        for precision in PRECISIONS:
            results[precision].append(run(precision, args))
    base = statistics.median(t for t, _ in results["32"])
    print(f"gpt_tiny on the shipped corpus, batch {args.batch}, {args.steps} steps, {args.device}, "
          f"medians of {args.rounds} rounds")
    print(f"{'precision':>9} {'step ms':>8} {'vs fp32':>8} {'loss@N':>8}")
    for precision, rows in results.items():
        step, loss = statistics.median(t for t, _ in rows), statistics.median(l for _, l in rows)
        print(f"{precision:>9} {step * 1e3:>8.1f} {base / step:>7.2f}x {loss:>8.4f}")


if __name__ == "__main__":
    main()
