"""Peak memory of this rank: device memory on GPUs, peak resident set (VmHWM) on CPU.

tracemalloc cannot see tensor memory, hence the kernel's high-water mark on CPU.
"""
from __future__ import annotations

import resource
import sys

import torch


def _vm_field(name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_bytes(device: torch.device) -> int:
    """Peak bytes since the start (device allocator on CUDA, process RSS otherwise)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _vm_field("VmHWM")
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _local(param: torch.Tensor) -> torch.Tensor:
    """The storage this rank really holds for a parameter: an FSDP2 / tensor-parallel
    DTensor's local shard, a DeepSpeed ZeRO-3 parameter's partition (``ds_tensor``; the
    parameter itself is an empty placeholder), otherwise the tensor."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param


def _optimizers(model):
    """Optimizers an engine that owns its step holds (DeepSpeed: ``engine.optimizer``, a ZeRO
    wrapper around the torch optimizer in ``.optimizer``)."""
    opt = getattr(model, "optimizer", None)
    while opt is not None and len(getattr(opt, "param_groups", ())):
        yield opt
        opt = getattr(opt, "optimizer", None)


def held_bytes(model) -> int:
    """Bytes of model state this rank holds when training starts: its parameters (local
    shards only) and, for engines that keep separate master weights (DeepSpeed's fp32
    partitions under bf16/fp16 and ZeRO), the optimizer's own parameter tensors. Each
    storage is counted once."""
    seen: dict[int, int] = {}
    tensors = [_local(p) for p in model.parameters()]
    tensors += [_local(p) for opt in _optimizers(model) for g in opt.param_groups for p in g["params"]]
    for t in tensors:
        if t.device.type != "meta" and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class TrainingMemory:
    """Memory that training itself uses on this rank: on GPUs the allocator's peak; on CPU
    the model state it holds (``held_bytes``: local shards, not full sizes) plus the growth
    of peak resident memory since training started (gradients, optimizer state,
    activations, temporaries). The kernel's peak
    counter is reset at the start (``clear_refs``) so earlier set-up peaks do not count."""

    def __init__(self, device: torch.device, model):
        self.device = device
        self.param_bytes = held_bytes(model) if model is not None else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _reset_peak()
        self.start = current_bytes(device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return peak_bytes(self.device)
        return self.param_bytes + max(0, peak_bytes(self.device) - self.start)


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not permitted: the peak then includes set-up
        pass


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _vm_field("VmRSS") or 0
