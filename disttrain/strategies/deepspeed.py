"""ZeRO data parallelism through DeepSpeed's engine (``strategy=deepspeed``).

The engine owns the whole step: ``engine.backward`` scales each micro-batch's loss by 1/k and
``engine.step`` updates (and steps the scheduler) only at the accumulation boundary, so the loop's
k micro-batches per step map one to one onto DeepSpeed's ``gradient_accumulation_steps``.

Checkpoints go through DeepSpeed's own ``save_checkpoint``/``load_checkpoint`` (partitioned
optimizer and, at stage 3, parameter shards) via the contract's optional native-checkpoint
capability; disttrain's Checkpointer still gives atomic commit, manifest and ``latest``, and
``load_model_state`` rebuilds the full state dict with DeepSpeed's zero_to_fp32.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from disttrain.strategies import precision
from disttrain.strategies import deepspeed_config
from disttrain.strategies.base import Batch, LossFn, SelfStepping, SetupContext, StepStats
from disttrain.strategies.capabilities import Capabilities
from disttrain.strategies.deepspeed_init import build_partitioned

log = logging.getLogger("disttrain")
INSTALL_HINT = "strategy=deepspeed needs DeepSpeed, which is not installed: pip install -e '.[deepspeed]'"
TAG = "deepspeed"  # one DeepSpeed tag per disttrain step directory
NATIVE = "native.json"


def require_deepspeed():
    """The deepspeed module, or ImportError with the one-line install hint."""
    try:
        import deepspeed
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return deepspeed


def _skip_inference_comm_op(deepspeed) -> None:
    """On the CPU accelerator DeepSpeed compiles a shared-memory all-reduce op (~45 s) when it
    builds its communication backend; only inference all-reduce uses it, training goes through
    the torch (gloo) process group. Marking it incompatible skips the compile."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _plain(config: Any) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config or {})


class DeepSpeed(SelfStepping):
    """DeepSpeed engine with ZeRO stage 0-3 and optional optimizer offload to CPU. It owns
    its step; precision (bf16/fp16 sections) and clipping (``gradient_clipping``) come from
    ``trainer.precision`` and ``trainer.grad_clip`` like every other strategy's."""

    capabilities = Capabilities(
        compile=False,
        why={"compile": "DeepSpeed's engine gathers ZeRO-3 partitions in hooks around each block and has its own "
                        "engine.compile(); neither is wired to disttrain or tested with it"})

    def __init__(self, zero_stage: int = 2, offload_optimizer: str = "none", config: Any = None):
        self.zero_stage, self.offload_optimizer = int(zero_stage), str(offload_optimizer)
        self.extra = _plain(config)

    @classmethod
    def validate(cls, cfg: DictConfig, world_size: int) -> None:
        try:
            require_deepspeed()
        except ImportError as exc:
            raise ValueError(str(exc)) from None
        deepspeed_config.build(cfg, world_size, cfg.strategy.get("zero_stage", 2),
                               str(cfg.strategy.get("offload_optimizer", "none")), _plain(cfg.strategy.get("config")))

    def setup(self, ctx: SetupContext) -> None:
        deepspeed = require_deepspeed()
        _skip_inference_comm_op(deepspeed)
        # DeepSpeed calls torch's older collective names once per step: one FutureWarning each time.
        warnings.filterwarnings("ignore", r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)",
                                FutureWarning)
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        self.world = ctx.world
        config = deepspeed_config.build(ctx.cfg, ctx.world.world_size, self.zero_stage, self.offload_optimizer,
                                        self.extra, pin_memory=ctx.device.type == "cuda")
        if self.zero_stage == 3:  # partitioned while it is built: never whole on a rank
            module = ctx.apply_memory(build_partitioned(ctx.model, deepspeed, config, ctx.world.rank))
        else:  # stages 0-2 keep a full parameter copy per rank anyway
            module = ctx.apply_memory(ctx.model.full(ctx.device))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=ctx.build_optimizer(module.parameters()), lr_scheduler=ctx.build_scheduler,
            config=config)
        self.model = self.engine
        mode = precision.configured(ctx.cfg)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepStats:
        k = len(micro_batches)
        if k != self.engine.gradient_accumulation_steps():
            raise RuntimeError(f"got {k} micro-batches, DeepSpeed expects {self.engine.gradient_accumulation_steps()}")
        total = torch.zeros((), device=micro_batches[0][0].device)
        for inputs, targets in micro_batches:
            if self.input_dtype is not None and inputs.is_floating_point():
                inputs = inputs.to(self.input_dtype)  # the engine holds the model in bf16/fp16
            loss = loss_fn(self.engine(inputs).float(), targets)
            self.engine.backward(loss)  # divides by k itself
            self.engine.step()  # a no-op until the accumulation boundary
            total += loss.detach().float() / k
        return StepStats(loss=total, samples=sum(len(b[0]) for b in micro_batches))

    @torch.no_grad()
    def eval_outputs(self, inputs, precision):
        """Every rank runs the engine's forward (ZeRO-3 gathers parameters collectively)."""
        if self.input_dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(self.input_dtype)
        return self.engine(inputs).float()

    # Checkpoints: DeepSpeed's own format (the native-checkpoint view of the contract).
    def native_checkpoint(self):
        return self

    def save_checkpoint(self, directory: Path) -> None:
        """Collective: every rank writes its shards into ``directory``."""
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        if self.world.rank == 0:
            meta = {"format": "deepspeed", "tag": TAG, "zero_stage": self.zero_stage,
                    "full_model_state": "disttrain.strategies.deepspeed:full_model_state"}
            (Path(directory) / NATIVE).write_text(json.dumps(meta, indent=1))

    def load_checkpoint(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {directory}/{TAG}")

    def close(self) -> None:
        self.engine.destroy()


def full_model_state(directory: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed step directory, in one process."""
    directory = Path(directory)
    meta = json.loads((directory / NATIVE).read_text())
    if meta["zero_stage"] == 0:  # nothing partitioned: rank 0's model file holds every weight
        states = torch.load(directory / meta["tag"] / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=meta["tag"])
