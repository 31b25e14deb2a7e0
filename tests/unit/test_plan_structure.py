"""plan.structure: the strategy's per-step overhead on the model's own structure, from a
real run at a small batch minus the modelled small step (the run itself is faked here;
bench/plan_accuracy.py runs it for real)."""
from __future__ import annotations

import json

import pytest

from disttrain.plan import host, structure
from disttrain.plan.model import Prediction


def _pred(compute: float, comm: float, update: float, bubble: float = 0.0, overhead: float = 0.0) -> Prediction:
    return Prediction("x", 0, 0, 0, 0, compute, comm, bubble, 1, update, overhead_s=overhead)


def test_twin_batch_is_one_sample_per_micro_batch_and_never_more_than_the_run():
    assert structure.twin_batch(16, 4) == 4
    assert structure.twin_batch(2, 4) == 2
    assert structure.twin_batch(64, 1) == 1


def test_overhead_is_the_small_runs_time_beyond_the_modelled_small_step():
    # modelled: 2 ms compute over a 0.5 bubble (4 ms) + 3 ms comm + 1 ms update = 8 ms
    twin = _pred(0.002, 0.003, 0.001, bubble=0.5, overhead=0.004)
    assert structure.overhead_s(twin, 0.020) == pytest.approx(0.012)  # the row's own overhead term is not subtracted
    # faster than modelled (DDP's all-reduce overlapping backward): the difference comes off
    assert structure.overhead_s(twin, 0.005) == pytest.approx(-0.003)
    full = _pred(0.032, 0.003, 0.001, overhead=0.004)  # 36 ms modelled at the full batch
    assert structure.full_step_s(full, twin, 0.020) == pytest.approx(0.048)
    assert structure.full_step_s(full, twin, 0.005) == pytest.approx(0.033)
    # never below the small run itself (a model whose full step is under its small one)
    assert structure.full_step_s(_pred(0.001, 0, 0), twin, 0.020) == pytest.approx(0.020)


