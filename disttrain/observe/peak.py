"""Peak FLOP/s of one rank's device, measured once per machine by a short matmul probe
and cached in the run directory (or given by ``metrics.peak_flops``).

Why a probe rather than a spec sheet: on CPUs (and partitioned GPUs) the attainable peak
depends on threads, clocks and sharing; MFU against a measured dense-matmul rate says how
far the model's kernels are from what this machine actually reaches.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

CACHE_NAME = "peak_flops.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Best FLOP/s of a square matmul over a few timed rounds (the best round: other
    processes' load only ever slows a round down)."""
    n = 4096 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def machine_key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{socket.gethostname()}|{name}|{dtype}|threads={torch.get_num_threads()}"


def cached_peak(run_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The cached figure for this machine, device, dtype and thread count; probe and store
    it if missing (callers make one rank per machine do this, the others wait)."""
    path = run_dir / CACHE_NAME
    key = machine_key(device, dtype)
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key not in cache:
        cache[key] = measure_peak(device, dtype)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)
    return float(cache[key])


def read_cached(run_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> float | None:
    path = run_dir / CACHE_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text()).get(machine_key(device, dtype))
