"""``checkpoint.async=true``: the loop blocks only while the state is staged (copied to host
memory); writing, hashing and the atomic commit run on a background thread.

The thread's collectives (DCP's save plan, the hash exchange, the commit barriers) use a gloo
process group of their own: collectives from two threads on one group would interleave in a
different order on different ranks. One save is in flight at a time: the next ``submit`` (and
the end of training) waits for the previous commit. A kill during the background write
leaves the ``.tmp-`` directory, never renamed, and the previous checkpoint stays the newest.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class BackgroundSaver:
    """Stages on the caller's thread, commits on one background thread. Every rank of the
    job creates it at the same point (``new_group`` is collective)."""

    def __init__(self, ranks: list[int] | None = None):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.group = dist.new_group(ranks=ranks, backend="gloo") if dist.is_initialized() else None
        cuda = torch.cuda.is_available()
        # synchronous staging: when submit returns, the copy is complete and training may
        # change the parameters; pinned memory makes the device-to-host copy fast on GPUs.
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=cuda))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disttrain-ckpt")
        self.pending: Future | None = None

    def submit(self, state: dict[str, Any], commit: Callable[[dict[str, Any], Any], None]) -> None:
        staged = self.stager.stage(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.pending = self.executor.submit(commit, staged, self.group)

    def busy(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()  # re-raises the background error on the training thread

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.executor.shutdown(wait=True)
            self.stager.close()
