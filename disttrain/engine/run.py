"""One rank's whole life: process group up, build, restore, train, save, tear down."""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from disttrain.distributed import comm
from disttrain.config.schema import section
from disttrain.engine import builders, global_batch
from disttrain.distributed import process_group as dist_setup
from disttrain.distributed import env
from disttrain.engine.evaluate import split_from_config
from disttrain.resilience.guard import Guard
from disttrain.checkpoint import origin
from disttrain.checkpoint.background import BackgroundSaver
from disttrain.checkpoint.commit import Checkpointer, CheckpointError, step_dirs
from disttrain.observe.logs import setup_logging
from disttrain.engine.loop import LoopParts, LoopSettings, train
from disttrain.observe.memory import TrainingMemory
from disttrain.observe.metrics import Meter, TensorBoard
from disttrain.observe import build_observer
from disttrain.observe.progress import Progress
from disttrain.engine.rng import rng_state, seed_everything, set_rng_state
from disttrain.engine.build import build_engine
from disttrain.strategies.precision import Precision
from disttrain.engine.monitor import TrialMonitor

log = logging.getLogger("disttrain")


def _agree_on_run_dir(run_dir: Path) -> Path:
    """Rank 0's run directory wins (ranks of one job must share checkpoints and logs)."""
    return Path(comm.get().broadcast_object(str(run_dir), src=0))


def _restore(cfg: DictConfig, checkpointer: Checkpointer, engine, sampler, rank: int) -> int:
    resume = str(cfg.checkpoint.resume)
    if resume == "never" and checkpointer.rank == 0 and step_dirs(checkpointer.root):
        raise CheckpointError(f"{checkpointer.root} already holds checkpoints and checkpoint.resume=never "
                              "would overwrite them: use checkpoint.resume=auto or a new hydra.run.dir.")
    directory = checkpointer.choose(resume)
    if directory is None:
        return 0
    state = engine.state_dict()
    extra = checkpointer.load(directory, state, native=engine.native_checkpoint())
    if "weights" in extra:  # another engine's format: the model weights only
        engine.load_weights(extra.pop("weights"))
    else:
        engine.load_state_dict(state)
    sampler.load_state_dict(extra["sampler"])
    if extra.get("rng") is not None:
        set_rng_state(extra["rng"])
    else:  # written by another world size: the data order is the job's, the RNG streams start again
        seed_everything(cfg.trainer.seed + rank + 7919 * int(extra["step"]))
    log.info("resumed from %s (step %d)", directory, extra["step"])
    return int(extra["step"])


def run_rank(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train on this rank; returns a small summary (rank 0's final loss and step)."""
    world = env.detect()
    cfg = global_batch.resolve(cfg, world.world_size)  # trainer.global_batch_size -> grad_accum_steps
    device = dist_setup.init(world, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        run_dir = _agree_on_run_dir(run_dir)
        setup_logging(run_dir, world.rank)
        if world.restart_count:
            log.warning("restart %d of this job (launcher %s)", world.restart_count, world.launcher)
        if world.rank == 0:
            (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "resolved.yaml", resolve=True)
        summary, clean = _train_rank(cfg, world, device, run_dir)
    except BaseException:
        dist_setup.teardown(clean=False)
        raise
    dist_setup.teardown(clean=clean)
    return summary


def _train_rank(cfg: DictConfig, world: env.World, device, run_dir: Path) -> tuple[dict[str, Any], bool]:
    """(summary, whether every peer is still there for the teardown barrier)."""
    seed_everything(cfg.trainer.seed + world.rank)
    strategy, engine = build_engine(cfg, world, device, run_dir)
    dataset, val_set = split_from_config(cfg, builders.build_dataset(cfg))  # data.val_fraction held out
    loader, sampler = builders.build_loader(cfg, dataset, strategy.data_shard())
    if strategy.runs_free():  # a parameter-server worker: outside the loop and its collectives
        guard = Guard(section(cfg, "fault"), cfg.dist.timeout_s, world, run_dir, device)
        train_memory = TrainingMemory(device, strategy.model)
        try:
            summary = strategy.work(loader, sampler, builders.build_loss(cfg), device,
                                    cfg.trainer.grad_accum_steps, guard.tick_alone)
        finally:
            guard.finish()
            engine.close()
        _report_free_memory(run_dir, world.rank, train_memory.peak())
        return {**summary, "run_dir": str(run_dir)}, strategy.clean_exit()
    with comm.narrowed(strategy.loop_group()):  # the ranks that run the loop (param_server: servers)
        summary = _loop_rank(cfg, world, device, run_dir, strategy, engine, loader, sampler, val_set)
    return summary, strategy.clean_exit()


def _report_free_memory(run_dir: Path, rank: int, peak: int) -> None:
    """A free-running rank is outside the observer's per-rank table (its collectives are the
    loop's): its training memory goes to ``memory/rank<r>.json``, which ``plan.validate``
    reads with the logged ranks' figures."""
    out = run_dir / "memory"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"train_mem_b": int(peak)}))
    log.info("training memory of this rank: %.1f MB", peak / 1e6)


