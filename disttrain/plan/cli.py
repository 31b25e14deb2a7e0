"""``disttrain plan <overrides>``: before spending a cluster's hours, predict per strategy the
memory per rank and the step time, mark what does not fit, recommend one; with
``plan.validate=true`` also run short real trainings here and print predicted vs measured.

    disttrain plan model=gpt_tiny dist.nproc_per_node=8 plan.device_memory=80GB plan.bandwidth=100Gbps
"""
from __future__ import annotations

import os
import sys

from disttrain.plan import model as pm
from disttrain.plan.core import check, compose, describe, human, predictions


def format_table(preds: list[pm.Prediction], device_memory: float) -> str:
    head = ("strategy", "params", "grads", "optim", "activ", "temp", "step tmp", "base", "total/rank", "fits",
            "compute ms", "update ms", "comm ms", "loop ms", "bubble", "step ms", "samples/s", "note")
    rows = [head] + [(p.strategy, human(p.params_b), human(p.grads_b), human(p.optim_b), human(p.act_b), human(p.temp_b),
                      human(p.step_temp_b), human(p.base_b + p.code_b), human(p.memory_b),
                      "yes" if p.fits else "NO",
                      f"{p.compute_s * 1e3:.2f}", f"{p.update_s * 1e3:.2f}", f"{p.comm_s * 1e3:.2f}",
                      f"{p.overhead_s * 1e3:.2f}", f"{p.bubble:.2f}", f"{p.step_s * 1e3:.2f}",
                      f"{p.samples_per_s:.4g}", p.note) for p in preds]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + (f"\n(device memory per rank: {human(device_memory)}; total = params + grads + optim + "
                                "max(activ + temp, step tmp) + base; base = the host's framework term + the "
                                "model's kernel code)")


def config_dir_overrides(argv: list[str]) -> list[str]:
    """``--config-dir DIR`` / ``-cd DIR`` (as the training command takes them) become
    ``hydra.searchpath=[file://DIR]``: the user's config groups next to disttrain's."""
    out, extra, args = [], [], iter(argv)
    for arg in args:
        if arg in ("--config-dir", "-cd") or arg.startswith("--config-dir="):
            path = arg.split("=", 1)[1] if "=" in arg else next(args, None)
            if not path:
                raise ValueError(f"{arg} needs a directory: --config-dir DIR")
            if not os.path.isdir(path):
                raise ValueError(f"--config-dir {path}: no such directory")
            extra.append(f"file://{os.path.abspath(path)}")
        else:
            out.append(arg)
    return out + ([f"hydra.searchpath=[{','.join(extra)}]"] if extra else [])


def main(argv: list[str]) -> int:
    """Config and usage errors print one line and return 2 (Hydra's and OmegaConf's own
    errors, a mistyped key for instance, are turned into one line by ``disttrain.__main__``)."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    from disttrain.engine.preflight import validate as preflight

    try:
        argv = config_dir_overrides(argv)
        cfg = compose(argv)
        check(cfg)
        nproc = int(cfg.dist.nproc_per_node)
        preflight(cfg, nproc)  # the same checks as the training command
        preds, facts, machine, notes = predictions(cfg, nproc)
    except ValueError as exc:  # ConfigError too
        print(f"disttrain plan: {exc}", file=sys.stderr)
        return 2
    print(describe(cfg, facts, machine, notes))
    print(format_table(preds, machine.device_memory))
    best = pm.recommend(preds)
    print(f"recommended: {best.strategy} ({best.samples_per_s:.4g} samples/s, {human(best.memory_b)}/rank)"
          if best else "recommended: nothing fits; add ranks, shrink the batch, or use activation checkpointing")
    if cfg.plan.validate:
        from disttrain.plan.measure import validate

        print(validate(cfg, argv))
    return 0
