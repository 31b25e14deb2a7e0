"""Asynchronous parameter-server data parallelism with bounded staleness.

Ranks ``0..num_servers-1`` are servers: each holds a shard of the parameters (balanced by
size) and applies the run's optimizer and scheduler to it. The other ranks are workers:
they pull the parameters, compute gradients on their own data shard and push them,
without waiting for each other beyond the staleness bound (see ``disttrain.ps.gate``).

Progress lives on the servers, where an asynchronous job's state is:

* the servers run the loop (``disttrain.engine.loop``) with the loop's collectives (meter,
  logging, checkpoints, evaluation, stop polls) narrowed to the servers' own group; a server's
  step = serve pushes and pulls until one step's worth of gradients is applied (one round with
  ``max_staleness=0``, else ``num_workers`` gradients, from whichever workers sent them), so
  ``trainer.max_steps`` counts the same data as DDP's steps under every bound. Under s >= 1 an
  optimizer step is the mean of at least one fresh gradient of every live worker, a fast
  worker filling the wait with more gradients on the same weights (``disttrain.ps.rounds``:
  with momentum, stale gradients are what costs an asynchronous run its convergence);
* the workers run free (``disttrain.ps.free_worker``): pull, compute, push, until a server
  answers a pull with "stop". They never enter a job-wide collective, so a fast worker
  contributes more gradients than a slow one, and a dead worker is dropped by the servers
  while the others go on. A worker's data position is the number of its gradients the
  servers have applied, so checkpoints (written by the servers) hold it without the workers.

Traffic runs on its own gloo group (plain point-to-point, not torch.distributed.rpc: it is
in maintenance mode, needs a second rendezvous and its own thread pools, while gloo
isend/irecv on a sub-group reuses the job's store and never mixes with the loop's
collectives).
"""
from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from disttrain.ps import protocol
from disttrain.ps.server import ServerSettings, ShardServer
from disttrain.ps.stats import ServerStats
from disttrain.ps.worker import WorkerClient
from disttrain.strategies.capabilities import Capabilities
from disttrain.parallel.clip import global_grad_norm
from disttrain.strategies.precision import Precision
from disttrain.strategies.base import Batch, LossFn, SelfStepping, SetupContext, StepStats, accumulate

log = logging.getLogger("disttrain")


