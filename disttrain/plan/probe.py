"""What the planner measures: facts about the model (parameters, FLOPs, activation bytes)
and about this machine (compute efficiency of the model's own step, collective bandwidth).

Model facts come from one forward/backward on the meta device (no memory, any size), or
on the CPU when the model is small enough: the CPU's fused attention saves less than the
meta device's decomposed attention, and real is what the plan must predict.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig
from torch import nn

from disttrain.engine import builders
from disttrain.observe.flops import count_train_flops
from disttrain.plan.model import ModelFacts

SMALL_MODEL_BYTES = 256 << 20  # measure activations on CPU below this, on meta above


def example_batch(cfg: DictConfig, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch shaped like the run's (the dataset's first item, repeated)."""
    item = builders.build_dataset(cfg)[0]
    return tuple(torch.as_tensor(t).unsqueeze(0).repeat_interleave(batch, 0) for t in item[:2])


def _saved_bytes(model: nn.Module, inputs, targets, loss_fn) -> int:
    """Bytes of distinct non-parameter tensors autograd saves for backward."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(inputs), targets)
    return sum(seen.values())


def _blocks_and_boundary(model: nn.Module, inputs: torch.Tensor) -> tuple[int, int]:
    """(number of repeated blocks, bytes per sample of a block's output)."""
    children = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    kinds = [type(c).__name__ for c in children]
    blocks = max(kinds.count(k) for k in set(kinds))
    x, widest = inputs[:1], 0
    with torch.no_grad():
        for child in children[:-1]:  # the last output is the model's, not a boundary
            x = child(x)
            widest = max(widest, x.numel() * x.element_size())
    return max(blocks // 2 if kinds.count("Linear") == blocks else blocks, 1), widest


def model_facts(cfg: DictConfig, batch: int) -> ModelFacts:
    build, loss_fn = builders.model_builder(cfg), builders.build_loss(cfg)
    inputs, targets = example_batch(cfg, batch)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        meta = build()
    params = sum(p.numel() for p in meta.parameters())
    linear = sum(m.weight.numel() for m in meta.modules() if isinstance(m, nn.Linear))
    device = "cpu" if 4 * params < SMALL_MODEL_BYTES else "meta"
    with torch.random.fork_rng(devices=[]):
        model = build().to(device) if device == "cpu" else meta
    x, y = inputs[:1].to(device), targets[:1].to(device)  # one sample: activations scale with the batch
    saved = _saved_bytes(model, x, y, loss_fn) * batch
    blocks, boundary = _blocks_and_boundary(model, x)
    flops = count_train_flops(build, (inputs, targets), loss_fn)
    return ModelFacts(params=params, linear_params=linear, flops_per_sample=flops / batch,
                      act_bytes_per_sample=saved / batch, boundary_bytes_per_sample=boundary, blocks=blocks,
                      tp_replicated_act=_tp_replicated(cfg))


def _tp_replicated(cfg: DictConfig) -> float:
    """Activation share TP leaves replicated: Megatron's 10/(34+5as/h) per transformer
    layer (Korthikanti et al. 2022); half for plain Linear stacks (inputs of column layers)."""
    model = cfg.model
    if "heads" in model and "block_size" in model:
        extra = 5 * model.heads * model.block_size / model.dim
        return 10 / (34 + extra)
    return 0.5


def step_time(cfg: DictConfig, batch: int, threads: int, steps: int = 8) -> tuple[float, float]:
    """Median seconds of (forward + backward, optimizer update) of the real model here on
    one micro-batch, after two warm-up steps. They scale differently: forward/backward with
    the samples, the update with the parameters a rank holds (once per step)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            model = builders.model_builder(cfg)()
        optimizer = builders.optimizer_builder(cfg)(model.parameters())
        loss_fn, (x, y) = builders.build_loss(cfg), example_batch(cfg, batch)
        backward, update = [], []
        for _ in range(steps + 2):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            middle = time.perf_counter()
            optimizer.step()
            backward.append(middle - start)
            update.append(time.perf_counter() - middle)
        return statistics.median(backward[2:]), statistics.median(update[2:])
    finally:
        torch.set_num_threads(previous)


def _bandwidth_worker(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for numel in (256, 4 << 20):  # 1 KiB: latency; 16 MiB: bandwidth
        buf = torch.ones(numel)
        dist.all_reduce(buf)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            dist.all_reduce(buf)
            best = min(best, time.perf_counter() - start)
        results.append((numel * 4, best))
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def collective_link(world: int = 2) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of gloo all-reduce between ``world`` local processes,
    fitted to the ring model t = 2(n-1)/n·S/B + 2(n-1)·α."""
    from disttrain.distributed.process_group import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_bandwidth_worker, args=(r, world, port, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    (small, t_small), (big, t_big) = queue.get(timeout=120)
    for proc in procs:
        proc.join(30)
    hops = 2 * (world - 1)
    latency = t_small / hops
    bandwidth = hops / world * big / max(t_big - hops * latency, 1e-9)
    return bandwidth, latency
