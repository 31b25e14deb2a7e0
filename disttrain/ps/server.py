"""A parameter server for one shard: receives pushes and pull requests from every
worker, applies the optimizer, answers pulls when the staleness gate allows, and counts the
run's progress (a loop step of a server = one step's worth of applied gradients).

Receiving runs on one thread per worker (a blocking receive from that worker, so a
dead worker shows up as an error on exactly its thread); all state changes happen on
the calling thread, inside ``serve_step``/``finish``, so no locks are needed.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from disttrain.ps import protocol
from disttrain.ps.gate import StalenessGate
from disttrain.ps.hold import StragglerHold
from disttrain.ps.stats import ServerStats

log = logging.getLogger("disttrain")


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    max_staleness: int | None
    staleness_lr: str      # "none" | "inverse": lr / (1 + staleness)
    num_servers: int
    num_workers: int
    grad_clip: float | None = None  # clip each applied gradient to this global norm
    servers_group: Any = None       # s=0 clipping / checkpoint cuts with several servers
    #: debug (tests): workers whose pushes are held back until no other worker can make
    #: progress (disttrain.ps.hold).
    hold_workers: frozenset = frozenset()


@dataclasses.dataclass
class StepSummary:
    """What the gradients applied during one loop step of a server amount to."""

    loss_sum: float = 0.0
    gradients: int = 0
    samples: int = 0


class ShardServer:
    """Owns ``params`` (its shard) and the optimizer over them; see the module docstring."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 group: Any, settings: ServerSettings, stats: ServerStats):
        self.params, self.optimizer, self.group = list(params), optimizer, group
        self.settings, self.stats = settings, stats
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype if self.params else torch.float32
        self.gate = StalenessGate(settings.max_staleness)
        self.live = set(range(settings.num_workers))
        self.lost: set[int] = set()
        self.pulls: collections.deque[int] = collections.deque()
        self.round: dict[int, tuple[torch.Tensor, int, protocol.Header]] = {}
        self.sends: list[tuple[list[Any], list[torch.Tensor], int]] = []
        self.events: queue.Queue = queue.Queue()
        self.hold = StragglerHold(settings.hold_workers)
        self.step = StepSummary()
        self.stopping = False          # the run is over: pulls are answered "stop"
        self.stop_asked = False        # a worker's process received a stop signal
        self.cut: list[int] | None = None  # a checkpoint cut in force (align)
        self.deferred: list[tuple[int, protocol.Header, torch.Tensor]] = []
        self.threads = [threading.Thread(target=self._receive, args=(w,), daemon=True,
                                         name=f"ps-recv-w{w}") for w in range(settings.num_workers)]
        for thread in self.threads:
            thread.start()

    def rank_of(self, worker: int) -> int:
        return self.settings.num_servers + worker

    def applied(self, worker: int) -> int:
        return int(self.stats.totals["applied"][worker])

    # ---- receiving (one thread per worker) -------------------------------------------
    def _receive(self, worker: int) -> None:
        src = self.rank_of(worker)
        try:
            while True:
                buf = torch.empty(protocol.HEADER_LEN, dtype=torch.float64)
                dist.recv(buf, src=src, group=self.group, tag=protocol.TAG_HEADER)
                header = protocol.Header.unpack(buf)
                grad = None
                if header.kind == protocol.PUSH:
                    grad = torch.empty(self.numel, dtype=self.dtype)
                    dist.recv(grad, src=src, group=self.group, tag=protocol.TAG_GRAD)
                self.events.put((worker, header, grad))
                if header.kind == protocol.BYE:
                    return
        except Exception as exc:  # the peer died or its connection broke
            self.events.put((worker, None, exc))

    # ---- serving (caller's thread) ---------------------------------------------------
    def serve_step(self, step: int) -> StepSummary:
        """Serve until the run's ``step``-th step is applied: with s=0 its round, otherwise
        ``step * num_workers`` gradients in all (a step is the same amount of data as a DDP
        step, whichever workers sent them, and stays so when a worker dies). Every server
        counts the same pushes (each worker sends each push to all of them), so they all end
        a step at the same push: a server waiting for the others at the loop's collectives
        never holds back a push they still need. Returns what this step applied."""
        self._release_cut()
        self.step = StepSummary()
        while self.live and not self._reached(step):
            self._next_event()
        return self.step

    def _reached(self, step: int) -> bool:
        if self.gate.synchronous:
            return self.stats.version >= step
        return int(self.stats.totals["applied"].sum()) >= step * self.settings.num_workers

    def align(self) -> None:
        """Before a checkpoint with several asynchronous servers: every server applies exactly
        the same pushes of every worker (the most any server has applied), so the saved shards
        form one model and each worker's data position is one number. Pushes past the cut wait
        until the next step. With s=0 the rounds already line the servers up."""
        group = self.settings.servers_group
        if group is None or self.gate.synchronous:
            return
        applied = self.stats.totals["applied"].clone()
        dist.all_reduce(applied, op=dist.ReduceOp.MAX, group=group)
        self.cut = applied.tolist()
        while any(self.applied(w) < self.cut[w] for w in self.live):
            self._next_event()

    def _release_cut(self) -> None:
        if self.cut is None:
            return
        self.cut = None
        deferred, self.deferred = self.deferred, []
        for worker, header, grad in deferred:
            self._on_push(worker, header, grad)
        self._grant_pulls()

    def finish(self) -> None:
        """The run is over: answer every pull with "stop", drop late pushes, serve until every
        worker has said goodbye (or died); then flush sends."""
        self.stopping = True
        self.hold.drop()
        self._grant_pulls()
        while self.live:
            self._next_event()
        for works, _, worker in self.sends:
            self._wait(works, worker)
        self.sends.clear()
        self.stats.close()

    def _next_event(self) -> None:
        try:
            worker, header, payload = self.events.get(timeout=0.05 if self.hold.held else 1.0)
        except queue.Empty:
            self._release_held()
            self._prune_sends()
            return
        self.hold.quiet_since = time.monotonic()
        if header is None:
            self._lost(worker, payload)
        elif header.kind == protocol.PUSH:
            self.stop_asked |= bool(header.stop)
            self.stats.push_received(worker)
            if self.stopping:
                pass  # computed after the last step: never applied
            elif self.cut is not None and self.applied(worker) >= self.cut[worker]:
                self.deferred.append((worker, header, payload))
            elif self.hold.wants(worker, self.gate.synchronous):
                self.hold.hold(worker, header, payload)
            else:
                self._on_push(worker, header, payload)
        elif header.kind == protocol.PULL:
            self.stop_asked |= bool(header.stop)
            self.pulls.append(worker)
        elif header.kind == protocol.BYE:
            self.live.discard(worker)
            self.gate.forget(worker)
        self._apply_round_if_complete()
        self._grant_pulls()
        self._release_held()
        self._prune_sends()

    def _release_held(self) -> None:
        if self.hold.ready(self.live, self.gate.outstanding, self.pulls):
            for worker, (header, grad) in self.hold.take():
                self._on_push(worker, header, grad)
            self._grant_pulls()

    def _on_push(self, worker: int, header: protocol.Header, grad: torch.Tensor) -> None:
        staleness = self.stats.version - header.pulled_version
        self.gate.pushed(worker)
        if self.gate.synchronous:
            self.round[worker] = (grad, staleness, header)
        else:
            # Each push is its own update; 1/num_workers keeps one round of N pushes as
            # large as one synchronous step, so optim.lr means the same for every bound.
            # Clipping applies to the worker's whole gradient, by the norm it measured.
            grad.mul_(_clip_coef(self.settings.grad_clip, header.grad_norm))
            self._apply(grad.div_(self.settings.num_workers), [(worker, staleness, header)])

    def _apply_round_if_complete(self) -> None:
        if not self.round or any(w not in self.round for w in self.live):
            return
        order = sorted(self.round)  # fixed summation order: bitwise-reproducible runs
        total = self.round[order[0]][0].clone()
        for worker in order[1:]:
            total += self.round[worker][0]
        total.div_(len(order))
        applied = [(w, self.round[w][1], self.round[w][2]) for w in order]
        if self.settings.grad_clip is not None:  # the averaged gradient, as DDP clips it
            squares = total.double().pow(2).sum().reshape(1)
            if self.settings.servers_group is not None:
                dist.all_reduce(squares, group=self.settings.servers_group)
            total.mul_(_clip_coef(self.settings.grad_clip, float(squares.sqrt())))
        self._apply(total, applied)
        self.round.clear()
        self.gate.round_applied()

    def _apply(self, grad: torch.Tensor, applied: list[tuple[int, int, protocol.Header]]) -> None:
        """One optimizer step from ``grad``, made of the gradients (worker, staleness, header)."""
        staleness = [value for _, value, _ in applied]
        for param, chunk in zip(self.params, grad.split([p.numel() for p in self.params])):
            param.grad = chunk.view_as(param).to(param.device)
        factor = 1.0 / (1 + max(staleness)) if self.settings.staleness_lr == "inverse" else 1.0
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, saved):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.record_update(staleness, self.settings.max_staleness, [w for w, _, _ in applied],
                                 [h.loss for _, _, h in applied])
        for _, _, header in applied:
            self.step.loss_sum += header.loss
            self.step.samples += header.samples
        self.step.gradients += len(applied)

    def _grant_pulls(self) -> None:
        """Grant waiting pulls in arrival order. Under a bound s >= 1, once the gate refuses one
        the later ones wait behind it: otherwise fast workers, re-pulling the moment they push,
        take every slot the bound leaves and starve a slow worker until they finish (seen: a
        straggler refused for 20 versions while the other two ran free). A refusal there always
        waits on computations in flight, so this cannot deadlock; with s = 0 a refusal waits on
        the round, whose missing pushes may sit behind it, so synchronous pulls never queue."""
        if self.stopping:
            while self.pulls:
                worker = self.pulls.popleft()
                if worker in self.live:
                    self._send_params(worker, protocol.STOP_PEERS_LOST if self.lost else protocol.STOP)
            return
        waiting: collections.deque[int] = collections.deque()
        refused = False
        fair = self.gate.max_staleness not in (0, None)
        while self.pulls:
            worker = self.pulls.popleft()
            if worker not in self.live:
                continue
            if worker in self.hold.held or not self.hold.admits(worker):  # debug straggler (ps/hold.py)
                waiting.append(worker)
                continue
            if not refused and self.gate.may_grant(worker, self.stats.version):
                self.gate.granted(worker, self.stats.version)
                self.hold.granted(worker)
                self._send_params(worker)
            else:
                refused = fair
                waiting.append(worker)
        self.pulls = waiting

    def _send_params(self, worker: int, status: int = protocol.GO) -> None:
        version = protocol.Reply(self.stats.version, status, self.applied(worker)).pack()
        flat = protocol.flatten(self.params).to(self.dtype)
        dst = self.rank_of(worker)
        try:
            works = [dist.isend(version, dst=dst, group=self.group, tag=protocol.TAG_VERSION),
                     dist.isend(flat, dst=dst, group=self.group, tag=protocol.TAG_PARAMS)]
        except Exception as exc:
            self._lost(worker, exc)
            return
        self.sends.append((works, [version, flat], worker))

    def _prune_sends(self) -> None:
        pending = []
        for works, buffers, worker in self.sends:
            if all(w.is_completed() for w in works):
                self._wait(works, worker)
            else:
                pending.append((works, buffers, worker))
        self.sends = pending

    def _wait(self, works: list[Any], worker: int) -> None:
        try:
            for work in works:
                work.wait()
        except Exception as exc:
            self._lost(worker, exc)

    def _lost(self, worker: int, exc: BaseException) -> None:
        if worker not in self.live:
            return
        self.live.discard(worker)
        self.lost.add(worker)
        self.gate.forget(worker)
        log.warning("ps server %d: worker %d (rank %d) is gone (%s); going on with %d worker(s)",
                    self.stats.server, worker, self.rank_of(worker), str(exc).splitlines()[0][:200],
                    len(self.live))


def _clip_coef(max_norm: float | None, norm: float) -> float:
    """torch's clip_grad_norm_ factor: max_norm / (norm + 1e-6), never above 1."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
