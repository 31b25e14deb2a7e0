"""Same-host fast path: a worker and a server on one machine exchange parameters and
gradients through shared memory instead of loopback TCP.

Why: over gloo every 3.2 MB push or pull costs about 1.1 ms of CPU on *each* side plus the
copy latency on the critical path (measured on the 2-core CI machine, bench/ps_straggler.py's
model), which is ~12 % of a worker's step there and the server's largest cost. With the
buffers in a file-backed shared mapping the worker's gradients and parameters are simply
views of memory the server can read and write: a push is its 56-byte header (the server
copies the gradient out when the header arrives), a pull is a memcpy by the server into
the worker's parameter buffer followed by the 32-byte reply. The headers keep flowing
over gloo, so ordering (a push is consumed before the same worker's next pull is
answered, and the worker touches its buffers only after that reply) is what makes the
sharing race-free. torch has no cross-process shared tensor for processes it did not fork
(torch.multiprocessing shares by pickling through a pipe), hence the files in /dev/shm.

Files are created by the worker and unlinked as soon as both sides mapped them, so a
killed job leaves nothing behind.
"""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def host_key() -> str:
    """Machines are the same when hostname and kernel boot id agree (containers on one host
    with separate /dev/shm have different hostnames)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def room(needed_bytes: int) -> bool:
    """Whether /dev/shm is writable and has ``needed_bytes`` free. tmpfs lets a file be sized
    beyond its limit and kills the process with SIGBUS when a page past it is touched (a
    container's default /dev/shm is 64 MB), so the space is checked before any file exists."""
    if not (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)):
        return False
    stats = os.statvfs(SHM_DIR)
    return stats.f_bavail * stats.f_frsize >= needed_bytes


def shared_pairs(group: Any, rank: int, num_servers: int, enabled: bool,
                 needed_bytes: int = 0) -> tuple[str, set[tuple[int, int]]]:
    """A collective over ``group`` (every rank): the run's file token and the (server rank,
    worker rank) pairs that may share memory. Empty when disabled, or when /dev/shm is
    missing or has less than ``needed_bytes`` free (the run then goes over TCP and says so)."""
    usable = enabled and room(needed_bytes)
    mine = [host_key() if usable else None, uuid.uuid4().hex[:12]]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    token = everyone[0][1]
    hosts = [entry[0] for entry in everyone]
    pairs = {(s, w) for s in range(num_servers) for w in range(num_servers, len(hosts))
             if hosts[s] is not None and hosts[s] == hosts[w]}
    return token, pairs


def _path(token: str, server: int, worker: int, what: str) -> Path:
    return SHM_DIR / f"disttrain-ps-{token}-s{server}-w{worker}-{what}"


def open_buffers(token: str, server: int, worker: int, numel: int, dtype: torch.dtype,
                 create: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(parameters, gradients) flat buffers of one worker/server pair, mapped shared. The
    worker creates them (zeroed), the server maps the same files."""
    buffers = []
    for what in ("params", "grads"):
        path = _path(token, server, worker, what)
        if not create and not path.exists():
            raise RuntimeError(f"parameter server: shared buffer {path} is missing (set "
                               "strategy.shared_memory=false to use TCP between the ranks of one host)")
        buffers.append(torch.from_file(str(path), shared=True, size=numel, dtype=dtype))
    return buffers[0], buffers[1]


def unlink(token: str, server: int, worker: int) -> None:
    """After both sides mapped the files (the mappings stay valid)."""
    for what in ("params", "grads"):
        _path(token, server, worker, what).unlink(missing_ok=True)
