"""The plan's composition: parse the stated machine figures, measure the rest on this host,
and turn the model's facts and the workload into one prediction per strategy (``plan.model``
holds the formulas). The ``disttrain plan`` command that prints them is ``plan.cli``."""
from __future__ import annotations

import os
import re

import torch
from omegaconf import DictConfig, OmegaConf

from disttrain.plan import model as pm
from disttrain.plan import sharded
from disttrain.plan.model import human
from disttrain.strategies.precision import configured

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text, key: str) -> float:
    """'80GB' (10^9), '80GiB' (2^30), '512MB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{key}={text!r} is not a size: write e.g. 80GB, 24GiB or 512MB.")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_bandwidth(text, key: str) -> float:
    """Bytes/s from '100Gbps' / '100Gbit/s' (bits) or '12GB/s' / '12GB' (bytes)."""
    raw = str(text).strip()
    bits = re.search(r"(bps|bit/s|bit)$", raw, re.IGNORECASE)
    core = re.sub(r"(bps|bit/s|bit|/s)$", "", raw, flags=re.IGNORECASE)
    try:
        value = parse_bytes(core, key)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a bandwidth: write e.g. 100Gbps or 12GB/s.") from None
    return value / 8 if bits else value


def compose(argv: list[str]) -> DictConfig:
    """The run's config, composed exactly as the training app would (same overrides)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from disttrain.config.resolvers import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=argv)


def optimizer_bytes(cfg: DictConfig) -> int:
    """K: bytes of optimizer state per parameter (fp32)."""
    target = str(cfg.optim.get("_target_", "")).lower()
    if "adam" in target:
        return 8
    if "sgd" in target:
        return 4 if float(cfg.optim.get("momentum", 0) or 0) > 0 else 0
    return 8  # unknown optimizer: assume Adam-like, the common worst case


def _threads(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc) if not torch.cuda.is_available() else torch.get_num_threads()


