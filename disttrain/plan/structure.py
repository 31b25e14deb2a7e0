"""A strategy's per-step overhead on this model's own structure, measured once per host.

The step-time model covers what grows with the batch (compute) and with the model's bytes
(collectives over measured curves, the update). What does neither is CPU time the strategy
spends per module, per parameter and per operator: FSDP's and ZeRO-3's hooks and gathers
bookkeeping, DTensor's dispatch of every operator of a tensor-parallel layer, the loop's own
calls. It depends on how many such modules and operators the model has, not on their width:
the tiny calibration model (``plan.host``) had 4 Linear layers and gpt_tiny under tensor
parallelism spends ~34 ms per step on it (measured here, 2 ranks: 44 ms at 2 samples
per rank against ddp's 10 ms), several times the tiny model's.

So each strategy is run for real on this model at the smallest batch its layout allows
(``twin_batch``: one sample per pipeline micro-batch), where compute is small; its measured
step minus what the model predicts for that same small step (compute, communication, update,
bubble) is the overhead added to the full-batch row: the row's step is the small run's plus
the modelled cost of the extra samples (``full_step_s``). That small step's compute is probed at
its own batch (``small_batch_machine``), not extrapolated from the full batch's efficiency: a
1024-wide MLP at 4 samples streams its weights far below its full-batch rate, and that
shortfall would otherwise count as overhead. Cached in plan_host.json per host, rank count,
strategy, model config, batch and launch, like the other host terms.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from disttrain.plan import host
from disttrain.plan.model import Machine, ModelFacts, Prediction

#: the overhead run: 40 steps logged every 5, the median of the 7 intervals after warm-up (the
#: same small pipeline run measured 24, 35 and 46 ms in three means of 8 steps, and a 2-rank
#: tensor-parallel one 24-37 ms as medians of 5 intervals of 4 steps, while 160-step runs of
#: it agree within 2%: a slow stretch carries straight into every prediction built on it)
TWIN_STEPS, TWIN_EVERY = 40, 5


def twin_batch(batch: int, micro_batches: int) -> int:
    """Samples per rank of the overhead run: one per pipeline micro-batch (so the pipeline
    row's batch stays divisible), never more than the run's."""
    return max(1, min(batch, micro_batches))


def measured_step(argv: list[str], strategy: str, extra: list[str], nproc: int, threads: int,
                  batch: int, launch: int = 0) -> tuple[float, str]:
    """(median step seconds of ``strategy`` on the run's model at ``batch`` samples per rank,
    where it comes from): the cache, or a real run of ``TWIN_STEPS`` steps now. Each of
    ``plan.validate``'s launches (``launch``) has its own run, measured next to that launch's
    probe and timed run (``plan.measure``), so its own cache entry."""
    argv = [a for a in argv if not a.startswith("data.batch_size=")]
    key = host._key(nproc, threads, " ".join([strategy, *extra])) \
        + f"|overhead run b={batch} steps={TWIN_STEPS} launch={launch}|" + " ".join(argv)

    def measure() -> dict:
        with tempfile.TemporaryDirectory(prefix="disttrain-plan-overhead-") as tmp:
            run = host.run_real([*argv, f"data.batch_size={batch}"], strategy, nproc, TWIN_STEPS, threads, extra,
                                Path(tmp) / "run", every=TWIN_EVERY)
        return {"step_s": run["step_median_s"]}

    entry, where = host.cached(key, measure)
    return entry["step_s"], where


def overhead_s(twin: Prediction, twin_step_s: float) -> float:
    """The small run's time beyond the modelled small step (the row's own overhead term aside):
    what does not grow with the batch and the model misses. Signed: where the model over-counts
    such a term (DDP's bucket all-reduces overlap backward, which the model adds in full) the
    run is faster than modelled and the difference comes off too."""
    return twin_step_s - (twin.step_s - twin.overhead_s)


def full_step_s(full: Prediction, twin: Prediction, twin_step_s: float) -> float:
    """The row's step: the small run's measured step plus the modelled cost of the extra
    samples (never less than the small run itself)."""
    return max(full.step_s - full.overhead_s + overhead_s(twin, twin_step_s), twin_step_s)


def small_batches(small: int, micro_batches: int) -> tuple[int, int]:
    """(the overhead run's batch, its pipeline micro-batch or 0): what ``small_batch_machine``
    needs probed."""
    micro = small // micro_batches if micro_batches > 1 and small % micro_batches == 0 else 0
    return small, micro if micro != small else 0


def small_batch_machine(facts: ModelFacts, machine: Machine, small: int, micro_batches: int,
                        probed: dict[int, tuple[float, float]]) -> Machine:
    """``machine`` with the efficiencies measured at the overhead run's batch (and at its
    pipeline micro-batch): ``probed`` holds them, timed by the same ``machine.nproc`` processes
    in turn with the full batch (``plan.probe.StepTimer``), so the full and small figures
    share their seconds. Nothing probed (a stated ``plan.efficiency``): ``machine`` as it is,
    the stated figure holding at every batch."""
    small, micro = small_batches(small, micro_batches)
    if small not in probed:
        return machine
    seconds, micro_s = probed[small][0], probed[micro][0] if micro else 0.0
    efficiency = facts.flops_per_sample * small / seconds / machine.peak_flops
    micro_efficiency = facts.flops_per_sample * micro / micro_s / machine.peak_flops if micro_s else efficiency
    return dataclasses.replace(machine, efficiency=efficiency, micro_efficiency=micro_efficiency)
