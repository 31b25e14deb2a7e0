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


def machine_from(cfg: DictConfig, facts: pm.ModelFacts, nproc: int, threads: int,
                 also: tuple[int, ...] = ()) -> tuple[pm.Machine, dict]:
    """Stated figures where given, measured ones here otherwise; ``notes`` say which. The
    measured ones come from ``nproc`` processes stepping at once (``plan.concurrent``), as
    the run will; the loop overhead and framework memory from a tiny run (``plan.host``).
    The batch sizes in ``also`` are timed in the same probe, in turn with the run's own, and
    ``notes["probed"]`` maps every timed batch to its (forward+backward s, update s)."""
    from disttrain.observe.peak import measure_peak
    from disttrain.plan import concurrent, host, pages

    p, notes = cfg.plan, {}
    memory = parse_bytes(p.device_memory, "plan.device_memory") if p.device_memory else _local_memory(nproc)
    notes["memory"] = "stated" if p.device_memory else "this machine"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stated_peak = p.peak_flops or cfg.metrics.get("peak_flops")
    torch.set_num_threads(threads)
    local_peak = measure_peak(device) if not (stated_peak and p.efficiency) else 0.0
    peak = float(stated_peak or local_peak)
    notes["peak"] = "stated" if stated_peak else f"matmul probe, {threads} thread(s)"
    batch, m = int(cfg.data.batch_size), int(p.micro_batches)
    micro_batch = batch // m if m > 1 and batch % m == 0 else 0
    need_link = not p.bandwidth and nproc > 1
    links, world = {}, 1
    if not p.efficiency or need_link:
        batches = (batch, micro_batch, *also) if not p.efficiency else ()
        timed, links, world = concurrent.probe(cfg, nproc, batches, threads)
        notes["probed"] = {b: t for b, t in zip(batches, timed) if b}
    if p.bandwidth:
        bandwidth, latency, links = parse_bandwidth(p.bandwidth, "plan.bandwidth"), 0.0, {}
        notes["link"] = "stated"
    elif links:
        latency, bandwidth = links["allreduce"]
        notes["link"] = f"all-reduce; measured here: {world} gloo ranks, " + ", ".join(
            f"{op} {human(b)}/s + {a * 1e6:.0f} us" for op, (a, b) in links.items())
    else:
        bandwidth, latency, notes["link"] = float("inf"), 0.0, "one rank: no communication"
    if p.efficiency:
        efficiency, micro, update, notes["eff"] = float(p.efficiency), 0.0, 0.0, "stated; optimizer time not modelled"
    else:
        (seconds, update), (micro_s, _) = timed[:2]
        efficiency = facts.flops_per_sample * batch / seconds / local_peak
        micro = facts.flops_per_sample * micro_batch / micro_s / local_peak if micro_s else 0.0
        notes["eff"] = (f"measured with {world} process(es) stepping at once, {threads} thread(s) each: fwd+bwd "
                        f"{seconds * 1e3:.1f} ms, update {update * 1e3:.1f} ms; {micro:.3f} at micro-batch "
                        f"{micro_batch}")
    machine = pm.Machine(nproc, memory, bandwidth, latency, peak, efficiency, micro, update, links)
    # links measured here: the ranks share this host (param_server's shared-memory exchange)
    machine.shared_host = not p.bandwidth and bool(cfg.strategy.get("shared_memory", True))
    if machine.shared_host and device.type == "cpu":
        machine.slots = (os.cpu_count() or 1) / threads
    if _stated_host(p):
        notes["host"] = "loop overhead and framework memory not added (stated machine)"
        return machine, notes
    tiny_step, base, where = host.framework(nproc, threads)
    comm = tiny_comm(machine, nproc, m)["single (1 rank)" if nproc == 1 else "ddp"]
    machine.overhead_s, machine.base_b = max(tiny_step - comm, 0.0), base
    # the tiny run's base counts its own kernels' code; this model's kernels page in more
    machine.code_b, code_where = pages.extra_code_bytes(cfg, compose(host.TINY), threads)
    notes["host"] = (f"loop {machine.overhead_s * 1e3:.1f} ms/step, framework {human(base)}/rank (tiny "
                     f"{'single' if nproc == 1 else 'ddp'} run, {where}) + {human(machine.code_b)} of the model's "
                     f"kernel code ({code_where})")
    return machine, notes


