"""Units of issue 6: signal names, fault.* validation, the watchdog's diagnosis from the
records ranks publish (the full path runs in tests/fault/test_hang.py)."""
import json
import signal
import time

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

from disttrain.config.schema import FaultConfig
from disttrain.resilience import guard as faults
from disttrain.resilience.signals import StopPoll
from disttrain.resilience.signals import parse_signal
from disttrain.resilience.watchdog import PHASES, Heartbeat, Watchdog


@pytest.mark.parametrize("name", ["USR1", "usr1", "SIGUSR1", str(int(signal.SIGUSR1))])
def test_parse_signal(name):
    assert parse_signal(name) == signal.SIGUSR1


@pytest.mark.parametrize("fault,key", [({"requeue_signal": "NOPE"}, "fault.requeue_signal"),
                                       ({"requeue": "always"}, "fault.requeue"),
                                       ({"hang_timeout_s": -1}, "fault.hang_timeout_s"),
                                       ({"debug": {"stall_rnak": 1}}, "fault.debug.stall_rnak")])
def test_bad_fault_settings_name_the_key(fault, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        faults.validate(OmegaConf.create({"fault": fault}))


def test_diagnosis_names_the_rank_furthest_behind(tmp_path):
    store = dist.HashStore()
    now = time.time()
    records = {0: (7, "train_step (forward/backward/collectives)"), 1: (7, "data loader"),
               2: (7, "train_step (forward/backward/collectives)")}
    for rank, (step, phase) in records.items():
        store.set(f"rank{rank}", json.dumps({"step": step, "phase": PHASES.index(phase), "idle_s": 20, "time": now}))
    watchdog = Watchdog(Heartbeat(), 0, 4, tmp_path, deadline_s=10)
    watchdog.store = store
    message = watchdog.diagnose()
    assert message.startswith("hang detected: rank 1 made no progress for 10s in data loader at step 7")
    assert "rank 0 in train_step" in message and "rank 2 in train_step" in message
    assert "not reporting" in message and "[3]" in message  # rank 3 never published


def test_stack_dump_names_the_rank(tmp_path):
    watchdog = Watchdog(Heartbeat(), 2, 4, tmp_path, deadline_s=10)
    text = watchdog.dump_stacks().read_text()
    assert text.startswith("rank 2 ") and "test_stack_dump_names_the_rank" in text


def test_after_a_signal_stop_no_further_sweep_job_starts(monkeypatch, tmp_path):
    from disttrain.distributed.env import World

    monkeypatch.setattr(faults, "_SIGNAL_STOPPED", ["SIGUSR1"])
    with pytest.raises(faults.SignalStop, match="SIGUSR1 stopped an earlier job of this sweep"):
        faults.Guard(FaultConfig(), 60.0, World(), tmp_path, None)


class _Recorder:
    """A StopSignal stand-in: records at which steps the poll ran its collective."""

    def __init__(self, slowest_step_s: float, stop_at: int | None = None):
        self.slowest, self.stop_at, self.polled = slowest_step_s, stop_at, []

    def agreed(self, local_figure: float):
        self.polled.append(self.step)
        return (self.stop_at is not None and self.step >= self.stop_at), self.slowest


def _run_poll(poll_s: float, slowest: float, steps: int, multiple: int = 1, stop_at=None) -> tuple[list[int], int]:
    rec = _Recorder(slowest, stop_at)
    poll = StopPoll(rec, poll_s, start_step=0, multiple=multiple)
    for step in range(1, steps + 1):
        rec.step = step
        if poll(step):
            return rec.polled, step
    return rec.polled, steps


def test_stop_poll_spaces_collectives_by_the_agreed_step_time():
    # slowest rank at 10 ms/step, poll every 0.25 s: one collective per 25 steps after the first
    polled, _ = _run_poll(0.25, 0.010, 200)
    assert polled == [1, 26, 51, 76, 101, 126, 151, 176]
    # poll_s = 0: every step, as before the cadence existed
    assert _run_poll(0.0, 0.010, 5)[0] == [1, 2, 3, 4, 5]


def test_stop_poll_stays_on_the_strategys_multiple_and_stops_at_a_poll():
    polled, stopped = _run_poll(0.25, 0.010, 200, multiple=10, stop_at=60)
    assert all(step % 10 == 0 for step in polled) and polled[:3] == [10, 40, 70]
    assert stopped == 70  # the first poll after the signal, the same step on every rank


@pytest.mark.parametrize("phase, fails", [("checkpoint save", False), ("data loader", True)])
def test_a_long_save_is_not_a_hang_but_a_stalled_loader_is(tmp_path, monkeypatch, phase, fails):
    """A checkpoint larger than the deadline takes longer than it (its collectives are bounded by
    dist.timeout_s); the watchdog must not turn it into a hang and a restart loop."""
    watchdog = Watchdog(Heartbeat(), 0, 1, tmp_path, deadline_s=0.01)
    failed = []
    monkeypatch.setattr(watchdog, "_fail", failed.append)
    watchdog.heartbeat.enter(phase, 7)
    watchdog.heartbeat.since -= 5.0  # idle for 5 s, far past the deadline
    watchdog._tick()
    assert bool(failed) == fails, failed
