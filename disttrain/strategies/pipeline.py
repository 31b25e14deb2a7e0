"""Pipeline parallelism through torch.distributed.pipelining: the model (an nn.Sequential)
is cut into balanced stages, one (or ``stages_per_rank``) per pipeline rank, and a torch
schedule (GPipe, 1F1B, interleaved 1F1B, the zero-bubble ones: see pipeline_schedules)
runs the micro-batches. Data parallelism over ``dist.dp`` copies of the pipeline is
``strategy.data_parallel``: ``replicate`` averages their gradients once per optimizer step
(one flat all-reduce), ``shard`` applies FSDP2's ``fully_shard`` to each stage module over the
data-parallel ranks (HSDP with ``dist.dp_replicate x dist.dp_shard``), so a rank holds
1/dp_shard of its stage. With ``dist.tp > 1`` each stage module is also split by the tensor
plan (pp x fsdp x tp, 3-D): one DeviceMesh (dp_replicate, dp_shard, pp, tp); the plan runs on
``mesh["tp"]`` before ``fully_shard`` on the dp sub-mesh, torchtitan's order.

FSDP under a schedule: torch's PipelineStage keeps gradients unreduced and parameters
unsharded across the micro-batches' backward passes and reduce-scatters once at the end of
each schedule step (``perform_reduce_grad``). As torchtitan does under pipelining, stage
parameters are not resharded after each micro-batch's forward (``reshard_after_forward=False``):
a reshard would cost one all-gather per micro-batch per stage.

Gradient scaling: torch's schedules divide gradients by the micro-batch count by default
(``scale_grads=True``). We turn that off and divide each micro-batch loss by
``micro_batches * grad_accum_steps`` instead, so the step's gradient is exactly the
unsplit model's gradient of the mean loss over the replica's batch, with or without
accumulation, and the summed micro-batch losses are that batch's mean loss.

Models that are not an nn.Sequential (Hugging Face transformers models, anything whose blocks
live in an nn.ModuleList) are cut by module name (disttrain.parallel.fqn_split, one stage per
rank): each stage runs the model's own forward between its blocks and receives the step's
model inputs as keyword arguments (``model_input`` and, for dict inputs, attention mask /
position ids); tied weights held by two stages get their gradients summed between them
(disttrain.parallel.cut_pipeline).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.distributed.pipelining import PipelineStage

from disttrain import memory
from disttrain.config.schema import section
from disttrain.distributed import comm
from disttrain.parallel import cut_pipeline, fqn_split, mesh as mesh_mod, split, stage_forward, tensor
from disttrain.parallel.materialize import factory_from_config, scratch_copy
from disttrain.parallel.timing import StageClock, stage_report
from disttrain.strategies import pipeline_schedules as schedules
from disttrain.strategies import composed
from disttrain.strategies.base import Batch, LossFn, SetupContext, StepStats, Strategy
from disttrain.strategies.capabilities import Capabilities
from disttrain.strategies.fsdp import shard_model
from disttrain.strategies.tp_report import ReportsOncePerTPGroup

SCHEDULES = schedules.SCHEDULES
DATA_PARALLEL = ("replicate", "shard")


def _balance_value(balance: Any) -> Any:
    return list(balance) if isinstance(balance, (list, tuple, ListConfig)) else balance


def _plain(value: Any) -> Any:
    """A config list / dict as plain Python (None stays None)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