def _stated_host(p) -> bool:
    """A machine described by its figures (another host) gets no terms measured here."""
    return bool(p.device_memory and p.bandwidth and p.peak_flops and p.efficiency)


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
            f"host: {notes['host']}\n"
            f"batch {cfg.data.batch_size}/rank x accum {cfg.trainer.grad_accum_steps}; optimizer state "
            f"{optimizer_bytes(cfg)} B/param; precision {configured(cfg)} ({_storage(cfg)})")


def _storage(cfg: DictConfig) -> str:
    """How each engine stores the run's precision (``model.state_bytes``), said, not implied."""
    gather, reduce = sharded.dtype_bytes(configured(cfg))
    low = configured(cfg) != "32"
    zero = "2-byte params+grads, fp32 master + optimizer" if low else "fp32, stages 1-2 + fp32 master"
    return (f"fsdp rows: fp32 shards, {gather}-byte gathers, {reduce}-byte reductions; zero rows (DeepSpeed): {zero}; "
            f"others: fp32 params+grads (autocast)")


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


def predictions(cfg: DictConfig, nproc: int, facts: pm.ModelFacts | None = None, also: tuple[int, ...] = ()
                ) -> tuple[list[pm.Prediction], pm.ModelFacts, pm.Machine, dict]:
    """Every row on this host as measured now; ``facts`` (the model's, which do not change
    between probes of one config) are measured here unless given; ``also``: more batch sizes
    timed in the same probe (``machine_from``)."""
    from disttrain.plan import probe as plan_probe

    facts = facts or plan_probe.model_facts(cfg, int(cfg.data.batch_size))
    machine, notes = machine_from(cfg, facts, nproc, _threads(nproc), also)
    return rows_for(cfg, facts, machine, workload(cfg), nproc), facts, machine, notes


def workload(cfg: DictConfig) -> pm.Workload:
    return pm.Workload(int(cfg.data.batch_size), int(cfg.trainer.grad_accum_steps), int(cfg.plan.micro_batches),
                       optimizer_bytes(cfg), configured(cfg), _schedule(cfg), _staleness(cfg))


def rows_for(cfg: DictConfig, facts: pm.ModelFacts, machine: pm.Machine, work: pm.Workload,
             nproc: int) -> list[pm.Prediction]:
    """Every row (the sharded ones as the run's degrees lay them out) for one workload."""
    return pm.predict_all(facts, machine, work, sharded.predict_rows(facts, machine, work, sharded_layouts(cfg, nproc)))


def tiny_comm(machine: pm.Machine, nproc: int, micro_batches: int) -> dict[str, float]:
    """Predicted communication seconds per row for the host calibration's tiny model
    (``plan.host.TINY``) on ``machine``: its collectives are latency, which the rows
    already count, so they come off the tiny run's step before it is used as loop overhead."""
    from disttrain.plan import host
    from disttrain.plan import probe as plan_probe

    cfg = compose(host.TINY + [f"dist.nproc_per_node={nproc}"])
    facts = plan_probe.model_facts(cfg, int(cfg.data.batch_size))
    work = pm.Workload(int(cfg.data.batch_size), 1, micro_batches, optimizer_bytes(cfg), "32", "gpipe")
    rows = sharded.predict_rows(facts, machine, work, sharded.layouts(nproc)[:1])
    return {p.strategy.split(" m=")[0]: p.comm_s for p in pm.predict_all(facts, machine, work, rows)}


def _schedule(cfg: DictConfig) -> str:
    """The pipeline row's schedule: the run's when it is strategy=pipeline, else the default."""
    if str(cfg.strategy.get("_target_", "")).endswith(".Pipeline"):
        return str(cfg.strategy.get("schedule", "1f1b"))
    return "1f1b"


def _staleness(cfg: DictConfig):
    """The param_server row's max_staleness: the run's when it is strategy=param_server, else
    conf/strategy/param_server.yaml's default."""
    from disttrain.config.resolvers import config_dir

    if str(cfg.strategy.get("_target_", "")).endswith(".ParamServer"):
        return cfg.strategy.get("max_staleness")
    default = os.path.join(config_dir(), "strategy", "param_server.yaml")
    return OmegaConf.load(default).get("max_staleness", 0) if os.path.exists(default) else 0


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
    for key, least, why in (("micro_batches", 1, "pipeline micro-batches per step"),
                            ("validate_nproc", 1, "ranks of the validation runs"),
                            ("validate_steps", 3, "the first logged third is warm-up, so at least 3 steps"),
                            ("validate_repeats", 1, "launches of each timed run")):
        if int(p[key]) < least:
            raise ValueError(f"plan.{key}={p[key]} must be >= {least} ({why}).")
