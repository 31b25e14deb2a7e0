"""The planner: ZeRO memory equals the paper's formulas, the step-time model is the
stated one, and `disttrain plan` prints a table that marks what does not fit."""
import sys

import pytest

from disttrain.plan import model as pm
from disttrain.plan.core import parse_bandwidth, parse_bytes
from helpers import run_process

FACTS = pm.ModelFacts(params=1_000_000, linear_params=900_000, flops_per_sample=6e6, act_bytes_per_sample=1e4,
                      boundary_bytes_per_sample=2e3, blocks=4)
MACHINE = pm.Machine(nproc=4, device_memory=20e6, bandwidth=1e9, latency=1e-5, peak_flops=1e11, efficiency=0.5)
WORK = pm.Workload(batch=32, accum=2, micro_batches=8, optim_bytes=8)


def _by_name(preds):
    return {p.strategy.split(" m=")[0]: p for p in preds}


# fp32: DDP 4 + 4 + K; DeepSpeed ZeRO-1/2 also clone their fp32 partition as the optimizer's
# master copy (+4/N); ZeRO-3 updates the partition in place
@pytest.mark.parametrize("stage,expected", [(0, 4 + 4 + 8), (1, 4 + 4 + (8 + 4) / 4), (2, 4 + (4 + 8 + 4) / 4),
                                            (3, (4 + 4 + 8) / 4)])
def test_zero_memory_equals_the_formulas(stage, expected):
    psi, act = FACTS.params, FACTS.act_bytes_per_sample * WORK.batch
    pred = _by_name(pm.predict_all(FACTS, MACHINE, WORK))["ddp" if stage == 0 else f"zero{stage}"]
    assert pred.params_b + pred.grads_b + pred.optim_b == pytest.approx(expected * psi)
    # plus the larger peak: backward's transients next to the activations (DeepSpeed's
    # flattened reduce bucket 4Ψ, stage 1 with its averaged fp32 partition 4Ψ/N, stage 2 with
    # its contiguous gradient buffer 4Ψ, stage 3 with its gathered parameters 4Ψ and a second
    # bucket) or one on its own (Adam's fp32 temporary per parameter at the update; DDP's
    # bucket rebuild 4Ψ at the start of the second step)
    # (a model smaller than one bucket is reduced after backward: a peak apart from the activations)
    step_temp = {0: 4, 1: 4 + 1, 2: 8, 3: 12}[stage] * psi
    assert pred.temp_b == 0 and pred.step_temp_b == pytest.approx(step_temp)
    assert pred.memory_b == pytest.approx(expected * psi + max(act, step_temp))


def test_step_time_model():
    preds = _by_name(pm.predict_all(FACTS, MACHINE, WORK))
    compute = 6e6 * 64 / (1e11 * 0.5)
    ring = 2 * 3 / 4 * 4e6 / 1e9 + 2 * 3 * 1e-5
    assert preds["ddp"].compute_s == pytest.approx(compute)
    assert preds["ddp"].comm_s == pytest.approx(ring)
    assert preds["ddp"].step_s == pytest.approx(compute + ring)
    assert preds["ddp"].samples_per_step == 4 * 64
    assert preds["zero3"].comm_s == pytest.approx(1.5 * 2 * 3 / 4 * 4e6 / 1e9 + 2 * 3 * 1e-5)
    pipe = preds["pipeline"]
    assert pipe.bubble == pytest.approx(3 / (8 + 3))
    assert pipe.step_s == pytest.approx(compute / 4 * (8 + 3) / 8 + pipe.comm_s)
    assert preds["single (1 rank)"].comm_s == 0


def test_marks_what_does_not_fit_and_recommends_a_fitting_one():
    small = pm.Machine(**{**MACHINE.__dict__, "device_memory": 8e6})
    preds = _by_name(pm.predict_all(FACTS, small, WORK))
    assert not preds["ddp"].fits and "does not fit" in preds["ddp"].note
    assert preds["tensor parallel"].fits and not preds["zero3"].fits  # ZeRO-3: DeepSpeed's default buffers
    best = pm.recommend(list(preds.values()))
    assert best.fits and best.memory_b <= 8e6
    assert pm.recommend(pm.predict_all(FACTS, pm.Machine(**{**MACHINE.__dict__, "device_memory": 1.0}), WORK)) is None


