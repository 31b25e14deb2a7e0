"""Typed schema of disttrain's primary config: one dataclass per section, the defaults
written once, here (conf/config.yaml only selects the groups).

Registered in Hydra's ConfigStore as ``disttrain_schema`` (the first entry of
conf/config.yaml's defaults list), so OmegaConf checks every override's type while Hydra
composes: ``dist.timeout_s=abc`` fails before any worker starts, naming the key. Ranges and
choices (``dist.backend`` in auto|gloo|nccl, ...) stay in ``disttrain.config.validate.validate``.
Consumers never require this schema: configs built by hand (``OmegaConf.create``) and
users' own primary configs still work, each consumer keeps its fallbacks.

The groups (strategy, model, data, optim, loss, scheduler) are ``Any``: they are
``_target_`` dicts for callables users bring, taking any keyword.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException, ValidationError
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

SCHEMA_NAME = "disttrain_schema"


@dataclass
class DistConfig:
    # >1 outside any launcher: start that many local workers (dev run)
    nproc_per_node: int = 1
    # auto | gloo | nccl (auto = nccl when CUDA is present, else gloo)
    backend: str = "auto"
    # collective timeout; a stalled rank fails the job after this
    timeout_s: float = 300.0
    # dev runs: restart the local workers this many times on failure
    max_restarts: int = 0
    # data-parallel, pipeline and tensor-parallel degrees: their product is the world
    # size; null = derive (the split axis of the strategy takes what the others leave)
    dp: Optional[int] = None
    pp: Optional[int] = None
    tp: Optional[int] = None
    # strategy=fsdp or strategy=pipeline strategy.data_parallel=shard (HSDP): dist.dp =
    # dp_replicate x dp_shard, replicate across groups of dp_shard ranks that each shard the
    # model; null = derive (both null: shard over all)
    dp_replicate: Optional[int] = None
    dp_shard: Optional[int] = None


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    # samples per optimizer step over all data-parallel ranks; set, it fixes the data stream
    # whatever the world size: grad_accum_steps = global_batch_size / (data.batch_size x dp ranks)
    # (disttrain.engine.global_batch). null = data.batch_size x grad_accum_steps x dp ranks.
    global_batch_size: Optional[int] = None
    seed: int = 0
    log_every: int = 10
    # auto (bar on a terminal, log lines otherwise) | bar | log
    progress: str = "auto"
    # 32 | bf16 | fp16 (autocast + fp32 master weights; fp16 adds a dynamic loss scaler).
    # Any: an int or a string; disttrain.strategies.precision validates it.
    precision: Any = 32
    # validate on the held-out split every N steps and at the end (0 = never)
    eval_every: int = 0
    # fail the run when the (all-reduced) loss becomes NaN/inf
    stop_on_nonfinite: bool = True
    # clip gradients by global norm; null = off
    grad_clip: Optional[float] = None
    # torch.compile each block (options in the compile section); disttrain.engine.compile checks
    # the platform (a C++ compiler for CPU inductor) before any worker starts
    compile: bool = False


@dataclass
class CheckpointConfig:
    # 0 disables periodic checkpoints (a final one is still written)
    every_steps: int = 50
    keep: int = 3  # newest k complete checkpoints are kept
    # auto (newest intact in this run dir) | never | a checkpoint path (used only while this run
    # dir has no checkpoint of its own, so a restart does not rewind to it)
    resume: str = "auto"
    # block the loop only while the state is copied to host memory; write, hash and commit in
    # the background (disttrain.checkpoint.background). Named async_save: `async` is a Python
    # keyword, and this schema is dataclasses.
    async_save: bool = False


@dataclass
class MemoryConfig:
    """Activation memory levers, for every strategy (README: Memory)."""

    # none | full (recompute each block) | every_n (groups of checkpoint_every blocks)
    activation_checkpointing: str = "none"
    checkpoint_every: int = 2
    # none | cpu (pinned host memory, GPU only) | disk (files in offload_dir)
    activation_offload: str = "none"
    # null = <run dir>/offload; emptied of a crashed run's files on start
    offload_dir: Optional[str] = None
    # smaller saved tensors stay where they are
    offload_min_bytes: int = 1024


@dataclass
class CompileConfig:
    """Options of torch.compile, used when trainer.compile=true (README: Compile)."""

    # inductor (generates C++ / Triton kernels) | aot_eager (traces, no compiler needed) | any
    # other name in torch._dynamo.list_backends()
    backend: str = "inductor"
    # null = inductor's default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs
    mode: Optional[str] = None
    # true: a graph break inside a block is an error instead of a silent eager fallback
    fullgraph: bool = False


@dataclass
class FaultConfig:
    """Preemption, hangs, restarts (README: Launchers and fault tolerance)."""

    # Slurm's warning before a time limit/preemption (sbatch --signal=USR1@90); a name or number
    requeue_signal: str = "USR1"
    # on it or SIGTERM: every rank ends its step, checkpoint, stop (false: die)
    save_on_signal: bool = True
    # auto: then `scontrol requeue` when inside a Slurm job | never
    requeue: str = "auto"
    # name a rank stuck > hang_timeout_s, dump all stacks to <run dir>/hang/
    watchdog: bool = True
    # null = 0.9 * dist.timeout_s (before the collective's own timeout)
    hang_timeout_s: Optional[float] = None
    # how often the ranks agree on a stop signal, in seconds of training (converted to a step
    # count from the slowest rank's step time, agreed in the same all-reduce); 0 = every step
    stop_poll_s: float = 1.0
    # tests only, first attempt only: kill_rank/kill_step, stall_rank/stall_step,
    # slow_save_step/save_delay_s, step_delay_s (add them with +fault.debug.KEY=...)
    debug: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepConfig:
    """Multirun trials (disttrain -m ...): what each returns to the sweeper."""

    # best | final validation loss (last training loss when eval_every=0)
    objective: str = "best"
    # minimize | maximize; must match hydra.sweeper.direction for Optuna
    direction: str = "minimize"
    # e.g. {_target_: optuna.pruners.MedianPruner, n_warmup_steps: 20}
    pruner: Any = None
    # set by disttrain for each trial: the sweep directory (where the pruner reads the others)
    dir: Optional[str] = None


@dataclass
class MetricsConfig:
    """Throughput, MFU, step-time split, memory, stragglers (README: Observability)."""

    # FLOP/s of one rank's device for MFU; null = matmul probe, cached in the run dir
    peak_flops: Optional[float] = None
    # dtype of that probe; auto = trainer.precision's (float32, bfloat16, float16)
    peak_dtype: str = "auto"
    # count model FLOPs once (torch's FlopCounterMode on a meta-device copy)
    count_flops: bool = True
    # every N steps compare the ranks' busy time per step (0 = off)
    straggler_every: int = 50
    # name a rank slower than this x the median
    straggler_ratio: float = 1.5
    # tests/demos: this rank sleeps debug_slow_s per step (a straggler on purpose)
    debug_slow_rank: int = -1
    debug_slow_s: float = 0.0
    # pipeline strategies: record every micro-batch's forward/backward of this step
    timeline_step: int = 5


@dataclass
class PlanConfig:
    """`disttrain plan ...`: memory and step time per strategy, before running."""

    # per rank, e.g. 80GB (or a number of bytes); null = this machine's (GPU memory, or RAM / ranks)
    device_memory: Optional[str] = None
    # per-rank link for collectives, e.g. 100Gbps or 12GB/s; null = measured here
    bandwidth: Optional[str] = None
    # per rank; null = metrics.peak_flops or the matmul probe here
    peak_flops: Optional[float] = None
    # model FLOP/s over peak; null = measured by a few real steps of the model here
    efficiency: Optional[float] = None
    micro_batches: int = 8  # pipeline micro-batches m
    # also run short real trainings here: predicted vs measured side by side
    validate: bool = False
    validate_nproc: int = 2  # ranks of those runs
    validate_steps: int = 30
    # launches of each timed run, each with its own probes and overhead run; the runs count at
    # their fastest, the model from the fastest probe, since a shared host's speed moves (plan.measure)
    validate_repeats: int = 2


def _data_defaults() -> Dict[str, Any]:
    # held-out validation share of the dataset (needed by trainer.eval_every); the rest of
    # the data group is free-form (the dataset callable's kwargs and the loader's settings)
    return {"val_fraction": 0.0}


@dataclass
class DisttrainConfig:
    """The whole primary config. The groups are chosen by conf/config.yaml's defaults list."""

    strategy: Any = None
    model: Any = None
    data: Any = field(default_factory=_data_defaults)
    optim: Any = None
    loss: Any = None
    scheduler: Any = None
    dist: DistConfig = field(default_factory=DistConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


SECTIONS = {"dist": DistConfig, "trainer": TrainerConfig, "checkpoint": CheckpointConfig, "memory": MemoryConfig,
            "compile": CompileConfig, "fault": FaultConfig, "sweep": SweepConfig, "metrics": MetricsConfig,
            "plan": PlanConfig}


def section(cfg: DictConfig | None, name: str):
    """The typed section ``name`` of ``cfg`` as its dataclass, with this schema's defaults for
    keys the config lacks (a config built by hand, or a user's own primary config). This is
    how components receive their own section, and why no consumer repeats a default."""
    from omegaconf import OmegaConf

    from disttrain.config.errors import ConfigError

    node = OmegaConf.select(cfg, name, default=None) if cfg is not None else None
    merged = OmegaConf.structured(SECTIONS[name])
    try:
        if node is not None:
            merged = OmegaConf.merge(merged, node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # a hand-built config with a wrong type or an unknown key
        keyed = isinstance(exc, ValidationError) and exc.full_key
        raise ConfigError(f"{name}.{explain(exc)}" if keyed else f"{name}: {explain(exc)}") from None


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent; disttrain.config.validate calls it on import,
    so every ``hydra.compose`` of conf/ finds it)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=DisttrainConfig)


#: what Hydra and OmegaConf raise while composing (before any job runs): a type the schema
#: refuses, an unknown key, a missing group option, an override that does not parse.
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)

_KINDS = {FloatNode: "a float", IntegerNode: "an integer", BooleanNode: "a bool",
          StringNode: "a string", DictConfig: "a mapping", ListConfig: "a list"}


def _first_line(text: object) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def explain(exc: BaseException) -> str:
    """One line for a composition error, naming the key and the type it needs, e.g.
    ``dist.timeout_s='abc' is not a float (Value 'abc' of type 'str' could not be converted to Float)``."""
    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    if isinstance(cause, ValidationError) and cause.full_key and type(cause.child_node) in _KINDS:
        return (f"{cause.full_key}={cause.value!r} is not {_KINDS[type(cause.child_node)]} "
                f"({_first_line(cause.msg)})")
    if isinstance(exc, MissingConfigException):  # the rest of its message is the search path
        options = f" (options: {', '.join(exc.options)})" if exc.options else ""
        return _first_line(exc) + options
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the override {exc.override!r}: {_first_line(exc)}"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(cause, OmegaConfBaseException) and cause is not exc:
        text += f" ({_first_line(cause)})"
    return text
