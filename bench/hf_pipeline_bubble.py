"""Pipeline bubble on a Hugging Face transformers model (issue 14): a Llama-style decoder
(hidden 256, 8 layers cut 4 + 4 by module name, rotary positions, grouped-query attention,
tied embeddings) on 2 ranks, GPipe and 1F1B at m = 1..8 micro-batches, measured idle fraction
(the pipeline/bubble figure the run logs) against (p-1)/(m+p-1); the unsplit model on one rank
for scale. Medians over steps 3..N of the run's own engine; global batch 32 x 64 tokens.
Rows: bench/results/hf_pipeline_bubble.jsonl.

    .venv/bin/python bench/hf_pipeline_bubble.py [--steps 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEQ, BATCH = 64, 32
MODEL = ["model=hf_llama", "model.config.hidden_size=256", "model.config.intermediate_size=512",
         "model.config.num_hidden_layers=8", "model.config.num_attention_heads=8", "model.config.num_key_value_heads=4",
         "data=text", f"data.block_size={SEQ}", "loss=cross_entropy", "optim=sgd", "optim.lr=0.01",
         f"data.batch_size={BATCH}"]
RUNS = [("gpipe", 1), ("gpipe", 2), ("gpipe", 4), ("gpipe", 8), ("1f1b", 2), ("1f1b", 4), ("1f1b", 8)]


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*MODEL, *overrides])


def _batches(steps: int):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randint(0, 256, (BATCH, SEQ), generator=g), torch.randint(0, 256, (BATCH, SEQ), generator=g))]
            for _ in range(steps)]


def _pipelines(rank: int, world: int, steps: int, root: str) -> dict:
    from hydra.utils import instantiate

    from disttrain.distributed import env, process_group
    from disttrain.engine.build import build_engine

    info = env.detect()
    device = process_group.init(info, "gloo", 300)
    out = {}
    for schedule, m in RUNS:
        cfg = compose("strategy=pipeline", f"strategy.schedule={schedule}", f"strategy.micro_batches={m}")
        strategy, engine = build_engine(cfg, info, device, Path(root) / f"{schedule}{m}")
        loss_fn, rows = instantiate(cfg.loss), []
        for micro in _batches(steps):
            start = time.perf_counter()
            stats = engine.train_step(micro, loss_fn)
            rows.append((time.perf_counter() - start, stats.extra))
        rows = rows[2:]
        out[f"{schedule} m={m}"] = {"step_ms": 1e3 * statistics.median(r[0] for r in rows),
                                    "bubble": statistics.median(r[1]["pipeline/bubble"] for r in rows),
                                    "theory": rows[0][1]["pipeline/bubble_theory"],
                                    "blocks_per_stage": getattr(strategy, "counts", None)}
        engine.close()
    process_group.teardown()
    return out


def _unsplit(steps: int) -> float:
    from hydra.utils import instantiate

    from disttrain.engine import builders

    cfg = compose("strategy=single")
    model = builders.model_factory(cfg).full("cpu")
    loss_fn, optimizer, times = instantiate(cfg.loss), torch.optim.SGD(model.parameters(), lr=0.01), []
    for [(x, y)] in _batches(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    import results_row

    from disttrain.testing import spawn

    torch.set_num_threads(1)
    unsplit = _unsplit(args.steps)
    with tempfile.TemporaryDirectory(prefix="disttrain-hfbubble-") as root:
        runs = spawn(_pipelines, 2, args.steps, root, timeout=900)[0]
    print(f"Llama-style decoder, 2 ranks, global batch {BATCH} x {SEQ} tokens; unsplit on 1 rank: {unsplit:.0f} ms/step")
    print("| schedule | m | step ms | bubble | theory | gap (points) | blocks per stage |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in runs.items():
        schedule, m = name.split(" m=")
        print(f"| {schedule} | {m} | {row['step_ms']:.0f} | {row['bubble']:.2f} | {row['theory']:.2f} | "
              f"{100 * (row['bubble'] - row['theory']):+.1f} | {row['blocks_per_stage']} |")
    results_row.append("hf_pipeline_bubble", steps=args.steps, unsplit_ms=unsplit, runs=runs)
    worst = max(abs(r["bubble"] - r["theory"]) for r in runs.values())
    print(f"hf_pipeline_bubble: worst gap to theory {100 * worst:.1f} points over {len(runs)} schedules")


if __name__ == "__main__":
    main()
