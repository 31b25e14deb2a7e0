"""The input pipeline: loader workers change neither which samples a rank sees nor their
order (also across a mid-epoch restart while workers have batches in flight); ranks read
disjoint shares of a sharded corpus that together cover it; a run killed mid-epoch with
workers resumes to bitwise-equal weights; data-wait is measured and reported."""
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from helpers import ROOT, cli_env, run_disttrain, spawn

T = 16  # block size; the test corpus holds exactly 64 blocks of it (+1 target token)


class Tagged(Dataset):
    """(sample id, inputs): lets the test record which samples each rank received."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return torch.tensor(i), self.inner[i][0]


def _loader(cfg, shard_dir, rank, world):
    from disttrain.engine import builders
    from disttrain.data.shards import ShardedTokens, TokenBlocks

    return builders.build_loader(cfg, Tagged(TokenBlocks(ShardedTokens(shard_dir), T, T)), (rank, world))


def _consume(shard_dir, workers, steps, restart_at, rank, world):
    """What the training loop does (next, then advance); at ``restart_at`` the loader is
    thrown away with prefetched batches in flight and rebuilt from the saved position."""
    cfg = OmegaConf.create({"trainer": {"seed": 3}, "data": {"batch_size": 4, "num_workers": workers,
                                                             "prefetch_factor": 2, "persistent_workers": True}})
    loader, sampler = _loader(cfg, shard_dir, rank, world)
    batches, ids, inputs = iter(loader), [], []
    for step in range(steps):
        if step == restart_at:
            state = sampler.state_dict()
            del batches, loader
            loader, sampler = _loader(cfg, shard_dir, rank, world)
            sampler.load_state_dict(state)
            batches = iter(loader)
        idx, x = next(batches)
        sampler.advance(1)
        ids.append(idx.tolist())
        inputs.append(x)
    return ids, torch.cat(inputs)


def _rank_reads(rank, world, shard_dir):
    from disttrain.distributed import process_group as dist_setup
    from disttrain.distributed import env

    world_info = env.detect()
    dist_setup.init(world_info, "gloo", 60)
    try:
        steps = 12  # 8 batches per epoch per rank: crosses into epoch 1
        return {name: _consume(shard_dir, workers, steps, restart, world_info.rank, world_info.world_size)
                for name, workers, restart in (("w0", 0, None), ("w2", 2, None), ("w2_restart", 2, 5))}
    finally:
        dist_setup.teardown()


def test_workers_keep_samples_and_order_and_ranks_split_the_corpus(tmp_path):
    from disttrain.data.prepare import prepare

    raw = np.random.default_rng(1).integers(0, 256, 64 * T + 1, dtype=np.uint8).tobytes()
    (tmp_path / "c.txt").write_bytes(raw)
    shard_dir = str(prepare([tmp_path / "c.txt"], tmp_path / "shards", shard_tokens=100))
    per_rank = spawn(_rank_reads, 2, shard_dir, timeout=180)
    epoch0 = []
    for result in per_rank:
        ids, inputs = result["w0"]
        assert result["w2"][0] == ids and result["w2_restart"][0] == ids  # same samples, same order
        assert torch.equal(result["w2_restart"][1], inputs)
        flat = [i for batch in ids for i in batch]
        for n, i in enumerate(flat):  # each sample holds its own bytes of the corpus
            assert bytes(inputs[n].tolist()) == raw[i * T:(i + 1) * T]
        epoch0.append(set(flat[:32]))
    assert not epoch0[0] & epoch0[1]  # disjoint shares ...
    assert epoch0[0] | epoch0[1] == set(range(64))  # ... that together cover every block


class Sleeper:
    """An engine whose step takes ``seconds`` of (sleeping) compute: the loader, the loop's
    timing and TensorBoard are the real ones."""

    def lr(self):
        return None

    def __init__(self, seconds):
        self.seconds = seconds

    def train_step(self, micro_batches, loss_fn):
        from disttrain.strategies.base import StepStats

        time.sleep(self.seconds)
        return StepStats(loss=torch.zeros(()), samples=len(micro_batches[0][0]))


def _data_wait(tmp_path, workers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from disttrain.engine import builders
    from disttrain.data import synthetic_regression
    from disttrain.engine.loop import LoopParts, LoopSettings, train
    from disttrain.observe.metrics import Meter, TensorBoard
    from disttrain.observe.progress import Progress

    # 8 samples x 10 ms = 80 ms to load a batch, 100 ms to compute on it: two workers load a
    # batch per 40 ms, so they stay ahead with a margin that a loaded machine's scheduling
    # delays (tens of ms for the workers' queue hand-off) do not eat.
    cfg = OmegaConf.create({"trainer": {"seed": 0}, "data": {"batch_size": 8, "num_workers": workers,
                                                             "prefetch_factor": 4, "debug_delay_s": 0.010}})
    loader, sampler = builders.build_loader(cfg, synthetic_regression(size=512), (0, 1))
    run_dir, cpu = tmp_path / f"w{workers}", torch.device("cpu")
    board = TensorBoard(run_dir, enabled=True)
    parts = LoopParts(engine=Sleeper(0.1), batches=iter(loader), advance_data=sampler.advance, loss_fn=None,
                      save=lambda step: None, meter=Meter(cpu), tensorboard=board,
                      progress=Progress(20, 0, "log", enabled=False), device=cpu)
    train(LoopSettings(max_steps=20, grad_accum_steps=1, log_every=5, checkpoint_every=0), parts, 0)
    board.close()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(f"train/{tag}")] for tag in ("data_wait_s", "data_wait_share")}


def test_data_wait_is_near_zero_with_workers_and_large_without(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        inline = _data_wait(tmp_path, 0)
    assert "input-bound" in caplog.text and "data.num_workers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="disttrain"):
        workers = _data_wait(tmp_path, 2)
    # the first interval holds the workers' start-up; afterwards they stay ahead of compute
    assert all(w > 0.06 for w in inline["data_wait_s"]), inline
    assert all(s > 0.3 for s in inline["data_wait_share"]), inline
    # near zero: on an idle machine ~1 ms; scheduling delays on a loaded 2-core box give a few ms
    later = workers["data_wait_s"][1:]
    assert sum(later) / len(later) < 0.25 * sum(inline["data_wait_s"]) / len(inline["data_wait_s"]), (workers, inline)
    assert all(w < 0.5 * min(inline["data_wait_s"]) for w in later), (workers, inline)
    assert "input-bound" not in caplog.text.split("step 5:")[-1]


RUN = ["strategy=ddp", "dist.nproc_per_node=2", "data.num_workers=2", "trainer.precision=fp16",
       "trainer.max_steps=40", "checkpoint.every_steps=10", "trainer.log_every=5", "data.debug_delay_s=0.003"]


def _start(run_dir, log_path):
    cmd = [sys.executable, "-m", "disttrain", *RUN, f"hydra.run.dir={run_dir}", "trainer.progress=log"]
    with open(log_path, "w") as out:  # its own session: killpg takes the agent, ranks and loader workers
        return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def test_killed_run_with_workers_resumes_bitwise(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from disttrain.checkpoint.commit import load_model_state

    ref_dir, victim_dir = tmp_path / "ref", tmp_path / "victim"
    victim, ref = (_start(run_dir, tmp_path / f"{run_dir.name}.out") for run_dir in (victim_dir, ref_dir))
    deadline = time.time() + 180
    while not (victim_dir / "checkpoints" / "step_00000010").is_dir():
        assert victim.poll() is None and time.time() < deadline, (tmp_path / "victim.out").read_text()
        time.sleep(0.05)
    time.sleep(0.3)  # a few steps past the checkpoint, workers mid-prefetch
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (victim_dir / "checkpoints" / "step_00000040").exists(), "killed too late"
    assert ref.wait(timeout=240) == 0, (tmp_path / "ref.out").read_text()  # the uninterrupted run
    resumed = run_disttrain(RUN, victim_dir, timeout=240)
    assert "resumed from" in (victim_dir / "train.log").read_text(), resumed.stdout
    ref, got = load_model_state(ref_dir), load_model_state(victim_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    events = EventAccumulator(str(ref_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/data_wait_s", "train/data_wait_share", "train/time_step_s", "train/loss_scale"} <= set(tags)
    assert "input-bound" in (ref_dir / "train.log").read_text()  # 2 slow workers cannot feed an MLP
