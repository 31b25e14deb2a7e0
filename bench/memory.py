"""Peak memory and step time of the memory levers, each variant in a fresh process.

    python bench/memory.py                 # deep MLP and small GPT: none / full / every_2 / every_4 / disk
    python bench/memory.py --quick         # smaller shapes (what the test suite runs)
    python bench/memory.py --zero          # only per-rank memory of ddp vs ZeRO 1/2/3 on 2 ranks

Peak memory is the process's peak resident set during training steps minus its resident set
just before them (``VmHWM`` after ``echo 5 > /proc/self/clear_refs``); tracemalloc cannot see
tensor memory. ``MALLOC_MMAP_THRESHOLD_`` makes big tensors come from mmap, so freed activation
memory really leaves the process and one variant's peak does not hide in another's free list.
Disk offload moves activations into files, which the kernel may keep in its page cache: that is
not this process's memory, but it is the machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"none": {}, "full": {"activation_checkpointing": "full"},
            "every_2": {"activation_checkpointing": "every_n", "checkpoint_every": 2},
            "every_4": {"activation_checkpointing": "every_n", "checkpoint_every": 4},
            "disk": {"activation_offload": "disk", "offload_min_bytes": 1 << 16}}
MODELS = {  # name -> (builder kwargs, batch shape), full and --quick
    "mlp": ({"in_dim": 1024, "hidden": 1024, "depth": 24, "out_dim": 1024}, (2048,)),
    "gpt": ({"vocab_size": 256, "block_size": 256, "dim": 256, "heads": 4, "layers": 8}, (32, 256)),
}
QUICK = {"mlp": ({"in_dim": 128, "hidden": 128, "depth": 24, "out_dim": 128}, (4096,)),  # memory ~ B*H, time ~ B*H^2
         "gpt": ({"vocab_size": 256, "block_size": 128, "dim": 64, "heads": 4, "layers": 6}, (32, 128))}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _batch(model_name: str, kwargs: dict, shape: tuple):
    import torch

    if model_name == "mlp":
        return torch.randn(*shape, kwargs["in_dim"]), torch.randn(*shape, kwargs["out_dim"])
    idx = torch.randint(0, kwargs["vocab_size"], (*shape,))
    return idx, torch.randint(0, kwargs["vocab_size"], (*shape,))


def child(model_name: str, variant: str, quick: bool, steps: int) -> dict:
    """One variant in this (fresh) process."""
    import torch
    from omegaconf import OmegaConf

    from disttrain import memory
    from disttrain.config.schema import section
    from disttrain.models import build_gpt, build_mlp

    torch.set_num_threads(1)
    kwargs, shape = (QUICK if quick else MODELS)[model_name]
    torch.manual_seed(0)
    model = (build_mlp if model_name == "mlp" else build_gpt)(**kwargs)
    scratch = tempfile.mkdtemp(prefix="bench-offload-")
    cfg = OmegaConf.create({"memory": {**VARIANTS[variant], "offload_dir": scratch}})
    model = memory.apply(model, section(cfg, "memory"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs, targets = _batch(model_name, kwargs, shape)

    def step():
        optimizer.zero_grad(set_to_none=False)  # grads stay allocated: only activations vary
        out = model(inputs)
        loss = (torch.nn.functional.mse_loss(out, targets) if model_name == "mlp"
                else torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten()))
        loss.backward()
        optimizer.step()

    step()  # warm-up: gradients and optimizer state exist before we measure
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"model": model_name, "variant": variant, "peak_mb": (_kib("VmHWM") - before) / 1024,
            "step_ms": seconds * 1000, "left_files": sum(len(f) for _, _, f in os.walk(scratch))}


def measure(model_name: str, variant: str, quick: bool = False, steps: int = 3) -> dict:
    """Run one variant in a fresh interpreter and return its numbers."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, variant, "--steps", str(steps)]
    out = subprocess.run(cmd + (["--quick"] if quick else []), env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'model':5} {'variant':8} {'peak MB':>9} {'vs none':>8} {'step ms':>9} {'vs none':>8}"]
    base = {r["model"]: r for r in rows if r["variant"] == "none"}
    for r in rows:
        b = base[r["model"]]
        lines.append(f"{r['model']:5} {r['variant']:8} {r['peak_mb']:9.1f} {r['peak_mb'] / b['peak_mb']:8.2f} "
                     f"{r['step_ms']:9.1f} {r['step_ms'] / b['step_ms']:8.2f}")
    return "\n".join(lines)


