"""A test that times out must leave nothing running: ``spawn`` and the CLI helper kill their
whole process tree when pytest-timeout interrupts them (checked on a real inner pytest)."""
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from helpers import ROOT, cli_env

INNER = '''
import subprocess, sys, time
import pytest
from disttrain.testing import spawn
from helpers import run_process

PIDS = {pids!r}

def _sleep_forever(rank, world_size, pid_dir):
    open(f"{{pid_dir}}/spawn{{rank}}", "w").write(str(__import__("os").getpid()))
    time.sleep(600)

@pytest.mark.timeout(12)  # the spawned ranks import torch: ~5 s on a loaded machine
def test_spawn_times_out():
    spawn(_sleep_forever, 2, PIDS, timeout=600)

@pytest.mark.timeout(5)  # plain Python children: they start in well under a second
def test_cli_helper_times_out():
    # a child that starts a grandchild, like the disttrain CLI starting its workers
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open('{{PIDS}}/cli', 'w').write(str(p.pid)); time.sleep(600)")
    run_process([sys.executable, "-c", code], timeout=600)
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited; only its parent's reaping is left


def test_timed_out_tests_leave_no_process_behind(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER.format(pids=str(pids))))
    env = cli_env({"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout_method=signal",
                           str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert "2 failed" in proc.stdout and proc.stdout.count("Timeout") >= 2, proc.stdout[-3000:]
    started = {p.name: int(p.read_text()) for p in pids.iterdir()}
    assert set(started) == {"spawn0", "spawn1", "cli"}, started  # the processes did start
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in started.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [name for name, pid in started.items() if _alive(pid)], "left running after the timeout"
