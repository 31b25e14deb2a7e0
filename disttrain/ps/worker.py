"""A worker's side of the protocol: pull parameters from every server, push gradients.

Pushes are non-blocking (``isend``), and the next pull is requested right behind the push:
the server applies the gradient and answers while the worker loads its next batch. (A
granted pull counts as a computation in flight for the staleness gate; that is safe because
workers run free and never park at a job-wide sync point while holding one.) The receive of
every shard is posted before the request goes out. The parameters of each server's shard
are views of the buffer that receives them and the gradients views of the buffer pushed
(CPU), so a pull or push copies nothing. A server sends the parameters only when
they changed since this worker's last pull; otherwise the posted receive waits for the next
reply that carries them (each server's parameter messages arrive in order, one per
"payload" reply). With a server on the same host the two buffers are shared memory
(``disttrain.ps.shm``): a push sends only its header and the server writes the parameters
straight into the buffer the model's parameters are views of.
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
    bound: bool = False  # params are views of ``flat``: a receive is the update, no copy
    grads: torch.Tensor | None = None  # the gradients' flat buffer (views), when bound
    pulled_version: int = -1
    shared: bool = False  # buffers in shared memory with this server: no payload on the wire
    flat_recv: Any = None  # the posted receive of the parameters (kept across "no payload" replies)


class WorkerClient:
    """Pull/push against every server; ``links`` pairs server ranks with their shards."""

    def __init__(self, shards: Sequence[tuple[int, list[torch.nn.Parameter]]], group: Any,
                 shared: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """``shared``: server rank -> (parameter, gradient) buffers in shared memory."""
        self.group = group
        self.closed = False
        self.peers_lost = False  # a server said some worker died (the teardown must not wait for it)
        self.links = []
        shared = shared or {}
        for rank, params in shards:
            out_params, out_grads = shared.get(rank, (None, None))
            flat = protocol.bind_flat(params, out=out_params)
            bound = flat is not None
            if not bound:
                flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype)
            self.links.append(_Link(rank, params, torch.zeros(protocol.REPLY_LEN, dtype=torch.int64), flat,
                                    bound, protocol.bind_grads(params, out=out_grads), shared=rank in shared))
        self.clock = 0
        self.receives: list[Any] = []
        self.sends: list[tuple[Any, list[torch.Tensor]]] = []

    def request_params(self, stop: bool = False) -> None:
        """Ask every server for its shard (answered when the staleness bound allows);
        ``stop``: this process got a stop signal, the servers should end the run."""
        self._post_receives()
        for link in self.links:
            self._send(link, protocol.Header(protocol.PULL, self.clock, stop=int(stop)))

    def wait_params(self) -> protocol.Reply | None:
        """Block until the requested shards arrive. None when a server says the run is over;
        else load them into the model and return the first server's reply (its ``applied``
        is this worker's position in its data stream: every server applies the same pushes)."""
        for work in self.receives:
            work.wait()
        self.receives = []
        replies = [protocol.Reply.unpack(link.version) for link in self.links]
        for link, reply in zip(self.links, replies):
            if reply.payload and not link.shared:
                link.flat_recv.wait()
                link.flat_recv = None
        if any(reply.status != protocol.GO for reply in replies):
            self.peers_lost = any(reply.status == protocol.STOP_PEERS_LOST for reply in replies)
            return None
        for link, reply in zip(self.links, replies):
            if reply.payload and not link.bound:
                protocol.unflatten_into(link.flat, link.params)
            link.pulled_version = reply.version
        return replies[0]

    def push(self, loss: float, grad_norm: float = 0.0, samples: int = 0, stop: bool = False) -> None:
        """Send this step's gradients to every server (returns at once)."""
        self._drain_sends()
        self.clock += 1
        for link in self.links:
            header = protocol.Header(protocol.PUSH, self.clock, link.pulled_version, loss, grad_norm, samples,
                                     int(stop))
            if link.shared:  # the server copies the gradient out of shared memory
                self._send(link, header)
            else:
                self._send(link, header, link.grads if link.grads is not None else protocol.flat_grads(link.params))

    def zero_grads(self) -> None:
        """Before a backward: zero the flat gradient buffers in place (once the last push of
        them has left), or drop the gradients where they are not bound."""
        self._drain_sends()
        for link in self.links:
            if link.grads is not None:
                link.grads.zero_()
            else:
                for param in link.params:
                    param.grad = None

    def close(self) -> None:
        """Collect a reply still in flight, then tell every server this worker is done (once:
        a server stops listening to a worker after its goodbye)."""
        if self.closed:
            return
        self.closed = True
        if self.receives:
            self.wait_params()
        for link in self.links:
            self._send(link, protocol.Header(protocol.BYE, self.clock))
        self._drain_sends()

    def _post_receives(self) -> None:
        for link in self.links:
            self.receives.append(dist.irecv(link.version, src=link.rank, group=self.group, tag=protocol.TAG_VERSION))
            if link.flat_recv is None and not link.shared:
                link.flat_recv = dist.irecv(link.flat, src=link.rank, group=self.group, tag=protocol.TAG_PARAMS)

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
