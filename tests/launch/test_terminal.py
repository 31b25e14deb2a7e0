"""The screen a person watches: in a real terminal (tmux, 160 columns) the rich bar keeps one
line at the bottom (step/total, ETA, loss, throughput) and the step lines print above it,
each on its own line, never through the bar."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from helpers import ROOT

TMUX = shutil.which("tmux")
STEPS, EVERY = 200, 20
LINE = re.compile(rf"^\d\d:\d\d:\d\d step (\d+)/{STEPS}  loss [0-9.e+-]+  [0-9.]+k? samples/s  [0-9.]+ ms/step "
                  r"\(comm \d+%, data \d+%\)  mfu [0-9.e+-]+%  mem [0-9.]+ GiB$")
BAR = re.compile(rf"^train [━╸╺ ]+ +(\d+)/{STEPS} (\d:\d\d:\d\d|-:--:--) loss [0-9.e+-]+  [0-9.]+k? samples/s$")


def _tmux(socket: str, *args: str, check: bool = True) -> str:
    """tmux on a server of this test's own (its own socket, no user config)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # pytest's 80x24
    return subprocess.run([TMUX, "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                          timeout=30, check=check, env=env).stdout


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian: apt-get install tmux)")
def test_bar_stays_one_line_and_log_lines_print_above_it(tmp_path):
    socket = session = f"disttrain-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    # rank 0 sleeps 30 ms a step (a testing aid of disttrain.observe) so the bar is seen mid-run
    command = (f"cd {tmp_path} && unset COLUMNS LINES && OMP_NUM_THREADS=1 {sys.executable} -m disttrain trainer.max_steps={STEPS} "
               f"trainer.log_every={EVERY} metrics.debug_slow_rank=0 metrics.debug_slow_s=0.03 "
               f"metrics.peak_flops=1e12 checkpoint.every_steps=0 hydra.run.dir={run_dir}; echo EXITED $?")
    _tmux(socket, "new-session", "-d", "-s", session, "-x", "160", "-y", "50", "-c", str(ROOT), command)
    try:
        _tmux(socket, "set-option", "-t", session, "remain-on-exit", "on")
        screens, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            screen = [line.rstrip() for line in _tmux(socket, "capture-pane", "-p", "-t", session).splitlines() if line.strip()]
            screens.append(screen)
            if any(line.startswith("EXITED") for line in screen):
                break
            time.sleep(0.5)
    finally:
        _tmux(socket, "kill-server", check=False)
    final = screens[-1]
    assert "EXITED 0" in final, "\n".join(final)
    mid_run = [s for s in screens if not any(line.startswith("EXITED") for line in s)
               and any(LINE.match(line) for line in s) and s and BAR.match(s[-1])]
    assert mid_run, "no screen showed step lines above a live bar:\n" + "\n".join(screens[-1])
    for screen in mid_run + [final[:-1]]:
        bars = [line for line in screen if "━" in line]
        assert len(bars) == 1, "the bar must be exactly one line:\n" + "\n".join(screen)
        steps = [line for line in screen if " step " in line and "/200" in line and "━" not in line]
        assert all(LINE.match(line) for line in steps), "step lines must be whole lines:\n" + "\n".join(screen)
    shown = [int(LINE.match(line).group(1)) for line in final if LINE.match(line)]
    assert shown == list(range(EVERY, STEPS + 1, EVERY)), shown  # every logged step once, in order
    done = BAR.match(next(line for line in final if "━" in line))
    assert done and int(done.group(1)) == STEPS
    logged = (run_dir / "train.log").read_text()
    assert len(re.findall(rf"disttrain: step \d+/{STEPS}  loss", logged)) == STEPS // EVERY