def machine_from(cfg: DictConfig, facts: pm.ModelFacts, nproc: int, threads: int) -> tuple[pm.Machine, dict]:
    """Stated figures where given, measured ones here otherwise; ``notes`` say which."""
    from disttrain.plan import probe as plan_probe
    from disttrain.observe.peak import measure_peak

    p, notes = cfg.plan, {}
    memory = parse_bytes(p.device_memory, "plan.device_memory") if p.device_memory else _local_memory(nproc)
    notes["memory"] = "stated" if p.device_memory else "this machine"
    if p.bandwidth:
        bandwidth, latency = parse_bandwidth(p.bandwidth, "plan.bandwidth"), 0.0
    else:
        bandwidth, latency = plan_probe.collective_link(2)
    notes["link"] = "stated" if p.bandwidth else "measured here: 2 gloo ranks"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stated_peak = p.peak_flops or cfg.metrics.get("peak_flops")
    torch.set_num_threads(threads)
    local_peak = measure_peak(device) if not (stated_peak and p.efficiency) else 0.0
    peak = float(stated_peak or local_peak)
    notes["peak"] = "stated" if stated_peak else f"matmul probe, {threads} thread(s)"
    if p.efficiency:
        efficiency, micro, update, notes["eff"] = float(p.efficiency), 0.0, 0.0, "stated; optimizer time not modelled"
    else:
        batch, m = int(cfg.data.batch_size), int(p.micro_batches)
        efficiency, seconds, update = _measured_efficiency(cfg, facts, batch, threads, local_peak)
        # small micro-batches run less efficiently (per-call overheads): measure that too
        micro = _measured_efficiency(cfg, facts, batch // m, threads, local_peak)[0] if m > 1 and batch % m == 0 else 0.0
        notes["eff"] = (f"measured: fwd+bwd {seconds * 1e3:.1f} ms, update {update * 1e3:.1f} ms per real step here; "
                        f"{micro:.3f} at micro-batch {batch // m}")
    return pm.Machine(nproc, memory, bandwidth, latency, peak, efficiency, micro, update), notes


def _measured_efficiency(cfg: DictConfig, facts: pm.ModelFacts, batch: int, threads: int,
                         peak: float) -> tuple[float, float, float]:
    """(efficiency of forward+backward, its seconds, optimizer update seconds)."""
    from disttrain.plan import probe as plan_probe

    seconds, update = plan_probe.step_time(cfg, batch, threads)
    return facts.flops_per_sample * batch / seconds / peak, seconds, update


def _local_memory(nproc: int) -> float:
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / nproc


def describe(cfg: DictConfig, facts: pm.ModelFacts, machine: pm.Machine, notes: dict) -> str:
    return (f"model {cfg.model._target_}: {facts.params:,} parameters, {facts.flops_per_sample:.4g} FLOPs/sample "
            f"(fwd+bwd), {human(facts.act_bytes_per_sample)} activations/sample\n"
            f"machine: {machine.nproc} ranks; {human(machine.device_memory)}/rank ({notes['memory']}); link "
            f"{human(machine.bandwidth)}/s, latency {machine.latency * 1e6:.0f} us ({notes['link']}); peak "
            f"{machine.peak_flops:.3g} FLOP/s/rank ({notes['peak']}); efficiency {machine.efficiency:.3f} ({notes['eff']})\n"
            f"batch {cfg.data.batch_size}/rank x accum {cfg.trainer.grad_accum_steps}; optimizer state "
            f"{optimizer_bytes(cfg)} B/param; precision {configured(cfg)} (fsdp rows: {_fsdp_bytes(cfg)})")


def _fsdp_bytes(cfg: DictConfig) -> str:
    """The fsdp rows follow the run's precision; the others stay fp32 (said, not implied)."""
    gather, reduce = sharded.dtype_bytes(configured(cfg))
    return f"fp32 shards, {gather}-byte gathers, {reduce}-byte reductions"


def sharded_layouts(cfg: DictConfig, nproc: int) -> list[sharded.Layout]:
    """The FSDP rows: the run's strategy.reshard_after_forward / cpu_offload when it is
    strategy=fsdp, and the degrees stated in dist.tp / dist.pp / dist.dp_replicate (or
    dist.dp_shard); unstated ones default in ``sharded.layouts``."""
    strategy = cfg.strategy if str(cfg.strategy.get("_target_", "")).endswith(".FSDP") else {}
    dist = {key: OmegaConf.select(cfg, f"dist.{key}", default=None) for key in ("tp", "pp", "dp_replicate", "dp_shard")}
    replicate = dist["dp_replicate"]
    if replicate is None and dist["dp_shard"]:
        replicate = max(nproc // (dist["tp"] or 1) // dist["dp_shard"], 1)
    return sharded.layouts(nproc, dist["tp"], dist["pp"], replicate, strategy.get("reshard_after_forward", True),
                           bool(strategy.get("cpu_offload", False)))


def predictions(cfg: DictConfig, nproc: int) -> tuple[list[pm.Prediction], pm.ModelFacts, pm.Machine, dict]:
    from disttrain.plan import probe as plan_probe

    facts = plan_probe.model_facts(cfg, int(cfg.data.batch_size))
    machine, notes = machine_from(cfg, facts, nproc, _threads(nproc))
    work = pm.Workload(int(cfg.data.batch_size), int(cfg.trainer.grad_accum_steps), int(cfg.plan.micro_batches),
                       optimizer_bytes(cfg), configured(cfg))
    rows = sharded.predict_rows(facts, machine, work, sharded_layouts(cfg, nproc))
    return pm.predict_all(facts, machine, work, rows), facts, machine, notes


def check(cfg: DictConfig) -> None:
    """Reject bad plan.* settings before any probing."""
    p = cfg.plan
    if p.device_memory:
        parse_bytes(p.device_memory, "plan.device_memory")
    if p.bandwidth:
        parse_bandwidth(p.bandwidth, "plan.bandwidth")
    for key in ("peak_flops", "efficiency"):
        if p[key] is not None and not float(p[key]) > 0:
            raise ValueError(f"plan.{key}={p[key]} must be > 0 (or null to measure it here).")
    if p.efficiency is not None and float(p.efficiency) > 1:
        raise ValueError(f"plan.efficiency={p.efficiency} is a fraction of peak: give a value in (0, 1].")
    if int(p.micro_batches) < 1 or int(p.validate_nproc) < 1 or int(p.validate_steps) < 3:
        raise ValueError("plan.micro_batches and plan.validate_nproc must be >= 1, plan.validate_steps >= 3.")