def test_measured_step_runs_once_per_strategy_model_and_batch(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake_run(argv, strategy, nproc, steps, threads, extra, run_dir, every=None, **_):
        calls.append((tuple(argv), strategy, nproc, steps, tuple(extra)))
        assert every == structure.TWIN_EVERY and steps // every >= 5  # a median over several intervals
        return {"step_s": 1.0, "step_median_s": 0.05 + 0.01 * len(calls), "memory_b": 0.0}

    monkeypatch.setattr(host, "run_real", fake_run)
    argv = ["experiment=gpt_text", "data.batch_size=16"]
    first = structure.measured_step(argv, "model_parallel", ["strategy.mode=tensor"], 2, 1, 4)
    assert first == (pytest.approx(0.06), "measured now")
    # the run's own batch is replaced by the small one, not given twice
    assert calls == [(("experiment=gpt_text", "data.batch_size=4"), "model_parallel", 2, structure.TWIN_STEPS,
                      ("strategy.mode=tensor",))]
    again = structure.measured_step(argv, "model_parallel", ["strategy.mode=tensor"], 2, 1, 4)
    assert again[0] == pytest.approx(0.06) and again[1].startswith("cached in") and len(calls) == 1
    structure.measured_step(argv, "model_parallel", ["strategy.mode=tensor"], 4, 1, 4)  # another rank count
    structure.measured_step(argv, "ddp", [], 2, 1, 4)  # another strategy
    structure.measured_step(["experiment=gpt_text", "model.layers=4"], "ddp", [], 2, 1, 4)  # another model
    assert len(calls) == 4


def test_each_launch_has_its_own_overhead_run(monkeypatch, tmp_path):
    """plan.validate pairs each timed launch with an overhead run made next to it: launch 1
    is a run of its own (the host's speed moves between launches), each cached apart."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    medians = iter([0.088, 0.069])

    def fake_run(*_, **__):
        return {"step_s": 1.0, "step_median_s": next(medians), "memory_b": 0.0}

    monkeypatch.setattr(host, "run_real", fake_run)
    assert structure.measured_step(["model=mlp"], "ddp", [], 4, 1, 4, launch=0)[0] == pytest.approx(0.088)
    assert structure.measured_step(["model=mlp"], "ddp", [], 4, 1, 4, launch=1)[0] == pytest.approx(0.069)
    assert structure.measured_step(["model=mlp"], "ddp", [], 4, 1, 4, launch=0)[0] == pytest.approx(0.088)  # cached
    stored = json.loads(host.cache_file().read_text())
    assert sorted(entry["step_s"] for entry in stored.values()) == [0.069, 0.088]


def test_validate_takes_the_fastest_runs_and_the_fastest_probe_with_its_own_small_figure():
    """Three launches, each fastest at something else: the overhead run and the timed run are
    each the fastest of their kind (the host's speed toggles between launches); the small-batch
    model is the one probed in turn with the fastest full-batch model, not the fastest of all
    (their difference is what the row adds to the overhead run)."""
    from disttrain.plan.measure import _fastest

    launches = [{"model": _pred(0.030, 0, 0), "twin": _pred(0.004, 0, 0, overhead=0.5), "twin_step_s": 0.009,
                 "timed": {"step_median_s": 0.050}},
                {"model": _pred(0.020, 0, 0), "twin": _pred(0.006, 0, 0), "twin_step_s": 0.007,
                 "timed": {"step_median_s": 0.060}},
                {"model": _pred(0.025, 0, 0), "twin": _pred(0.005, 0, 0), "twin_step_s": 0.008,
                 "timed": {"step_median_s": 0.040}}]
    model, twin, twin_step, timed = _fastest(launches)
    assert model.compute_s == 0.020 and twin.compute_s == 0.006 and twin_step == 0.007
    assert timed["step_median_s"] == 0.040


def test_the_probe_times_its_batch_sizes_in_turn():
    """The full and the small batch are stepped alternately, round by round, so a change of
    the host's speed meets both medians alike; warm-up rounds are discarded; a 0 batch is zeros."""
    from disttrain.plan import concurrent

    calls, clock = [], iter(range(1000))

    def step(batch):
        calls.append(batch)
        tick = next(clock)
        return batch * (2.0 if tick >= 16 else 1.0), 0.001  # the host halves its speed halfway

    times = concurrent.alternated(step, (16, 0, 4), lambda: None)
    warm = concurrent.WARMUP_ROUNDS
    assert calls == [16, 4] * (warm + concurrent.ROUNDS)
    assert times[1] == (0.0, 0.0)
    # the speed change lands in both batches' samples alike: their ratio stays the batches' 4x
    assert times[0][0] / times[2][0] == pytest.approx(4.0)


def test_the_small_batch_machine_takes_its_probed_figures_or_keeps_a_stated_one():
    """The overhead run's batch and micro-batch get the efficiency their own probe measured
    (4 samples in 2 ms, 1 sample in 1 ms at 1 GFLOP/sample on a 10 TFLOP/s peak); with nothing
    probed (plan.efficiency stated) the machine is returned as it is."""
    from disttrain.plan.model import Machine, ModelFacts

    facts = ModelFacts(params=1, linear_params=1, flops_per_sample=1e9, act_bytes_per_sample=0,
                       boundary_bytes_per_sample=0, blocks=1)
    machine = Machine(nproc=2, device_memory=1e9, bandwidth=1e9, latency=0, peak_flops=1e13, efficiency=0.4)
    small = structure.small_batch_machine(facts, machine, 4, 4, {64: (0.02, 0.0), 4: (0.002, 0.0), 1: (0.001, 0.0)})
    assert small.efficiency == pytest.approx(4e9 / 0.002 / 1e13)        # 0.2
    assert small.micro_efficiency == pytest.approx(1e9 / 0.001 / 1e13)  # 0.1
    assert structure.small_batch_machine(facts, machine, 4, 4, {}) is machine