class ParamServer(SelfStepping):
    """Servers hold and update parameters; workers compute gradients asynchronously.

    Precision: workers run the forward under ``trainer.precision``'s autocast (bf16);
    parameters, pushed gradients and the servers' optimizer stay fp32. fp16 is refused: a
    loss scale per worker would make servers apply gradients of different scales.
    Clipping (``trainer.grad_clip``) happens on the servers, by the global norm: with
    ``max_staleness=0`` the round's averaged gradient (as DDP clips it), otherwise each
    applied gradient, by the norm of the whole gradient its worker measured and sent.
    """

    capabilities = Capabilities(
        precision=("32", "bf16"), compile=False,
        why={"precision": "each worker would keep its own fp16 loss scale, so servers would apply "
                          "gradients of different scales",
             "compile": "not tested with the servers' weight pushes into the workers' model (no compile test "
                        "covers this strategy yet)"})

    def __init__(self, num_servers: int = 1, max_staleness: int | None = 4, staleness_lr: str = "none",
                 debug_slow_workers: Any = (), debug_delay_s: float = 0.0, comm_timeout_s: float = 86400.0,
                 debug_hold_slow_pushes: bool = False, shared_memory: bool = True):
        self.num_servers, self.max_staleness = int(num_servers), max_staleness
        self.staleness_lr = str(staleness_lr)
        self.debug_slow_workers = {int(w) for w in (debug_slow_workers or ())}
        self.debug_delay_s, self.comm_timeout_s = float(debug_delay_s), float(comm_timeout_s)
        self.debug_hold = bool(debug_hold_slow_pushes)
        self.shared_memory = bool(shared_memory)
        self.server: ShardServer | None = None
        self.client: WorkerClient | None = None

    @classmethod
    def validate(cls, cfg: DictConfig, world_size: int) -> None:
        from disttrain.ps.settings import check

        check(cfg.strategy, world_size)

    @classmethod
    def expendable_ranks(cls, cfg: DictConfig, world_size: int) -> frozenset[int]:
        """The workers: the servers hold the whole state and go on with the others."""
        return frozenset(range(int(cfg.strategy.get("num_servers", 1)), world_size))

    # ---- roles -----------------------------------------------------------------------
    @property
    def is_server(self) -> bool:
        return self.world.rank < self.num_servers

    @property
    def num_workers(self) -> int:
        return self.world.world_size - self.num_servers

    @classmethod
    def data_parallel_degree(cls, cfg: DictConfig, world_size: int) -> None:
        return None  # workers step on their own: no step has a job-wide global batch

    def data_shard(self) -> tuple[int, int]:
        """Workers split the data among themselves; servers read none of it (``reads_data``;
        their sampler only keeps the loop's data position)."""
        if self.is_server:
            return 0, 1
        return self.world.rank - self.num_servers, self.num_workers

    def loop_group(self):
        """The servers run the loop among themselves (its collectives stay off the workers)."""
        return self.servers_loop_group if self.is_server else None

    def reads_data(self) -> bool:
        return not self.is_server

    def runs_free(self) -> bool:
        return not self.is_server

    def work(self, loader, sampler, loss_fn, device, grad_accum: int, tick) -> dict[str, Any]:
        """A worker's whole run (see disttrain.ps.free_worker)."""
        from disttrain.ps.free_worker import FreeWorker

        return FreeWorker(self, loader, sampler, loss_fn, device, grad_accum, tick).run()

    def peer_stop(self) -> bool:
        """A worker's process received a stop signal and told the servers."""
        return self.server is not None and self.server.stop_asked

    def clean_exit(self) -> bool:
        """False once a peer died: the teardown barrier would wait for it."""
        if self.server is not None:
            return not self.server.lost
        return self.client is None or not self.client.peers_lost

    # ---- setup -----------------------------------------------------------------------
    def setup(self, ctx: SetupContext) -> None:
        from disttrain.ps.settings import check_world

        self.world = ctx.world
        check_world(self.num_servers, ctx.world.world_size)
        self.model = ctx.apply_memory(ctx.model.full(ctx.device))
        self.precision = Precision(ctx.settings.precision, ctx.device)
        self.grad_clip = ctx.settings.grad_clip
        self.log_every = int(ctx.cfg.trainer.log_every)
        names = [name for name, _ in self.model.named_parameters()]
        params = list(self.model.parameters())
        plan = protocol.plan_shards([p.numel() for p in params], self.num_servers)
        self._check_plan(params, plan)  # on every rank, before any communication
        self.plan = plan
        # Every rank creates the group (a collective), servers and workers alike.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.comm_timeout_s))
        # The servers' own group: the loop's collectives, s=0 clipping, checkpoint cuts.
        self.servers_loop_group = dist.new_group(list(range(self.num_servers)), backend="gloo")
        self.servers_group = self.servers_loop_group if self.num_servers > 1 else None
        shared = self._map_shared(params, plan, ctx.device)
        if self.is_server:
            self.owned = [names[i] for i in plan[self.world.rank]]
            self._setup_server(ctx, [params[i] for i in plan[self.world.rank]], shared)
        else:
            self.client = WorkerClient([(s, [params[i] for i in plan[s]]) for s in range(self.num_servers)],
                                       self.group, shared)

    def _map_shared(self, params: list[torch.nn.Parameter], plan: list[list[int]],
                    device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Shared-memory buffers with the peers on this host (disttrain.ps.shm), keyed by the
        peer: server rank on a worker, worker index on a server. Collective (every rank)."""
        from disttrain.ps import shm

        rank = self.world.rank
        # at most every worker's two buffers of the whole model on this host
        needed = 2 * self.num_workers * sum(p.numel() * p.element_size() for p in params)
        token, pairs = shm.shared_pairs(self.group, rank, self.num_servers,
                                        self.shared_memory and device.type == "cpu", needed)
        if self.shared_memory and device.type == "cpu" and not pairs and rank == 0:
            log.info("ps: no shared memory between workers and servers (other hosts, or %s has less than "
                     "%.0f MB free: docker run --shm-size or --ipc=host): they exchange over TCP",
                     shm.SHM_DIR, needed / 2**20)
        mine = sorted((s, w) for s, w in pairs if rank in (s, w))
        shared = {}
        if not self.is_server:  # workers create the files, servers map them after the barrier
            for server, _ in mine:
                numel = sum(params[i].numel() for i in plan[server])
                shared[server] = shm.open_buffers(token, server, rank, numel, params[0].dtype, create=True)
        dist.barrier(group=self.group)
        if self.is_server:
            numel = sum(params[i].numel() for i in plan[rank])
            for _, worker in mine:
                shared[worker - self.num_servers] = shm.open_buffers(token, rank, worker, numel, params[0].dtype,
                                                                     create=False)
        dist.barrier(group=self.group)
        for server, worker in mine:
            if worker == rank:
                shm.unlink(token, server, worker)
        if pairs and rank == 0:
            log.info("ps: %d of %d worker/server pairs exchange through shared memory (same host; "
                     "%s/disttrain-ps-%s-*, unlinked once mapped)", len(pairs), self.num_servers * self.num_workers,
                     shm.SHM_DIR, token)
        return shared

    def _check_plan(self, params: list[torch.nn.Parameter], plan: list[list[int]]) -> None:
        if len({p.dtype for p in params}) > 1:
            raise ValueError("strategy=param_server sends each shard as one flat buffer and needs one "
                             f"parameter dtype; the model has {sorted({str(p.dtype) for p in params})}.")
        if any(not shard for shard in plan):
            raise ValueError(f"strategy.num_servers={self.num_servers} exceeds the model's {len(params)} "
                             "parameter tensors (a server would hold nothing): lower strategy.num_servers.")

    def _setup_server(self, ctx: SetupContext, shard: list[torch.nn.Parameter],
                      shared: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, param in self.model.named_parameters():
            if name not in self.owned:
                param.requires_grad_(False)  # not ours: never stepped, never saved here
        self.optimizer = ctx.build_optimizer(shard)
        self.params = list(self.model.parameters())
        self.scheduler = ctx.build_scheduler(self.optimizer)
        tb_dir = ctx.run_dir / "tensorboard" / f"ps_server{self.world.rank}"
        self.stats = ServerStats(self.num_workers, self.world.rank, tb_dir)
        held = frozenset(self.debug_slow_workers) if self.debug_hold else frozenset()
        settings = ServerSettings(self.max_staleness, self.staleness_lr, self.num_servers, self.num_workers,
                                  hold_workers=held, grad_clip=self.grad_clip, servers_group=self.servers_group)
        self.server = ShardServer(shard, self.optimizer, self.group, settings, self.stats, shared)
        log.info("ps server %d: %d tensors, %d parameters; %d workers; max_staleness=%s staleness_lr=%s",
                 self.world.rank, len(shard), sum(p.numel() for p in shard), self.num_workers,
                 self.max_staleness, self.staleness_lr)

    # ---- one step (servers; workers run free) ---------------------------------------
    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        if not self.is_server:
            raise TypeError("param_server workers run free (ParamServer.work), not the loop")
        step = int(self.stats.totals["steps"]) + 1
        applied = self.server.serve_step(step)
        self.scheduler.step()
        self.stats.totals["steps"] += 1
        if step % self.log_every == 0:
            self.stats.log_interval(step)
        reports = self.world.rank == 0 and applied.gradients > 0  # one server speaks for the job
        loss = torch.tensor(applied.loss_sum / max(applied.gradients, 1)) if reports else None
        return StepStats(loss=loss, samples=applied.samples if reports else 0, extra=self.stats.step_extra())

    def compute_gradients(self, micro_batches: list[Batch], loss_fn: LossFn) -> tuple[torch.Tensor, float]:
        """A worker's forward/backward on the parameters it pulled: (loss, global grad norm)."""
        self.client.zero_grads()  # the gradients are views of the buffers pushed (disttrain.ps.worker)
        loss = accumulate(self.model, micro_batches, loss_fn, autocast=self.precision.autocast)
        if self.world.rank - self.num_servers in self.debug_slow_workers:
            time.sleep(self.debug_delay_s)  # a straggler on purpose (tests, benchmarks)
        norm = float(global_grad_norm(list(self.model.parameters()))) if self.grad_clip is not None else 0.0
        return loss, norm

    # ---- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Servers: their shard under the original names (so load_model_state sees the
        whole model), optimizer, scheduler and counters. Workers hold no state."""
        if not self.is_server:
            return {}
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.server.align()  # several asynchronous servers save one cut of every worker's pushes
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        own = {name: model_sd[name] for name in self.owned}
        return {"model": own, f"ps_server{self.world.rank}": {
            "optim": optim_sd, "scheduler": self.scheduler.state_dict(), "counters": self.stats.totals}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.is_server:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        mine = state[f"ps_server{self.world.rank}"]
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=mine["optim"],
                       options=StateDictOptions(strict=False))
        self.scheduler.load_state_dict(mine["scheduler"])
        for key, value in mine["counters"].items():
            self.stats.totals[key].copy_(value)
        log.info("ps server %d resumed at version %d", self.world.rank, self.stats.version)

    # ---- evaluation: on the servers' current weights -------------------------------
    def prepare_eval(self) -> None:
        """Servers only (the loop's collectives are theirs): each receives every parameter
        from the server that owns it; every gradient of this step is applied."""
        if self.servers_group is None:
            return  # one server holds the whole model
        for index, param in enumerate(self.model.parameters()):
            owner = next(s for s, shard in enumerate(self.plan) if index in shard)
            dist.broadcast(param.data, src=owner, group=self.servers_group)

    def eval_shard(self) -> tuple[int, int] | None:
        return (self.world.rank, self.num_servers) if self.is_server else None

    def close(self) -> None:
        if self.server is not None:
            self.server.finish()
        elif self.client is not None:
            self.client.close()
