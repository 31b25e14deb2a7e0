"""Planner accuracy on this machine: predicted vs measured step time and memory growth for
two models x (single, ddp, pipeline) at 2 ranks, each a short real training run.

    .venv/bin/python bench/plan_accuracy.py [--steps 30] [--only mlp|gpt]

Prints one side-by-side table per model (errors are (predicted - measured) / measured).
"""
from __future__ import annotations

import argparse
import time

from disttrain.plan.core import check, compose
from disttrain.plan.measure import validate

CONFIGS = {
    # model states dominate memory here (3.2 M params x 16 B), so the memory model is tested
    "mlp": ["model.hidden=1024", "model.depth=4", "optim=adamw", "data.batch_size=64", "plan.micro_batches=4"],
    # attention, embeddings, cross-entropy; activations matter
    "gpt": ["experiment=gpt_text", "plan.micro_batches=4"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", choices=sorted(CONFIGS))
    args = parser.parse_args()
    for name, overrides in CONFIGS.items():
        if args.only and name != args.only:
            continue
        argv = overrides + [f"plan.validate_steps={args.steps}", "plan.validate_nproc=2"]
        cfg = compose(argv)
        check(cfg)
        start = time.perf_counter()
        print(f"== {name}: {' '.join(overrides)}")
        print(validate(cfg, argv))
        print(f"({time.perf_counter() - start:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