ZERO_MODEL = {"vocab_size": 256, "block_size": 64, "dim": 512, "heads": 8, "layers": 6}
ZERO_VARIANTS = ("ddp", "zero1", "zero2", "zero3")


def zero_child(variant: str, out_dir: str) -> None:
    """One rank of a 2-rank run (under torchrun): peak RSS growth from model build to 2 AdamW steps."""
    import torch
    from hydra import compose, initialize_config_dir

    from disttrain.engine import builders
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.config.resolvers import config_dir
    from disttrain.engine.build import build_engine

    torch.set_num_threads(1)
    world = env.detect()
    device = dist_setup.init(world, "gloo", 300)
    overrides = ["model=gpt_tiny", "optim=adamw", "data.batch_size=2"] + [f"model.{k}={v}" for k, v in ZERO_MODEL.items()]
    if variant == "ddp":
        overrides.append("strategy=ddp")
    else:
        import deepspeed  # noqa: F401  (its import is not model-state memory)

        overrides += ["strategy=deepspeed", f"strategy.zero_stage={int(variant[-1])}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    psi = sum(p.numel() for p in builders.model_factory(cfg).meta().parameters())
    Path("/proc/self/clear_refs").write_text("5")
    before = _kib("VmRSS")
    _, engine = build_engine(cfg, world, device, Path(out_dir))  # the run's engine
    idx = torch.randint(0, 256, (2, 64))
    for _ in range(2):
        engine.train_step([(idx, idx)], lambda out, t: torch.nn.functional.cross_entropy(out.flatten(0, 1), t.flatten()))
    result = {"variant": variant, "rank": world.rank, "peak_mb": (_kib("VmHWM") - before) / 1024,
              "held_mb": (_kib("VmRSS") - before) / 1024, "psi": psi}
    Path(out_dir, f"{variant}-{world.rank}.json").write_text(json.dumps(result))
    engine.close()
    dist_setup.teardown()


def zero_table(nproc: int = 2) -> str:
    """ddp vs ZeRO 1/2/3 on ``nproc`` ranks, each in fresh processes, next to the ZeRO paper's formulas
    for fp32 training with Adam: params 4, grads 4, Adam moments K=8 bytes per parameter."""
    out = tempfile.mkdtemp(prefix="bench-zero-")
    torchrun = Path(sys.executable).with_name("torchrun")
    for variant in ZERO_VARIANTS:
        subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", str(Path(__file__).resolve()),
                        "--zero-child", variant, out], env={**os.environ, "OMP_NUM_THREADS": "1",
                       "MALLOC_MMAP_THRESHOLD_": "65536"}, check=True, capture_output=True, timeout=900)
    formula = {"ddp": lambda p: 16 * p, "zero1": lambda p: 8 * p + 8 * p / nproc,
               "zero2": lambda p: 4 * p + 12 * p / nproc, "zero3": lambda p: 16 * p / nproc}
    lines = [f"{'strategy':8} {'held MB per rank':>18} {'peak MB per rank':>18} {'paper MB':>9}"]
    for variant in ZERO_VARIANTS:
        rows = [json.loads(Path(out, f"{variant}-{r}.json").read_text()) for r in range(nproc)]
        held = " ".join(f"{r['held_mb']:8.1f}" for r in rows)
        peaks = " ".join(f"{r['peak_mb']:8.1f}" for r in rows)
        lines.append(f"{variant:8} {held:>18} {peaks:>18} {formula[variant](rows[0]['psi']) / 2**20:9.1f}")
    lines.append(f"Psi = {rows[0]['psi'] / 1e6:.1f}M parameters on {nproc} ranks (gloo, CPU); held = resident "
                 "growth after 2 steps, peak = its maximum; paper = (4+4+8)Psi split per stage")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default="mlp,gpt")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--zero", action="store_true", help="only the ddp vs ZeRO 1/2/3 table (needs deepspeed)")
    parser.add_argument("--zero-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.quick, args.steps)))
        return
    if args.zero_child:
        zero_child(*args.zero_child)
        return
    if not args.zero:
        rows = [measure(m, v, args.quick, args.steps) for m in args.models.split(",") for v in args.variants.split(",")]
        print(table(rows), flush=True)
    print(zero_table())


if __name__ == "__main__":
    main()