def _loop_rank(cfg: DictConfig, world: env.World, device, run_dir: Path, strategy, engine, loader, sampler,
               val_set) -> dict[str, Any]:
    background = BackgroundSaver() if section(cfg, "checkpoint").async_save else None
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep, background=background,
                                writer=origin.describe(cfg, strategy, world.world_size))
    checkpointer.clean_partial()
    start = _restore(cfg, checkpointer, engine, sampler, world.rank)

    def save(step: int) -> None:
        extra = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state()}
        start = time.perf_counter()  # the loop's whole wait: the previous save's commit included
        path = checkpointer.save(step, engine.state_dict(), extra, native=engine.native_checkpoint())
        if background is None:
            log.info("checkpoint saved: %s", path)
        else:
            log.info("checkpoint staged: %s (the loop blocked %.3f s; written and committed in the background)",
                     path, time.perf_counter() - start)

    meter = Meter(device)
    tensorboard = TensorBoard(run_dir, enabled=world.rank == 0)
    progress = Progress(cfg.trainer.max_steps, start, cfg.trainer.progress, enabled=world.rank == 0)
    settings = LoopSettings(cfg.trainer.max_steps, cfg.trainer.grad_accum_steps, cfg.trainer.log_every,
                            cfg.checkpoint.every_steps)
    batches = iter(loader) if strategy.reads_data() else itertools.repeat(None)
    parts = LoopParts(engine=engine, batches=batches, advance_data=sampler.advance,
                      loss_fn=builders.build_loss(cfg), save=save, meter=meter, tensorboard=tensorboard,
                      progress=progress, device=device)
    precision = builders.train_settings(cfg).precision
    monitor = TrialMonitor(section(cfg, "trainer"), section(cfg, "sweep"), cfg.data.batch_size, strategy, val_set,
                           parts.loss_fn, device, tensorboard, run_dir, world.rank, start,
                           precision=Precision(precision, device))
    parts.after_step = monitor.after_step  # validation, divergence stop, sweep pruning
    parts.observer = build_observer(section(cfg, "metrics"), precision, world, device, run_dir, strategy,
                                    tensorboard, builders.model_factory(cfg).meta, parts.loss_fn)  # MFU, comm, stragglers
    guard = Guard(section(cfg, "fault"), cfg.dist.timeout_s, world, run_dir, device,  # signals, hangs
                  checkpointer).wrap(parts, start)
    log.info("training %s on %d rank(s) (%s, %s) from step %d to %d; run dir %s", type(strategy).__name__,
             world.world_size, world.launcher, device, start, cfg.trainer.max_steps, run_dir)
    try:
        meter.reset()  # the first interval's throughput must not count the set-up
        last = train(settings, parts, start)
        checkpointer.wait()  # the last background save commits before the job reports done
    finally:
        if background is not None:
            background.close()
        guard.finish()
        progress.close()
        tensorboard.close()
        engine.close()
    if world.rank == 0:
        log.info("done at step %d. checkpoints: %s  tensorboard: %s", last, run_dir / "checkpoints",
                 run_dir / "tensorboard")
    return {"step": last, "run_dir": str(run_dir), **monitor.summary()}
