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


class TrainingMemory:
    """Memory that training itself uses on this rank: on GPUs the allocator's peak; on CPU
    the parameters' bytes (counted) plus the growth of peak resident memory since training
    started (gradients, optimizer state, activations, temporaries). The kernel's peak
    counter is reset at the start (``clear_refs``) so earlier set-up peaks do not count."""

    def __init__(self, device: torch.device, model):
        self.device = device
        params = model.parameters() if model is not None else []
        self.param_bytes = sum(p.numel() * p.element_size() for p in params)
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
