"""The pipeline schedules ``strategy.schedule`` can name: which torch class runs each, where
its stages live, what it needs (checked before any worker starts, by config key) and the
bubble it should have in theory.

The zero-bubble schedules split each backward into an input-gradient pass (I, what the
previous stage waits for) and a weight-gradient pass (W, which nobody waits for) and use
the W passes to fill the idle slots. ZBV and DualPipeV place two stages per rank in a V
(rank r holds stages r and 2p-1-r), so the first and the last stage share rank 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch.distributed import pipelining

from disttrain.parallel.timing import theory_bubble


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """What a schedule needs from the strategy: its torch class, whether it takes a list of
    stages (several per rank) and how stages are placed on ranks."""

    cls_name: str
    multi: bool = False
    v_shape: bool = False        # rank r holds stages r and 2p-1-r (else stage s on rank s % p)
    split_backward: bool = False  # backward as separate input (I) and weight (W) passes


_SPECS = {
    "gpipe": ScheduleSpec("ScheduleGPipe"),
    "1f1b": ScheduleSpec("Schedule1F1B"),
    "interleaved_1f1b": ScheduleSpec("ScheduleInterleaved1F1B", multi=True),
    "interleaved_zb": ScheduleSpec("ScheduleInterleavedZeroBubble", multi=True, split_backward=True),
    "zbv": ScheduleSpec("ScheduleZBVZeroBubble", multi=True, v_shape=True, split_backward=True),
    "dualpipev": ScheduleSpec("ScheduleDualPipeV", multi=True, v_shape=True, split_backward=True),
}
#: the schedules this torch provides (DualPipeV is recent)
SCHEDULES = {name: spec for name, spec in _SPECS.items() if hasattr(pipelining, spec.cls_name)}


def schedule_class(name: str):
    return getattr(pipelining, SCHEDULES[name].cls_name)


def stage_ids(name: str, pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    """The global stage indices pipeline rank ``pp_rank`` holds, in its local order."""
    if SCHEDULES[name].v_shape:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + j * pp for j in range(stages_per_rank)]


def rank_of_stage(name: str, stage: int, pp: int) -> int:
    """Inverse of ``stage_ids``: the pipeline rank that holds ``stage``."""
    if SCHEDULES[name].v_shape:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def check_schedule(micro_batches: int, schedule: str, stages_per_rank: int, pp: int, prefix: str) -> None:
    """Each schedule's own preconditions (read from torch's classes), refused with the key and the fix."""
    key, m, v = f"{prefix}schedule={schedule}", micro_batches, stages_per_rank
    if v > 1 and not SCHEDULES[schedule].multi:
        raise ValueError(f"{prefix}stages_per_rank={v} needs {prefix}schedule=interleaved_1f1b, interleaved_zb "
                         "or zbv (GPipe and 1F1B run one stage per rank).")
    if SCHEDULES[schedule].v_shape and v != 2:
        raise ValueError(f"{key} needs {prefix}stages_per_rank=2 (got {v}): it places exactly two stages per "
                         "rank in a V (rank r holds stages r and 2*pp-1-r).")
    if schedule == "interleaved_zb" and v < 2:
        raise ValueError(f"{key} needs {prefix}stages_per_rank>=2 (got {v}): it interleaves several looped "
                         f"stages per rank; set {prefix}stages_per_rank=2.")
    if schedule == "1f1b" and m < pp:
        raise ValueError(f"{prefix}micro_batches={m} < dist.pp={pp}: 1F1B needs at least one "
                         f"micro-batch per stage; raise {prefix}micro_batches or use {prefix}schedule=gpipe.")
    if schedule in ("interleaved_1f1b", "interleaved_zb") and m % max(1, m // pp):
        raise ValueError(f"{prefix}micro_batches={m} must be a multiple of dist.pp={pp} (or smaller than it) "
                         f"for {key}: torch runs its micro-batches in rounds of dist.pp.")
    if schedule == "dualpipev" and m < 2 * pp:
        raise ValueError(f"{prefix}micro_batches={m} < {2 * pp} stages: {key} needs at least one micro-batch "
                         f"per stage; set {prefix}micro_batches>={2 * pp}.")


def theory(name: str, schedule: Any, pp: int, micro_batches: int, stages_per_rank: int) -> float:
    """The bubble a schedule should have: the closed forms for GPipe / 1F1B / interleaved 1F1B,
    and for the zero-bubble schedules the idle fraction of torch's own action lists played
    with unit-time forward, input-backward and weight-backward (full backward = 2)."""
    if not SCHEDULES[name].split_backward:
        chunks = stages_per_rank if name == "interleaved_1f1b" else 1
        return theory_bubble(pp, micro_batches, chunks)
    return simulated_bubble(schedule.pipeline_order, 2 * pp if SCHEDULES[name].v_shape else pp * stages_per_rank)


_COST = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}


def _compute_actions(action) -> list[tuple[int, str, int]]:
    """(stage, kind, micro) of an action's compute; an overlapped F+B yields both halves."""
    if action is None:
        return []
    kind = action.computation_type.value
    if action.sub_actions:
        return [item for sub in action.sub_actions for item in _compute_actions(sub)]
    if kind not in _COST:
        return []  # communication / reduce actions take no compute time here
    return [(action.stage_index, kind, action.microbatch_index)]


