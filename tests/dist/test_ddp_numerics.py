"""DDP and gradient accumulation give the numbers of one process on the global batch.

Every run goes through the real CLI (Hydra, dev-run workers or torchrun, gloo, DCP
checkpoints) and the final weights are read back with disttrain.load_model_state.
"""
import sys

import pytest
import torch

from disttrain import load_model_state
from helpers import run_disttrain

COMMON = ["trainer.max_steps=6", "trainer.log_every=3", "checkpoint.every_steps=0", "model.hidden=64",
          "optim.momentum=0.9"]


def _weights(run_dir):
    return load_model_state(run_dir)


def _assert_close(a, b, rtol=1e-6, atol=1e-7):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def _assert_differ(a, b):
    assert any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), "control runs should differ"


@pytest.fixture(scope="module")
def single_global_batch(tmp_path_factory):
    """The reference: one process, batch 16 (= 2 ranks x 8, or 4 micro-batches x 4)."""
    run_dir = tmp_path_factory.mktemp("single16")
    run_disttrain(COMMON + ["strategy=single", "data.batch_size=16"], run_dir)
    return _weights(run_dir)


def test_ddp_two_ranks_equals_one_process_on_the_global_batch(tmp_path, single_global_batch):
    run_disttrain(COMMON + ["strategy=ddp", "dist.nproc_per_node=2", "data.batch_size=8"], tmp_path / "ddp")
    _assert_close(_weights(tmp_path / "ddp"), single_global_batch)
    # Control: one process on batch 8 alone is not the same training.
    run_disttrain(COMMON + ["strategy=single", "data.batch_size=8"], tmp_path / "single8")
    _assert_differ(_weights(tmp_path / "single8"), single_global_batch)


def test_accumulation_single_4_micro_batches_equals_one_batch(tmp_path, single_global_batch):
    run_disttrain(COMMON + ["strategy=single", "data.batch_size=4", "trainer.grad_accum_steps=4"], tmp_path / "acc")
    _assert_close(_weights(tmp_path / "acc"), single_global_batch)


def test_accumulation_with_ddp_and_torchrun(tmp_path, single_global_batch):
    """2 ranks x 2 micro-batches x 4 = 16, launched by the real torchrun."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_disttrain(COMMON + ["strategy=ddp", "data.batch_size=4", "trainer.grad_accum_steps=2"],
                         tmp_path / "ddp_acc", launcher=torchrun)
    assert "training DDP on 2 rank(s) (torchrun" in proc.stdout
    _assert_close(_weights(tmp_path / "ddp_acc"), single_global_batch)


def test_no_sync_skips_allreduce_on_all_but_the_last_micro_step():
    """Counts DDP's all-reduces through a communication hook on 2 real ranks."""
    from helpers import spawn

    assert spawn(_count_allreduces, 2, timeout=300) == [1, 1]


def _count_allreduces(rank, world_size):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env
    from disttrain.strategies.base import accumulate

    dist_setup.init(env.detect(), "gloo", 60)
    calls = []

    def hook(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    model.register_comm_hook(None, hook)
    batches = [(torch.randn(2, 4), torch.randn(2, 1)) for _ in range(4)]
    accumulate(model, batches, torch.nn.functional.mse_loss, no_sync=model.no_sync)
    dist_setup.teardown()
    return len(calls)
