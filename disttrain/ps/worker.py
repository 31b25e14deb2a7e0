"""A worker's side of the protocol: pull parameters from every server, push gradients.

Pushes are non-blocking (``isend``): the gradient upload and the server's update run
while the loop logs and loads the next batch. The pull is sent when the worker is ready
to compute (start of its step), not prefetched with the push: a granted pull counts as
a computation in flight for the staleness gate, and a worker parked at a loop-level sync
point (logging, checkpoint) while holding one would block the slow workers it waits
for (a deadlock). The receive of every shard is posted before the request goes out.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.distributed as dist

from disttrain.ps import protocol


@dataclasses.dataclass
class _Link:
    """This worker's view of one server: its rank, the parameters it owns, buffers."""

    rank: int
    params: list[torch.nn.Parameter]
    version: torch.Tensor
    flat: torch.Tensor
    pulled_version: int = -1


class WorkerClient:
    """Pull/push against every server; ``links`` pairs server ranks with their shards."""

    def __init__(self, shards: Sequence[tuple[int, list[torch.nn.Parameter]]], group: Any):
        self.group = group
        self.links = [_Link(rank, params, torch.zeros(1, dtype=torch.int64),
                            torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype))
                      for rank, params in shards]
        self.clock = 0
        self.receives: list[Any] = []
        self.sends: list[tuple[Any, list[torch.Tensor]]] = []

    def request_params(self) -> None:
        """Ask every server for its shard (answered when the staleness bound allows)."""
        self._post_receives()
        for link in self.links:
            self._send(link, protocol.Header(protocol.PULL, self.clock))

    def wait_params(self) -> list[int]:
        """Block until the requested shards arrive, load them into the model; return the
        version of each shard."""
        for work in self.receives:
            work.wait()
        self.receives = []
        for link in self.links:
            protocol.unflatten_into(link.flat, link.params)
            link.pulled_version = int(link.version)
        return [link.pulled_version for link in self.links]

    def push(self, loss: float, grad_norm: float = 0.0) -> None:
        """Send this step's gradients to every server (returns at once)."""
        self._drain_sends()
        self.clock += 1
        for link in self.links:
            header = protocol.Header(protocol.PUSH, self.clock, link.pulled_version, loss, grad_norm)
            self._send(link, header, protocol.flat_grads(link.params))

    def close(self) -> None:
        """Collect a reply still in flight, then tell every server this worker is done."""
        if self.receives:
            self.wait_params()
        for link in self.links:
            self._send(link, protocol.Header(protocol.BYE, self.clock))
        self._drain_sends()

    def _post_receives(self) -> None:
        for link in self.links:
            self.receives += [dist.irecv(link.version, src=link.rank, group=self.group, tag=protocol.TAG_VERSION),
                              dist.irecv(link.flat, src=link.rank, group=self.group, tag=protocol.TAG_PARAMS)]

    def _send(self, link: _Link, header: protocol.Header, payload: torch.Tensor | None = None) -> None:
        packed = header.pack()
        self.sends.append((dist.isend(packed, dst=link.rank, group=self.group, tag=protocol.TAG_HEADER), [packed]))
        if payload is not None:
            self.sends.append((dist.isend(payload, dst=link.rank, group=self.group, tag=protocol.TAG_GRAD),
                               [payload]))

    def _drain_sends(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []
