"""Elastic membership (issue 20): two torchrun agents on this host (``--nnodes=1:2``, c10d
rendezvous on 127.0.0.1) train one job of 2 ranks; one agent is SIGKILLed after the step-4
checkpoint. The survivor's worker fails on its dead peer, its agent holds a new rendezvous
with the nodes that are left (1 is enough) and restarts it: world size 1, the same global
batch (data.batch_size 4 x 2 accumulation steps instead of 4 x 2 ranks), resumed from the
newest checkpoint resharded. Its final weights equal an uninterrupted single-process run.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
from launch_helpers import ROOT, kill_group, launch_env, run, wait_for

from disttrain.checkpoint.commit import load_model_state, verify
from disttrain.distributed.process_group import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 12
TRAIN = ["strategy=ddp", "model=mlp", "data=synthetic", "optim=sgd", "optim.momentum=0.9", f"trainer.max_steps={STEPS}",
         "trainer.global_batch_size=8", "data.batch_size=4", "checkpoint.every_steps=4", "trainer.log_every=1",
         "trainer.progress=log", "metrics.peak_flops=1e11", "dist.timeout_s=8"]


def _agent(run_dir, port: int) -> subprocess.Popen:
    env = launch_env({"NNODES": "1:2", "NPROC_PER_NODE": "1", "MAX_RESTARTS": "3", "RDZV_ID": "elastic",
                      "RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_CONF": "last_call_timeout=3,join_timeout=120"})
    return subprocess.Popen([str(ROOT / "launch" / "torchrun.sh"), *TRAIN, f"hydra.run.dir={run_dir}",
                             "+fault.debug.step_delay_s=0.4"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _lose_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers at once, as a node that loses power (torchrun starts
    its workers in sessions of their own, so the agent's process group is not enough)."""
    import psutil

    procs = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)
    agent.wait(timeout=30)


def test_losing_a_node_continues_on_the_rest_with_the_same_samples(tmp_path):
    run_dir, port = tmp_path / "elastic", free_port()
    host = _agent(run_dir, port)  # the first agent binds the rendezvous store: it must survive
    time.sleep(0.5)  # within the first round's last call: one round of 2 nodes
    guest = _agent(run_dir, port)
    try:
        step_4 = run_dir / "checkpoints" / "step_00000004"
        wait_for(lambda: step_4.is_dir() and verify(step_4) is None, 240, "the step-4 checkpoint")
        _lose_node(guest)
        assert host.wait(timeout=300) == 0
    finally:
        kill_group(guest)
        kill_group(host)
    log = (run_dir / "train.log").read_text()
    assert "training DDP on 2 rank(s)" in log and "training DDP on 1 rank(s)" in log, log[-3000:]
    assert "written by ddp on 2 rank(s) (dp 2" in log and "resumed as ddp on 1 rank(s) (dp 1" in log
    reference = tmp_path / "reference"
    run([sys.executable, "-m", "disttrain", *TRAIN, "dist.nproc_per_node=1",
         f"hydra.run.dir={reference}"], timeout=240, env=launch_env())
    final, expected = load_model_state(run_dir), load_model_state(reference)
    assert max((final[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