class Pipeline(ReportsOncePerTPGroup, Strategy):
    """dp x pp (x tp): each pipeline rank holds its stage(s); the last stage computes the loss."""

    def __init__(self, micro_batches: int = 4, schedule: str = "1f1b", stages_per_rank: int = 1,
                 balance: Any = "params", data_parallel: str = "replicate", split_points: Any = None,
                 tp_plan: Any = None):
        self.micro_batches, self.schedule_name = micro_batches, schedule
        self.stages_per_rank, self.balance = stages_per_rank, _balance_value(balance)
        self.data_parallel = data_parallel
        self.split_points, self.tp_plan = _plain(split_points) or None, _plain(tp_plan) or None
        self.cut_plan: fqn_split.CutPlan | None = None  # set for models cut by module name
        self.tied = None
        self.last_report: dict[str, float] = {}
        self._evaluating = False

    # ---------------------------------------------------------------- validation
    @classmethod
    def layout(cls, cfg: DictConfig, world_size: int, data_parallel: str) -> mesh_mod.Layout:
        """dp (replicate x shard) x pp x tp of this run; the stages take what dp and tp leave."""
        if data_parallel not in DATA_PARALLEL:
            raise ValueError(f"strategy.data_parallel={data_parallel!r} must be one of {', '.join(DATA_PARALLEL)}.")
        layout = mesh_mod.resolve_layout(cfg, world_size, split_axis="pp")
        if layout.tp > 1 and layout.pp == 1:
            raise ValueError(f"dist.tp={layout.tp} leaves a single pipeline stage (dist.pp=1): for tensor "
                             f"parallelism without stages use strategy=fsdp dist.tp={layout.tp} (or "
                             "strategy=model_parallel strategy.mode=tensor).")
        return layout

    @classmethod
    def capabilities_for(cls, cfg: DictConfig) -> Capabilities:
        parts = [cls.capabilities]
        tp = OmegaConf.select(cfg, "dist.tp", default=None)
        if tp not in (None, 1):
            parts.append(composed.because(composed.TENSOR_PARALLEL, f"dist.tp={tp}"))
        if _data_parallel(cfg) == "shard":
            parts.append(composed.because(composed.SHARDED, "strategy.data_parallel=shard (FSDP2)"))
        return composed.narrow(*parts)

    @classmethod
    def validate(cls, cfg: DictConfig, world_size: int) -> None:
        layout = cls.layout(cfg, world_size, _data_parallel(cfg))
        s = cfg.strategy
        check_pipeline_settings(s.micro_batches, s.schedule, s.stages_per_rank, layout.pp,
                                cfg.data.batch_size, "strategy.")
        if s.schedule in ("interleaved_zb", "zbv", "dualpipev") and cfg.trainer.get("compile", False):
            raise ValueError(f"strategy=pipeline strategy.schedule={s.schedule} does not support "
                             "trainer.compile=true: the zero-bubble schedules split each stage's backward in two, "
                             "which torch rejects for compiled stages; "
                             "use strategy.schedule=1f1b (or gpipe, interleaved_1f1b), or trainer.compile=false.")
        meta = factory_from_config(cfg).meta()
        if not isinstance(meta, nn.Sequential):
            cut_pipeline.validate(cfg, meta, layout.pp, layout.tp, s.schedule, _data_parallel(cfg), s.micro_batches)
            return
        if s.get("split_points", None):
            raise ValueError("strategy.split_points names the blocks of a model cut by module name; for an "
                             "nn.Sequential give layer counts per stage: strategy.balance=[3,5].")
        blocks = split.blocks_of(meta)
        stages = layout.pp * s.stages_per_rank
        if stages > len(blocks):
            raise ValueError(f"dist.pp={layout.pp} x strategy.stages_per_rank={s.stages_per_rank} = {stages} "
                             f"stages but the model has only {len(blocks)} layers: use fewer stages or a deeper model.")
        counts = check_balance(blocks, _balance_value(s.balance), layout.pp, stages,
                               lambda stage: schedules.rank_of_stage(s.schedule, stage, layout.pp))
        if layout.tp > 1:
            check_stage_tp(blocks, counts, layout.tp, _plain(s.get("tp_plan", None)))

    # ---------------------------------------------------------------- set-up
    def setup(self, ctx: SetupContext) -> None:
        self.world, self.device, self.batch_size = ctx.world, ctx.device, int(ctx.cfg.data.batch_size)
        self._build_mesh(ctx)
        num_stages = self.sizes.pp * self.stages_per_rank
        meta = ctx.model.meta()  # nothing allocated yet
        if isinstance(meta, nn.Sequential):
            modules = self._sequential_stages(ctx, meta, num_stages)
        else:
            modules = [self._cut_stage(ctx, meta, num_stages)]
            self.model = modules[0]
        self.precision = None
        for module in modules:
            _autocast_forward(module, self)
        self.stages = [PipelineStage(m, s, num_stages, ctx.device, group=self.pp_group)
                       for m, s in zip(modules, self.stage_ids)]
        self.clock = StageClock()
        for stage in self.stages:
            self.clock.watch(stage)
            if SCHEDULES[self.schedule_name].v_shape:
                schedules.allow_forward_only(stage)
        self.is_first, self.is_last = 0 in self.stage_ids, num_stages - 1 in self.stage_ids
        self.schedule = self._make_schedule()

    def _sequential_stages(self, ctx: SetupContext, meta: nn.Sequential, num_stages: int) -> list[nn.Module]:
        """This rank's stages of an nn.Sequential: contiguous layers under their own names."""
        blocks = split.blocks_of(meta)
        counts = split.stage_counts(blocks, num_stages, self.balance, lambda: self._sample(ctx), self._agree,
                                    materialize=lambda m: scratch_copy(m, ctx.device))
        split.check_ranks_hold_parameters(blocks, counts, self.sizes.pp, self._rank_of)
        # Looped placement (stage s on rank s % pp) or, for ZBV / DualPipeV, the V.
        self.stage_ids = schedules.stage_ids(self.schedule_name, self.pp_rank, self.sizes.pp, self.stages_per_rank)
        # Only this rank's stages get storage; each keeps the unsplit FQNs ("3.weight").
        modules = [self._parallelize(ctx, split.stage_module(blocks, counts, s)) for s in self.stage_ids]
        del blocks
        self.model = split.union(modules)
        self.counts = counts
        return modules

    def _cut_stage(self, ctx: SetupContext, meta: nn.Module, num_stages: int) -> nn.Module:
        """This rank's stage of a model cut by module name (one stage per rank): the meta
        model without the other stages' blocks and modules, then tp / memory / materialize,
        its forward entered and left at its blocks, tied copies made equal."""
        self.cut_plan = plan = fqn_split.plan_cut(meta, self._sample(ctx))
        self.counts = cut_pipeline.stage_counts(meta, plan, num_stages, self.balance, self.split_points)
        self.stage_ids = [self.pp_rank]
        start, stop = cut_pipeline.stage_bounds(self.counts, self.pp_rank)
        stage = fqn_split.cut(meta, plan, start, stop)
        del meta
        module = self._parallelize(ctx, stage, lambda m, in_place: ctx.model.materialize_part(m, ctx.device, in_place),
            apply_memory=lambda m: _cut_memory(m, plan, ctx))
        stage_forward.install(module, plan, self.pp_rank == 0, self.pp_rank == num_stages - 1,
                              cut_pipeline.select_key(ctx.cfg))
        self.tied = cut_pipeline.TiedCopies(plan, self.counts, module, self.mesh, self.pp_rank)
        self.tied.start_equal()
        return module

    def _build_mesh(self, ctx: SetupContext) -> None:
        """The one mesh: (dp, pp[, tp]) when replicas average, (dp_replicate, dp_shard, pp[, tp])
        when they shard; this rank's coordinates and the groups the step uses."""
        self.sizes = self.layout(ctx.cfg, ctx.world.world_size, self.data_parallel)
        sharded = self.data_parallel == "shard"
        tp = {"tp": self.sizes.tp} if self.sizes.tp > 1 else {}
        axes = self.sizes.axes("dp_shard", "pp") if sharded else {"dp": self.sizes.dp, "pp": self.sizes.pp, **tp}
        self.mesh = mesh_mod.init_mesh(ctx.device, axes)
        self.pp_group, self.pp_rank = self.mesh.get_group("pp"), self.mesh.get_local_rank("pp")
        self.tp_rank = self.mesh.get_local_rank("tp") if tp else 0
        self.dp_rank = mesh_mod.dp_coordinate(self.mesh) if sharded else self.mesh.get_local_rank("dp")
        self.dp_group = None if sharded else self.mesh.get_group("dp")  # FSDP reduces within the schedule

    def _parallelize(self, ctx: SetupContext, stage: torch.nn.Module, materialize=None,
                     apply_memory=None) -> torch.nn.Module:
        """One stage module (on meta): tensor plan, memory, then fully_shard or plain storage.
        ``materialize(module, in_place)`` and ``apply_memory`` replace the defaults (cut models)."""
        apply_memory = apply_memory or ctx.apply_memory
        if materialize is None:
            def materialize(module, in_place):
                return (ctx.model.materialize_in_place if in_place else ctx.model.materialize)(module, ctx.device)
        if self.sizes.tp > 1:
            stage = tensor.apply_tp(stage, self.mesh["tp"], self.tp_plan)
        if self.data_parallel == "replicate":
            return apply_memory(materialize(stage, False))
        stage = shard_model(apply_memory(stage), mesh_mod.dp_submesh(self.mesh), False, ctx.settings.precision)
        return materialize(stage, True)

    def _make_schedule(self):
        cls = schedules.schedule_class(self.schedule_name)
        stages = self.stages if SCHEDULES[self.schedule_name].multi else self.stages[0]
        return cls(stages, n_microbatches=self.micro_batches, loss_fn=self._micro_loss, scale_grads=False)

    def _rank_of(self, stage: int) -> int:
        return schedules.rank_of_stage(self.schedule_name, stage, self.sizes.pp)

    def _sample(self, ctx: SetupContext) -> torch.Tensor:
        dataset = ctx.build_dataset()
        size = max(1, ctx.cfg.data.batch_size // self.micro_batches)
        return torch.stack([torch.as_tensor(cut_pipeline.split_inputs(dataset[i][0])[0])
                            for i in range(size)]).to(ctx.device)

    def _agree(self, weights: list[float]) -> list[float]:
        """Average measured layer times over all ranks: every rank must choose the same split."""
        return comm.get().sum(weights)

    # ---------------------------------------------------------------- training
    def _micro_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._evaluating:  # outputs are all evaluation needs; the loss is computed by the caller
            return output.float().sum() * 0.0
        loss = self._loss_fn(output.float(), target) * self._loss_scale
        scaled = self.precision.scale(loss)
        self._unscaled[id(scaled)] = loss.detach()  # the schedule's list holds what we return
        return scaled

    def forward_backward(self, micro_batches: list[Batch], loss_fn: LossFn, precision) -> StepStats:
        self.precision, self._unscaled, losses = precision, {}, []
        self._loss_fn, self._loss_scale = loss_fn, 1.0 / (self.micro_batches * len(micro_batches))
        start = time.perf_counter()
        for inputs, targets in micro_batches:
            first, kwargs = self._stage_inputs(inputs)
            args = (first,) if self.is_first else ()
            step_losses: list[torch.Tensor] = []  # the schedule refills its list each step
            self.schedule.step(*args, target=targets if self.is_last else None,
                               losses=step_losses if self.is_last else None, return_outputs=False, **kwargs)
            losses += step_losses
        wall = time.perf_counter() - start
        if self.tied:  # before the data-parallel average: the copies' sum is the tensor's gradient
            self.tied.sum_gradients()
        if self.dp_group is not None:  # replicate; under shard, FSDP reduce-scattered in the schedule
            mesh_mod.average_gradients(list(self.model.parameters()), self.dp_group, self.sizes.dp)
        self.last_report = stage_report(self.clock.take(), wall, self.pp_group, self._theory())
        total = torch.stack([self._unscaled[id(l)] for l in losses]).sum() if self.is_last else None
        self._unscaled = {}
        samples = sum(len(self._stage_inputs(b[0])[0]) for b in micro_batches) if self.is_last else 0
        return self.once_per_tp_group(StepStats(loss=total, samples=samples, extra=dict(self.last_report)))

    def _stage_inputs(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(first stage's argument, keyword inputs of every stage): a cut model's stages all
        call the model's forward, so they all get the model input and its extra arguments."""
        first, extras = cut_pipeline.split_inputs(inputs)
        return (first, {"model_input": first, **extras}) if self.cut_plan is not None else (first, {})

    def _theory(self) -> float:
        return schedules.theory(self.schedule_name, self.schedule, self.sizes.pp, self.micro_batches,
                                self.stages_per_rank)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def eval_outputs(self, inputs: torch.Tensor, precision) -> torch.Tensor | None:
        """Forward only through every stage (torch's schedule.eval); outputs on the last.
        A short last batch is padded to the training batch size and cut back after."""
        self.precision, self._evaluating = precision, True
        size = len(inputs)
        padded = _pad_to(inputs, self.batch_size)
        try:
            first, kwargs = self._stage_inputs(padded)
            args = (first,) if self.is_first else ()
            target = torch.zeros(len(padded), device=self.device) if self.is_last else None
            outputs = self.schedule.eval(*args, target=target, losses=[] if self.is_last else None, **kwargs)
        finally:
            self._evaluating = False
        return outputs[:size] if self.is_last and self.tp_rank == 0 else None

    def eval_shard(self) -> tuple[int, int]:
        return self.data_shard()

    # ---------------------------------------------------------------- views
    def stage_group(self):
        return self.pp_group

    def pipeline_stages(self) -> list:
        return list(self.stages)

    def stage_clock(self) -> StageClock:
        return self.clock

    @classmethod
    def data_parallel_degree(cls, cfg: DictConfig, world_size: int) -> int:
        return cls.layout(cfg, world_size, _data_parallel(cfg)).dp

    def data_shard(self) -> tuple[int, int]:
        # All stages of one replica must see the same batch (the first feeds inputs, the
        # last reads targets), so the shard is the data-parallel coordinate only.
        return self.dp_rank, self.sizes.dp


def _data_parallel(cfg: DictConfig) -> str:
    return OmegaConf.select(cfg, "strategy.data_parallel", default="replicate")


def _cut_memory(stage: nn.Module, plan: fqn_split.CutPlan, ctx: SetupContext) -> nn.Module:
    """The memory section on a cut stage: each of its blocks recomputed in backward (the
    blocks live in the stage's ModuleList, not among its children), saved activations of the
    whole stage offloaded. trainer.compile and every_n grouping are refused in validation."""
    mem = section(ctx.cfg, "memory")
    view = nn.Module()
    view.layers = nn.ModuleList(stage.get_submodule(plan.blocks).children())  # the same block objects
    memory.apply_activation_checkpointing(view, mem.activation_checkpointing, mem.checkpoint_every)
    directory = memory.offload_directory(mem, ctx.run_dir, dist.get_rank()) if mem.activation_offload == "disk" else None
    return memory.apply_activation_offload(stage, mem.activation_offload, directory, mem.offload_min_bytes)


def _autocast_forward(module: torch.nn.Module, owner: "Pipeline") -> None:
    """Run a stage's forward under the step's autocast (the schedule calls the stage module
    itself, so the engine's autocast context cannot reach it); instance-level, names kept."""
    forward = module.forward

    def autocast_forward(*args, **kwargs):
        with owner.precision.autocast() if owner.precision is not None else contextlib.nullcontext():
            out = forward(*args, **kwargs)
        # A row-parallel last layer returns a view (of its DTensor's local tensor); the
        # zero-bubble schedules detach_() stage outputs in place, which a view refuses.
        return out.clone() if isinstance(out, torch.Tensor) and out._is_view() else out

    module.forward = autocast_forward


def _pad_to(batch: torch.Tensor, size: int) -> torch.Tensor:
    """The stages' buffers are sized by the training micro-batch: evaluation batches keep
    that shape (the last one padded with copies of its last sample, cut off afterwards)."""
    extra = size - len(batch)
    if extra <= 0:
        return batch
    return torch.cat([batch, batch[-1:].expand(extra, *batch.shape[1:])])


def check_pipeline_settings(micro_batches: Any, schedule: Any, stages_per_rank: Any, pp: int,
                            batch_size: int, prefix: str) -> None:
    """The schedule's own preconditions, named by config key, before any worker starts."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{prefix}schedule={schedule!r} must be one of {', '.join(SCHEDULES)}.")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"{prefix}micro_batches={micro_batches!r} must be an integer >= 1.")
    if not isinstance(stages_per_rank, int) or stages_per_rank < 1:
        raise ValueError(f"{prefix}stages_per_rank={stages_per_rank!r} must be an integer >= 1.")
    if batch_size % micro_batches:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {prefix}micro_batches="
                         f"{micro_batches}: choose a batch size that is a multiple of the micro-batch count.")
    schedules.check_schedule(micro_batches, schedule, stages_per_rank, pp, prefix)


def check_balance(blocks: list, balance: Any, ranks: int, stages: int, rank_of=None) -> list[int] | None:
    """strategy.balance is well formed and (where the split is known before training) gives
    every pipeline rank some parameters; the layer counts per stage, None until measured."""
    if isinstance(balance, str) and balance not in ("params", "time"):
        raise ValueError(f"strategy.balance={balance!r} must be 'params', 'time' or a list of layer counts.")
    if balance == "time":
        return None  # measured on the workers; setup checks the result
    counts = split.stage_counts(blocks, stages, balance)
    split.check_ranks_hold_parameters(blocks, counts, ranks, rank_of)
    return counts


def check_stage_tp(blocks: list, counts: list[int] | None, tp: int, tp_plan=None) -> None:
    """Each stage module gets its own tensor plan: dist.tp must divide what each stage splits.
    With balance=time the split is measured on the workers: the whole model is checked here."""
    parts = [split.stage_module(blocks, counts, s) for s in range(len(counts))] if counts else [
        split.stage_module(blocks, [len(blocks)], 0)]
    for index, part in enumerate(parts):
        try:
            tensor.check_divisible(part, tp, tp_plan)
        except ValueError as exc:
            where = f"pipeline stage {index} (layers {', '.join(n for n, _ in part.named_children())})"
            raise ValueError(f"{where}: {exc}") from None