def simulated_bubble(order: dict[int, list], num_stages: int) -> float:
    """Mean idle fraction over ranks when each rank runs its compute actions in list order,
    each as soon as its inputs are ready (free communication)."""
    queues = {rank: [a for action in actions for a in _compute_actions(action)] for rank, actions in order.items()}
    done: dict[tuple[int, str, int], float] = {}
    free = {rank: 0.0 for rank in queues}
    busy = {rank: sum(_COST[k] for _, k, _ in q) for rank, q in queues.items()}
    while any(queues.values()):
        progressed = False
        for rank, queue in queues.items():
            while queue:
                ready = _ready_at(queue[0], done, num_stages)
                if ready is None:
                    break
                stage, kind, micro = queue.pop(0)
                start = max(free[rank], ready)
                free[rank] = done[stage, kind, micro] = start + _COST[kind]
                progressed = True
        if not progressed:
            raise ValueError("schedule order deadlocks: an action waits for one that never runs")
    span = max(free.values())
    return sum((span - b) / span for b in busy.values()) / len(busy)


def _ready_at(item: tuple[int, str, int], done: dict, num_stages: int) -> float | None:
    """When the inputs of a compute action are available (None: not produced yet)."""
    stage, kind, micro = item
    if kind == "F":
        needs = [(stage - 1, "F", micro)] if stage > 0 else []
    elif kind == "W":
        needs = [(stage, "I", micro)]
    elif stage == num_stages - 1:
        needs = [(stage, "F", micro)]
    else:  # the next stage's gradient w.r.t. its input, from a split or a full backward
        after = [(stage + 1, k, micro) for k in ("I", "B") if (stage + 1, k, micro) in done]
        if not after:
            return None
        needs = after
    if any(n not in done for n in needs):
        return None
    return max((done[n] for n in needs), default=0.0)


def allow_forward_only(stage) -> None:
    """Let ``schedule.eval()`` run a V schedule: torch's runtime still hands a backward's input
    gradient to the neighbouring stage on the same rank (stages p-1 and p) when there is no
    backward, and the stage asserts. Without a backward there is nothing to hand over."""
    get_output, set_input = stage.get_local_bwd_output, stage.set_local_bwd_input

    def get_local_bwd_output(mb_index):
        return get_output(mb_index) if stage.has_backward else ()

    def set_local_bwd_input(outputs, mb_index):
        if stage.has_backward:
            set_input(outputs, mb_index)

    stage.get_local_bwd_output, stage.set_local_bwd_input = get_local_bwd_output, set_local_bwd_input
