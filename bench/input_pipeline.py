"""A loader made slow on purpose (``data.debug_delay_s`` per sample) feeding the real loop
and the real Single strategy, with loader workers 0/1/2/4 and prefetch 2/4, side by side.

Prints samples/s, data-wait per step, data-wait share of the step, and the speed-up over
``num_workers=0``. The delay is a sleep (it models storage latency without using CPU), so
on this 2-core machine the workers overlap it with compute; CPU-heavy transforms would
scale with free cores instead.

    .venv/bin/python bench/input_pipeline.py [--delay 0.001] [--steps 60] [--batch 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

VARIANTS = [(0, 2), (1, 2), (2, 2), (2, 4), (4, 2)]  # (num_workers, prefetch_factor)


class Recorder:
    """Stands in for TensorBoard: keeps the last logged interval's figures."""

    def __init__(self):
        self.last: dict[str, float] = {}

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        self.last = dict(values)

    def close(self) -> None:
        pass


def measure(workers: int, prefetch: int, args) -> dict[str, float]:
    """Figures of the second half of a run (the first half holds worker start-up)."""
    from hydra import compose, initialize_config_dir

    from disttrain.engine import builders
    from disttrain.distributed import env
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.loop import LoopParts, LoopSettings, train
    from disttrain.observe.metrics import Meter
    from disttrain.observe.progress import Progress
    from disttrain.engine.build import build_engine

    overrides = ["strategy=single", f"data.batch_size={args.batch}", f"data.num_workers={workers}",
                 f"data.prefetch_factor={prefetch}", f"data.debug_delay_s={args.delay}", "model.hidden=1024",
                 "model.depth=4"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    cpu = torch.device("cpu")
    _, engine = build_engine(cfg, env.detect({}), cpu, Path("."))
    loader, sampler = builders.build_loader(cfg, builders.build_dataset(cfg), (0, 1))
    recorder = Recorder()
    parts = LoopParts(engine=engine, batches=iter(loader), advance_data=sampler.advance,
                      loss_fn=builders.build_loss(cfg), save=lambda step: None, meter=Meter(cpu),
                      tensorboard=recorder, progress=Progress(args.steps, 0, "log", enabled=False), device=cpu)
    train(LoopSettings(args.steps, 1, args.steps // 2, 0), parts, 0)
    return recorder.last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.001, help="seconds of sleep per sample")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many interleaved rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging
    import warnings

    logging.getLogger("disttrain").setLevel(logging.ERROR)  # the input-bound warnings are the point here
    warnings.filterwarnings("ignore", message=".*worker processes in total")  # 4 workers on 2 cores: on purpose
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):  # interleaved rounds: a load spike on a shared box hits every variant
        for workers, prefetch in VARIANTS:
            runs[(workers, prefetch)].append(measure(workers, prefetch, args))
    rows = [(w, p, {k: statistics.median(r[k] for r in runs[(w, p)]) for k in runs[(w, p)][0]}) for w, p in VARIANTS]
    base = rows[0][2]["samples_per_s"]
    print(f"loader delay {args.delay * 1e3:.1f} ms/sample x batch {args.batch} = "
          f"{args.delay * args.batch * 1e3:.0f} ms/batch; MLP 32-1024x4-1 on 1 thread; {args.steps} steps; medians of {args.rounds} rounds")
    print(f"{'workers':>7} {'prefetch':>8} {'samples/s':>10} {'step ms':>8} {'wait ms':>8} {'wait share':>10} {'speed-up':>8}")
    for workers, prefetch, f in rows:
        print(f"{workers:>7} {prefetch:>8} {f['samples_per_s']:>10.0f} {f['time_step_s'] * 1e3:>8.1f} "
              f"{f['data_wait_s'] * 1e3:>8.1f} {f['data_wait_share']:>10.0%} {f['samples_per_s'] / base:>7.2f}x")


if __name__ == "__main__":
    main()
