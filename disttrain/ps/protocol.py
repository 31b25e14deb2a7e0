"""The wire format between workers and servers, and how parameters are split over servers.

Every message starts with a fixed-size float64 header (so a server can post one receive
per worker without knowing what comes next); a push is followed by one flat gradient
buffer, a parameter reply is a small int64 ``Reply`` (version, go/stop, the worker's applied
pushes, whether parameters follow) plus, unless the worker already holds that version, one
flat parameter buffer. Distinct
tags keep the streams apart on one pair of ranks. float64 holds the integer fields
exactly (up to 2**53) and the loss without an extra message.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

PULL, PUSH, BYE = 1, 2, 3
TAG_HEADER, TAG_GRAD, TAG_VERSION, TAG_PARAMS = 101, 102, 103, 104
HEADER_LEN = 7
GO, STOP, STOP_PEERS_LOST = 0, 1, 2  # Reply.status
REPLY_LEN = 4


@dataclasses.dataclass(frozen=True)
class Header:
    """kind: PULL (send me parameters), PUSH (a gradient) or BYE (this worker is done)."""

    kind: int
    clock: int = 0            # pushes this worker has sent in this session
    pulled_version: int = -1  # server version the gradient was computed on
    loss: float = 0.0         # the worker's loss for this gradient (logged by the server)
    grad_norm: float = 0.0    # global 2-norm of the whole gradient (servers clip by it)
    samples: int = 0          # samples behind this gradient (the servers' throughput)
    stop: int = 0             # 1: this worker's process got a stop signal (the job should stop)

    def pack(self) -> torch.Tensor:
        return torch.tensor([self.kind, self.clock, self.pulled_version, self.loss, self.grad_norm,
                             self.samples, self.stop], dtype=torch.float64)

    @classmethod
    def unpack(cls, buf: torch.Tensor) -> "Header":
        kind, clock, version, loss, norm, samples, stop = buf.tolist()
        return cls(int(kind), int(clock), int(version), float(loss), float(norm), int(samples), int(stop))


@dataclasses.dataclass(frozen=True)
class Reply:
    """What comes with the parameters: their version, whether to go on, and how many of this
    worker's pushes the server has applied over the whole run (after a resume: where the
    worker's data stream continues). ``payload`` 0: no parameters follow, the worker already
    holds this version (a fast worker between two updates pulls 32 bytes, not the model)."""

    version: int
    status: int = GO
    applied: int = 0
    payload: int = 1

    def pack(self) -> torch.Tensor:
        return torch.tensor([self.version, self.status, self.applied, self.payload], dtype=torch.int64)

    @classmethod
    def unpack(cls, buf: torch.Tensor) -> "Reply":
        version, status, applied, payload = buf.tolist()
        return cls(int(version), int(status), int(applied), int(payload))


def plan_shards(sizes: Sequence[int], num_servers: int) -> list[list[int]]:
    """Assign parameter indices to servers, balanced by element count (largest first to
    the least-loaded server: the classic greedy bound of 4/3 of optimal). Each server's
    list keeps model order, so every rank derives the same flat layout."""
    if num_servers < 1:
        raise ValueError(f"num_servers={num_servers} must be >= 1")
    loads = [0] * num_servers
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(num_servers), key=lambda s: (loads[s], s))
        owner[index] = target
        loads[target] += sizes[index]
    return [[i for i in range(len(sizes)) if owner[i] == s] for s in range(num_servers)]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One contiguous CPU buffer (gloo point-to-point sends CPU tensors)."""
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``flat`` back into ``tensors`` (in place, any device)."""
    chunks = flat.split([t.numel() for t in tensors])
    with torch.no_grad():
        for tensor, chunk in zip(tensors, chunks):
            tensor.copy_(chunk.view_as(tensor))


def bind_flat(params: Sequence[torch.nn.Parameter], out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Make CPU ``params`` views of one flat buffer holding their values (``out`` when given,
    e.g. shared memory), and return it: a receive into it updates the parameters, a send of
    it sends them, with no copy (3.2 MB per pull in bench/ps_straggler.py). None (nothing
    changed) for parameters off the CPU: gloo sends CPU tensors, those go through a copy."""
    if not params or any(p.device.type != "cpu" for p in params):
        return None
    flat = flatten(params).to(params[0].dtype)
    if out is not None:
        flat = out.copy_(flat)
    with torch.no_grad():
        for param, chunk in zip(params, flat.split([p.numel() for p in params])):
            param.data = chunk.view_as(param)
    return flat


def bind_grads(params: Sequence[torch.nn.Parameter], out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Gradients as views of one zeroed flat buffer (``out`` when given; backward accumulates
    into them in place while they exist), or None for parameters off the CPU."""
    if not params or any(p.device.type != "cpu" for p in params):
        return None
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype) if out is None else out.zero_()
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        param.grad = chunk.view_as(param)
    return flat


def flat_grads(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """Gradients as one buffer; a parameter that got no gradient contributes zeros."""
    return flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
