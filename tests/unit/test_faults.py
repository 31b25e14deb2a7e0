"""Units of issue 6: signal names, fault.* validation, the watchdog's diagnosis from the
records ranks publish (the full path runs in tests/fault/test_hang.py)."""
import json
import signal
import time

import pytest
import torch.distributed as dist
from omegaconf import OmegaConf

from disttrain import faults
from disttrain.signals import parse_signal
from disttrain.watchdog import PHASES, Heartbeat, Watchdog


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
    from disttrain.env import World

    monkeypatch.setattr(faults, "_SIGNAL_STOPPED", ["SIGUSR1"])
    with pytest.raises(faults.SignalStop, match="SIGUSR1 stopped an earlier job of this sweep"):
        faults.Guard(OmegaConf.create({}), World(), tmp_path, None)