def test_sizes_and_bandwidths_parse():
    assert parse_bytes("80GB", "k") == 80e9
    assert parse_bytes("24GiB", "k") == 24 * 2**30
    assert parse_bandwidth("100Gbps", "k") == 12.5e9
    assert parse_bandwidth("12GB/s", "k") == 12e9
    with pytest.raises(ValueError, match="plan.device_memory"):
        parse_bytes("lots", "plan.device_memory")


def _plan(*overrides):
    return run_process([sys.executable, "-m", "disttrain", "plan", *overrides], timeout=180)


def test_plan_command_marks_an_oversized_model():
    proc = _plan("model.hidden=8192", "model.depth=8", "optim=adamw", "dist.nproc_per_node=8",
                 "plan.device_memory=4GB", "plan.bandwidth=100Gbps", "plan.peak_flops=1e14", "plan.efficiency=0.4")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert "470,097,921 parameters" in proc.stdout  # 8192x32 + 7 x 8192^2 + 8192 x 1 weights, plus biases
    for name in ("ddp", "zero1", "param_server"):
        assert " NO " in lines[name] and "does not fit" in lines[name]
    for name in ("fsdp", "tensor parallel"):
        assert " yes " in lines[name]
    # ZeRO-3 on 8 ranks: (4 + 4 + 8) x 470,097,921 / 8 bytes of model states = 940 MB, but
    # DeepSpeed's default buckets (two reduce buckets of 5e8 elements, so the whole fp32
    # gradient twice, 3.76 GB, and a 5e7-parameter prefetch, 200 MB) do not fit in 4 GB
    assert lines["zero3"].split()[1:4] == ["235", "MB", "235"]
    assert lines["zero3"].split()[11:13] == ["3.96", "GB"] and " NO " in lines["zero3"]  # the "step tmp" column
    assert "recommended:" in proc.stdout and "recommended: nothing" not in proc.stdout


def test_plan_rejects_a_bad_size(capsys):
    from disttrain.plan.cli import main

    code = main(["plan.device_memory=lots", "plan.bandwidth=1GB/s", "plan.peak_flops=1e12", "plan.efficiency=0.5"])
    assert code == 2 and "plan.device_memory='lots'" in capsys.readouterr().err


def test_code_term_is_the_models_pages_beyond_the_calibrations(tmp_path, monkeypatch):
    """The model's kernel code (``plan.pages``): its step's file-backed pages minus the
    calibration model's, measured once and cached per model config; never negative."""
    from omegaconf import OmegaConf

    from disttrain.plan import pages

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pages.torch.cuda, "is_available", lambda: False)
    calls = []
    monkeypatch.setattr(pages, "_measure", lambda spec, threads: calls.append(spec) or spec["model"]["pages"])
    big, tiny = OmegaConf.create({"model": {"pages": 15e6}}), OmegaConf.create({"model": {"pages": 5e6}})
    assert pages.extra_code_bytes(big, tiny, 2)[0] == pytest.approx(10e6)
    assert pages.extra_code_bytes(big, tiny, 2)[1].endswith(f"(cached in {tmp_path / 'disttrain' / 'plan_host.json'})")
    assert len(calls) == 2  # the second plan reads the cache
    assert pages.extra_code_bytes(tiny, big, 2)[0] == 0.0


def test_gpt_step_pages_in_more_code_than_the_calibration_model():
    """Measured, two fresh processes: gpt_tiny's first steps page in megabytes more library
    code than the host calibration's tiny MLP (what the GPT rows' memory missed)."""
    from disttrain.plan import host, pages
    from disttrain.plan.core import compose

    gpt = pages._measure(pages._spec(compose(["experiment=gpt_text"])), 1)
    tiny = pages._measure(pages._spec(compose(host.TINY)), 1)
    assert tiny > 1e6 and gpt - tiny > 4e6
