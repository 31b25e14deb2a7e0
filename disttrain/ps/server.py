"""A parameter server for one shard: receives pushes and pull requests from every
worker, applies the optimizer, answers pulls when the staleness gate allows, and counts the
run's progress (a loop step of a server = one step's worth of applied gradients). Under
s >= 1 an optimizer step is the mean of the gradients received since the last one, closed
when every live worker has sent one (``disttrain.ps.rounds``); a pull for weights the worker
already holds is answered without them.

Receiving runs on one thread per worker (a blocking receive from that worker, so a
dead worker shows up as an error on exactly its thread); all state changes happen on
the calling thread, inside ``serve_step``/``finish``, so no locks are needed.
"""
from __future__ import annotations

import collections
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
from disttrain.ps.server_settings import ServerSettings, StepSummary, clip_coef as _clip_coef
from disttrain.ps.stats import ServerStats
from disttrain.ps.rounds import RoundPolicy
from disttrain.ps.update import PendingUpdate

log = logging.getLogger("disttrain")


class ShardServer:
    """Owns ``params`` (its shard) and the optimizer over them; see the module docstring."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 group: Any, settings: ServerSettings, stats: ServerStats,
                 shared: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """``shared``: worker -> its (parameter, gradient) buffers in shared memory (same host,
        ``disttrain.ps.shm``): its pushes carry no payload, its pulls are written there."""
        self.params, self.optimizer, self.group = list(params), optimizer, group
        self.shared = shared or {}
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
        self.pending = PendingUpdate()  # s >= 1: the step being formed (disttrain.ps.update)
        self.rounds = RoundPolicy(settings.num_workers)  # s >= 1: when it closes (disttrain.ps.rounds)
        self.wake: float | None = None  # look at the step again then (a gradient it waits for)
        self.pull_deadlines: dict[int, float] = {}  # pulls waiting for the step to close
        self.sent_version = [-1] * settings.num_workers  # the version each worker holds
        self.snapshot: tuple[int, torch.Tensor] | None = None  # (version, flat params) being sent
        self.flat = protocol.bind_flat(self.params)  # the shard's storage: sent as is, no copy
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
                if header.kind == protocol.PUSH and worker in self.shared:
                    # read in place: the worker reuses it only after its next reply, sent once
                    # this push is consumed (or copied: a push deferred by a cut)
                    grad = self.shared[worker][1]
                elif header.kind == protocol.PUSH:
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
        ``step * num_workers`` gradients received (a step is the same amount of data as a DDP
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
        # received, not applied: every server receives the same pushes, but when a step closes
        # is timed per server (ps/rounds.py); servers that ended loop steps at different pushes
        # would wait for each other in the loop's collectives while a worker waits for both
        received = int(self.stats.totals["applied"].sum()) + len(self.pending)
        return received >= step * self.settings.num_workers

    def align(self) -> None:
        """Before a checkpoint with several asynchronous servers: every server applies exactly
        the same pushes of every worker (the most any server has applied), so the saved shards
        form one model and each worker's data position is one number. Pushes past the cut wait
        until the next step. With s=0 the rounds already line the servers up."""
        group = self.settings.servers_group
        if group is None or self.gate.synchronous:
            return
        applied = self.stats.totals["applied"].clone()
        for worker, _ in self.pending.parts:
            applied[worker] += 1
        dist.all_reduce(applied, op=dist.ReduceOp.MAX, group=group)
        self.cut = applied.tolist()
        while any(self._counted(w) < self.cut[w] for w in self.live):
            self._next_event()
        if self.pending:  # a partial step, scaled as a full one would be (lr per sample unchanged)
            self._apply_pending()

    def _counted(self, worker: int) -> int:
        """The worker's gradients in the weights or in the step being formed."""
        return self.applied(worker) + self.pending.count(worker)

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
            worker, header, payload = self.events.get(timeout=self._timeout())
        except queue.Empty:
            self._close_if_ready()
            self._grant_pulls()
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
            elif self.cut is not None and self._counted(worker) >= self.cut[worker]:
                # its pull may be answered before the cut is released: keep a copy
                self.deferred.append((worker, header, payload.clone() if worker in self.shared else payload))
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
            self.rounds.forget(worker)
        self._apply_round_if_complete()
        self._close_if_ready()
        self._grant_pulls()
        self._release_held()
        self._prune_sends()

    def _timeout(self) -> float:
        """Until the next timed decision (a step waiting for a due gradient, a pull waiting
        for the step), or a second."""
        times = [t for t in [self.wake, *self.pull_deadlines.values()] if t is not None]
        limit = 0.05 if self.hold.held else 1.0
        return min([limit] + [max(t - time.monotonic(), 1e-4) for t in times])

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
            # num_workers gradients, from whichever workers, make one step of their mean
            # (disttrain.ps.update). Clipping applies to each worker's whole gradient, by the
            # norm it measured.
            weight = 1.0 / (1 + staleness) if self.settings.staleness_lr == "inverse" else 1.0
            self.pending.add(worker, header, grad, weight * _clip_coef(self.settings.grad_clip, header.grad_norm))
            self.rounds.pushed(worker, time.monotonic())
            self._close_if_ready()

    def _close_if_ready(self) -> None:
        if self.gate.synchronous or not self.pending:
            return
        contributors = {w for w, _ in self.pending.parts}
        close, self.wake = self.rounds.may_close(len(self.pending), contributors, self.live, self.stats.version,
                                                 time.monotonic())
        if close:
            self._apply_pending()

    def _apply_pending(self) -> None:
        """The formed step; a gradient's staleness is counted now (the version cannot move
        while it waits: only this step moves it)."""
        # sum / num_workers: every gradient moves the weights by lr / num_workers, as each of
        # a DDP step's does (lr per sample unchanged), so a step holding a fast worker's extra
        # gradients is a larger step, and a partial one at a checkpoint cut (align) a smaller
        total, parts = self.pending.take(self.settings.num_workers)
        version = self.stats.version
        self.pull_deadlines.clear()
        self.wake = None
        self._apply(total, [(worker, version - header.pulled_version, header) for worker, header in parts])

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
        # (staleness_lr=inverse weighs each gradient by 1 / (1 + its staleness) as it joins
        # the step, _on_push; a round of s=0 is never stale)
        if self.flat is not None:  # sends of the weights read the storage the optimizer writes
            self._prune_sends(weights=True)
        self.optimizer.step()
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
            if self._waits_for_step(worker):
                waiting.append(worker)  # not a refusal: the others are not held behind it
                continue
            if not refused and self.gate.may_grant(worker, self.stats.version):
                self.gate.granted(worker, self.stats.version)
                self.hold.granted(worker)
                self.rounds.granted(worker, self.stats.version, time.monotonic())
                self.pull_deadlines.pop(worker, None)
                self._send_params(worker)
            else:
                refused = fair
                waiting.append(worker)
        self.pulls = waiting

    def _waits_for_step(self, worker: int) -> bool:
        """s >= 1: the worker holds these weights and the step closes before its next gradient
        could join it: better to wait for the new weights (disttrain.ps.rounds)."""
        if self.gate.synchronous or not self.pending or self.sent_version[worker] != self.stats.version:
            return False
        now = time.monotonic()
        deadline = self.pull_deadlines.get(worker)
        if deadline is None:
            missing = self.live - {w for w, _ in self.pending.parts}
            deadline = self.rounds.pull_deadline(worker, missing, now)
        if deadline is None or now >= deadline:
            self.pull_deadlines.pop(worker, None)
            return False
        self.pull_deadlines[worker] = deadline
        return True

    def _send_params(self, worker: int, status: int = protocol.GO) -> None:
        """The reply, and the parameters unless the worker holds this version already (a
        stop always carries them: the worker's posted receive must complete)."""
        current = self.stats.version
        payload = status != protocol.GO or self.sent_version[worker] != current
        reply = protocol.Reply(current, status, self.applied(worker), int(payload)).pack()
        dst = self.rank_of(worker)
        buffers = [reply]
        try:
            if payload and worker in self.shared:  # written before the reply that announces it
                self.shared[worker][0].copy_(self._flat_params())
            works = [dist.isend(reply, dst=dst, group=self.group, tag=protocol.TAG_VERSION)]
            if payload and worker not in self.shared:
                buffers.append(self._flat_params())
                works.append(dist.isend(buffers[-1], dst=dst, group=self.group, tag=protocol.TAG_PARAMS))
        except Exception as exc:
            self._lost(worker, exc)
            return
        self.sent_version[worker] = current
        self.sends.append((works, buffers, worker))

    def _flat_params(self) -> torch.Tensor:
        """The shard as one buffer: its own storage (``_apply`` lets the sends of it finish
        before the optimizer writes), or, off the CPU, one copy per version."""
        if self.flat is not None:
            return self.flat
        if self.snapshot is None or self.snapshot[0] != self.stats.version:
            self.snapshot = (self.stats.version, protocol.flatten(self.params).to(self.dtype))
        return self.snapshot[1]

    def _prune_sends(self, weights: bool = False) -> None:
        """Collect sends once each (a gloo send waited twice blocks): replies at once (32 bytes),
        weights when done or, with ``weights``, waiting. Gloo's ``is_completed`` is False until
        ``wait``: replies left to it piled up (pushes/s 55 -> 34 over 1500 steps)."""
        pending = []
        for works, buffers, worker in self.sends:
            if len(buffers) == 1 or weights or all(w.is_completed() for w in works):
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
        self.rounds.forget(worker)
        log.warning("ps server %d: worker %d (rank %d) is gone (%s); going on with %d worker(s)",
                    self.stats.server, worker, self.rank_of(worker), str(exc).splitlines()[0][:200],
                    len(self.live))

