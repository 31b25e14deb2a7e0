"""torch.compile's speed-up on one rank: the reference GPT (experiment=gpt_text, strategy=single)
eager vs ``trainer.compile=true`` (inductor, per block), side by side, rounds interleaved so a
load spike hits both. The first compiled step (dynamo + inductor building the kernels) is
reported on its own; step times are medians after 5 warm-up steps. On a CPU and a model this
small a slowdown is an honest result: inductor's gains come from fusing memory-bound ops,
and here the Python overhead of the guards can cost more than the fusion saves.

    .venv/bin/python bench/compile_speedup.py [--steps 40] [--rounds 3] [--batch 16]

Appends one JSON line per run to bench/results/compile_speedup.jsonl; the last line reads
``compile_speedup: eager/compiled step time X.XX, first compiled step Y.Y s``.
"""
from __future__ import annotations

import statistics

import results_row
from precision import parse_args, run  # one rank through the run's own engine, median step after warm-up

VARIANTS = {"eager": (), "compiled": ("trainer.compile=true",)}


def main() -> None:
    args = parse_args(__doc__)
    steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    losses: dict[str, list[float]] = {name: [] for name in VARIANTS}
    first: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, extra in VARIANTS.items():
            step, loss = run("32", args, extra, first[name])
            steps[name].append(step)
            losses[name].append(loss)
    median = {name: statistics.median(values) for name, values in steps.items()}
    ratio = median["eager"] / median["compiled"]
    print(f"gpt_tiny on the shipped corpus, batch {args.batch}, {args.steps} steps, {args.device}, "
          f"one thread, medians of {args.rounds} interleaved rounds")
    print(f"{'variant':>9} {'step ms':>8} {'first step s':>13} {'loss@N':>8}")
    for name in VARIANTS:
        print(f"{name:>9} {median[name] * 1e3:>8.2f} {statistics.median(first[name]):>13.2f} "
              f"{statistics.median(losses[name]):>8.4f}")
    results_row.append("compile_speedup", device=args.device, batch=args.batch, steps=args.steps,
                       rounds=args.rounds, step_s=steps, first_step_s=first, loss=losses,
                       **{"eager/compiled": round(ratio, 4)})
    print(f"compile_speedup: eager/compiled step time {ratio:.2f}, "
          f"first compiled step {statistics.median(first['compiled']):.1f} s")


if __name__ == "__main__":
    main()
