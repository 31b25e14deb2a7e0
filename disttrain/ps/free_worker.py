"""A parameter-server worker's whole run: pull, compute, push, until a server says stop.

It has no loop steps of its own and enters no collective: the servers count the run's
progress, log it and write the checkpoints (``disttrain.strategies.param_server``). So a fast
worker is never held back by a slow one beyond the staleness bound, and a worker that dies
takes nothing with it but its own gradients in flight.

Data order: the worker's batches are its shard of the data (``ResumableBatchSampler``), in
order. Its position is the number of its gradients the servers have applied, which the first
reply carries; a resumed run therefore continues each worker's stream exactly after the last
gradient the checkpoint holds (a gradient computed but not applied is computed again).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from disttrain.data.loader import to_device

log = logging.getLogger("disttrain")


class FreeWorker:
    """``tick(pushes) -> bool``: debug faults of this point, and whether this process received a
    stop signal (the servers are told with the next messages and stop the whole job)."""

    def __init__(self, strategy, loader, sampler, loss_fn, device, grad_accum: int,
                 tick: Callable[[int], bool]):
        self.strategy, self.client = strategy, strategy.client
        self.loader, self.sampler, self.loss_fn, self.device = loader, sampler, loss_fn, device
        self.grad_accum, self.tick = int(grad_accum), tick

    def run(self) -> dict[str, Any]:
        self.client.request_params()
        reply = self.client.wait_params()
        pushes = 0
        if reply is not None:
            self.sampler.advance(reply.applied * self.grad_accum)  # continue after what is applied
            log.info("ps worker %d: starting at version %d, after %d applied gradient(s)",
                     self.strategy.world.rank - self.strategy.num_servers, reply.version, reply.applied)
            pushes = self._work(iter(self.loader))
        self.client.close()
        return {"step": pushes}

    def _work(self, batches) -> int:
        """Push gradients until a reply says stop; returns how many were pushed."""
        pushes, stop = 0, False
        while True:
            micro = [to_device(next(batches), self.device) for _ in range(self.grad_accum)]
            if pushes and self.client.wait_params() is None:  # the pull posted with the last push
                return pushes
            loss, norm = self.strategy.compute_gradients(micro, self.loss_fn)
            pushes += 1
            stop = self.tick(pushes) or stop
            self.client.push(float(loss), norm, sum(len(b[0]) for b in micro), stop=stop)
            self.client.request_params(stop=stop)  # answered while the next batch loads
