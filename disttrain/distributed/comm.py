"""The one owner of the small collectives disttrain itself issues (metrics, evaluation totals,
straggler and pipeline-stage figures, stop signals, pipeline balancing, run-dir and
checkpoint agreement, barriers), so that groups and devices are chosen in one place:

* a tensor goes to the device its group's backend carries: the rank's CUDA device for an
  NCCL group, the CPU for a gloo one (a CPU tensor in an NCCL collective is an error; a CUDA
  tensor in gloo is a copy nobody asked for);
* host-side control figures that must not wait on the GPU stream (the stop-signal flag)
  travel over one gloo ``host_group``, made once when the process group comes up.

The strategies' own data-parallel traffic (DDP buckets, pipeline p2p, DeepSpeed, DTensor) stays
with torch: this is only for what disttrain adds around it. ``process_group.init`` installs the
communicator of the job; ``get()`` returns it (a single-process one when no group is up).

``narrowed(group)`` makes a sub-group the job for a while: every figure, barrier, broadcast and
checkpoint collective then runs over those ranks only. The asynchronous parameter server runs
the loop on its servers this way, while its workers run free and never enter a collective.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist


class Communicator:
    """``group``: the ranks that make up the job for disttrain's collectives (None = the world);
    a collective called without a group runs over it."""

    def __init__(self, device: torch.device, host_group=None, group=None):
        self.device, self.host_group, self.group = torch.device(device), host_group, group

    # ------------------------------------------------------------- placement
    def _g(self, group):
        return self.group if group is None else group

    def active(self, group=None) -> bool:
        return dist.is_initialized() and dist.get_world_size(self._g(group)) > 1

    def device_for(self, group=None) -> torch.device:
        """Where a tensor for a collective over ``group`` must live."""
        if not dist.is_initialized():
            return self.device
        return torch.device("cpu") if dist.get_backend(self._g(group)) == "gloo" else self.device

    def _tensor(self, values: Sequence[float], group) -> torch.Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device_for(group))

    # ------------------------------------------------------------- figures
    def sum(self, values: Sequence[float], group=None) -> list[float]:
        """Element-wise sum over the ranks of ``group`` (every rank calls it)."""
        t = self._tensor(values, group)
        if self.active(group):
            dist.all_reduce(t, group=self._g(group))
        return t.tolist()

    def max(self, values: Sequence[float], group=None) -> list[float]:
        t = self._tensor(values, group)
        if self.active(group):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._g(group))
        return t.tolist()

    def gather(self, values: Sequence[float], group=None) -> list[list[float]]:
        """Every rank's ``values``, in rank order of ``group``."""
        mine = self._tensor(values, group)
        if not self.active(group):
            return [mine.tolist()]
        out = [torch.zeros_like(mine) for _ in range(dist.get_world_size(self._g(group)))]
        dist.all_gather(out, mine, group=self._g(group))
        return [t.tolist() for t in out]

    def sum_(self, tensor: torch.Tensor, group=None) -> torch.Tensor:
        """In-place sum of a tensor already on this rank's compute device (a running loss
        total that should not be synchronised before it is due); moved for gloo groups."""
        if not self.active(group):
            return tensor
        target = self.device_for(group)
        if tensor.device == target:
            dist.all_reduce(tensor, group=self._g(group))
            return tensor
        moved = tensor.to(target)
        dist.all_reduce(moved, group=self._g(group))
        return tensor.copy_(moved)

    def host_max(self, values: Sequence[float]) -> list[float]:
        """Element-wise max over all ranks on the CPU (host group): never waits on a GPU stream."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.active():
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return t.tolist()

    # ------------------------------------------------------------- objects
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank of the job (``src`` is a global rank)."""
        if not self.active():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order of the job's group (small objects only)."""
        if not self.active():
            return [obj]
        out: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.active():
            dist.barrier(group=self.group)


_CURRENT: list[Communicator] = []


def install(device: torch.device) -> Communicator:
    """Called by ``process_group.init`` once the default group is up (a collective on NCCL:
    every rank makes the gloo host group at the same point)."""
    host = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_backend() != "gloo" else None
    _CURRENT[:] = [Communicator(device, host)]
    return _CURRENT[0]


def uninstall() -> None:
    _CURRENT.clear()


@contextlib.contextmanager
def narrowed(group) -> Iterator[Communicator]:
    """Within the block, ``group`` is the job (None: no change). ``group`` must be a gloo group:
    it also carries the host-side flags."""
    if group is None:
        yield get()
        return
    outer = get()
    _CURRENT[:] = [Communicator(outer.device, host_group=group, group=group)]
    try:
        yield _CURRENT[0]
    finally:
        _CURRENT[:] = [outer]


def get() -> Communicator:
    """The job's communicator; a single-process one on the CPU when no group is up."""
    return _CURRENT[0] if _CURRENT else Communicator(torch.device("cpu"))
