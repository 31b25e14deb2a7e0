"""The planner's byte accounting against published figures: the ZeRO paper's per-device
model-state table (Rajbhandari et al. 2020, Figure 1 / Table 1: Ψ = 7.5B, N_d = 64, Adam,
mixed precision) and the activation bounds of GPipe and 1F1B pipeline schedules; plus the
host terms (framework memory, the model's kernel code, loop overhead, per-collective links)
entering every row."""
import pytest

from disttrain.plan import model as pm

PSI, N_D = 7_500_000_000, 64
FACTS = pm.ModelFacts(params=PSI, linear_params=PSI, flops_per_sample=6 * PSI, act_bytes_per_sample=0.0,
                      boundary_bytes_per_sample=1e6, blocks=32)
MACHINE = pm.Machine(nproc=N_D, device_memory=80e9, bandwidth=50e9, latency=0.0, peak_flops=1e15, efficiency=0.4)


def _states(pred):
    return pred.params_b + pred.grads_b + pred.optim_b


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_zero_paper_table(precision):
    """DDP 120 GB, ZeRO-1 31.4 GB, ZeRO-2 16.6 GB, ZeRO-3 1.9 GB per device (K = 12)."""
    work = pm.Workload(batch=1, optim_bytes=8, precision=precision)
    rows = {p.strategy: p for p in pm.predict_all(FACTS, MACHINE, work)}
    got = [_states(rows[name]) / 1e9 for name in ("ddp", "zero1", "zero2", "zero3")]
    assert got == pytest.approx([120, 31.4, 16.6, 1.9], abs=0.05)
    # the engines store them differently: DeepSpeed 2-byte parameters and gradients with an
    # fp32 master copy in the optimizer state; disttrain's autocast (ddp) fp32 throughout
    assert rows["zero1"].params_b == rows["zero1"].grads_b == 2 * PSI
    assert rows["zero1"].optim_b == pytest.approx(12 * PSI / N_D)
    assert rows["ddp"].params_b == rows["ddp"].grads_b == 4 * PSI and rows["ddp"].optim_b == 8 * PSI
    # DeepSpeed reduces 2-byte gradients; DDP under autocast all-reduces fp32 ones
    assert rows["zero1"].comm_s == pytest.approx(rows["ddp"].comm_s / 2)


def test_fp32_zero_rows_follow_deepspeed_storage():
    """fp32: stages 1-2 clone the fp32 partition as master weights, stage 3 does not."""
    work = pm.Workload(batch=1, optim_bytes=8, precision="32")
    rows = {p.strategy: p for p in pm.predict_all(FACTS, MACHINE, work)}
    assert _states(rows["zero1"]) == pytest.approx((4 + 4 + 12 / N_D) * PSI)
    assert _states(rows["zero2"]) == pytest.approx((4 + 16 / N_D) * PSI)
    assert _states(rows["zero3"]) == pytest.approx(16 * PSI / N_D)


@pytest.mark.parametrize("schedule,p,m,in_flight", [("gpipe", 4, 8, 8), ("1f1b", 4, 8, 4), ("1f1b", 4, 2, 2),
                                                     ("gpipe", 2, 4, 4), ("1f1b", 2, 4, 2)])
def test_pipeline_activations_per_schedule(schedule, p, m, in_flight):
    """GPipe keeps all m micro-batches' activations on a stage (the whole batch's, A·b/p);
    1F1B at most min(p, m) of them on the first stage (Narayanan et al. 2021)."""
    act, batch = 1000.0, 64
    facts = pm.ModelFacts(params=1000, linear_params=1000, flops_per_sample=1.0, act_bytes_per_sample=act,
                          boundary_bytes_per_sample=1.0, blocks=4)
    machine = pm.Machine(nproc=p, device_memory=1e12, bandwidth=1e9, latency=0.0, peak_flops=1e9, efficiency=1.0)
    pred = pm.pipeline(facts, machine, pm.Workload(batch=batch, micro_batches=m, schedule=schedule))
    assert pred.act_b == pytest.approx(act * batch / p * in_flight / m)
    assert pred.bubble == pytest.approx((p - 1) / (m + p - 1))
    if schedule == "gpipe":
        assert pred.act_b == pytest.approx(act * batch / p)


def test_pipeline_bubble_on_a_host_with_fewer_cores_than_ranks():
    """4 stages, m=4 on 2 cores: the probe times a micro-batch with all 4 ranks busy (2 per
    core); at fill and drain the 1-3 busy stages share both cores, so a pass takes
    (2+2+3+4+3+2+2)/4 = 4.5 probed times, not m+p-1 = 7. A device per rank: the paper's
    (p-1)/(m+p-1). One core per stage or more: unchanged."""
    assert pm.pipeline_bubble(4, 4) == pytest.approx(3 / 7)
    assert pm.pipeline_bubble(4, 4, slots=2) == pytest.approx(1 - 4 / 4.5)
    assert pm.pipeline_bubble(2, 4, slots=2) == pytest.approx(1 / 5)
    assert pm.pipeline_bubble(2, 4, slots=1) == pytest.approx(0.0)  # one core: the stages take turns
    assert pm.pipeline_bubble(2, 4, slots=2, ranks_per_stage=2) == pytest.approx(0.0)
    facts = pm.ModelFacts(params=1000, linear_params=1000, flops_per_sample=1.0, act_bytes_per_sample=1.0,
                          boundary_bytes_per_sample=0.0, blocks=4)
    work = pm.Workload(batch=64, micro_batches=4, schedule="gpipe")
    alone = pm.Machine(nproc=4, device_memory=1e12, bandwidth=1e9, latency=0.0, peak_flops=1e9, efficiency=1.0)
    shared = pm.Machine(**{**alone.__dict__, "slots": 2.0})
    one, two = pm.pipeline(facts, alone, work), pm.pipeline(facts, shared, work)
    assert one.compute_s == two.compute_s
    assert two.compute_s / (1 - two.bubble) == pytest.approx(one.compute_s / (1 - one.bubble) * 4.5 / 7)


def test_host_terms_enter_every_row():
    """The framework memory and the loop overhead are added once per rank and step; each
    collective uses its own measured link."""
    links = {"allreduce": (1e-4, 1e9), "allgather": (2e-4, 2e9), "p2p": (3e-5, 4e9)}
    machine = pm.Machine(nproc=4, device_memory=1e12, bandwidth=1.0, latency=9.0, peak_flops=1e12, efficiency=0.5,
                         links=links, overhead_s=0.002, base_b=20e6, code_b=3e6)
    facts = pm.ModelFacts(params=1_000_000, linear_params=900_000, flops_per_sample=6e6, act_bytes_per_sample=1e4,
                          boundary_bytes_per_sample=2e3, blocks=4)
    work = pm.Workload(batch=32, micro_batches=4)
    plain = pm.Machine(**{**machine.__dict__, "overhead_s": 0.0, "base_b": 0.0, "code_b": 0.0})
    for with_terms, without in zip(pm.predict_all(facts, machine, work), pm.predict_all(facts, plain, work)):
        assert with_terms.memory_b - without.memory_b == pytest.approx(20e6 + 3e6)  # framework + kernel code
        assert with_terms.step_s - without.step_s == pytest.approx(0.002)
    rows = {p.strategy.split(" m=")[0]: p for p in pm.predict_all(facts, machine, work)}
    assert rows["ddp"].comm_s == pytest.approx(2 * 3 / 4 * 4e6 / 1e9 + 2 * 3 * 1e-4)
    assert rows["pipeline"].comm_s == pytest.approx(2 * (2e3 * 32 / 4e9 + 4 * 3e-5))


@pytest.mark.parametrize("override,expected", [
    ("plan.validate_nproc=0", "plan.validate_nproc=0 must be >= 1"),
    ("plan.validate_steps=2", "plan.validate_steps=2 must be >= 3"),
    ("plan.validate_repeats=0", "plan.validate_repeats=0 must be >= 1"),
    ("plan.micro_batches=abc", "plan.micro_batches='abc' is not an integer"),
    ("plan.bogus=1", "Could not override 'plan.bogus'"),
    ("plan.efficiency=2", "plan.efficiency=2.0 is a fraction of peak"),
])
def test_bad_plan_keys_give_one_line(override, expected, capsys):
    """Refused before any probe starts: exit 2 and one line naming the key (no traceback), as
    `disttrain plan ...` runs it."""
    from disttrain.__main__ import run_subcommand

    stated = ["plan.device_memory=1GB", "plan.bandwidth=1GB/s", "plan.peak_flops=1e12", "plan.efficiency=0.5"]
    code = run_subcommand("plan", [*[s for s in stated if s.split("=")[0] != override.split("=")[0]], override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err


def test_param_server_overlaps_communication_under_bounded_staleness():
    """Synchronous: a worker waits for its push + pull + the server's update; with bounded
    staleness only the server's load beyond one step of compute shows (3 workers here)."""
    facts = pm.ModelFacts(params=1_000_000, linear_params=1_000_000, flops_per_sample=1e6,
                          act_bytes_per_sample=10.0, boundary_bytes_per_sample=1.0, blocks=1)
    machine = pm.Machine(nproc=4, device_memory=1e12, bandwidth=1.0, latency=0.0, peak_flops=1e9, efficiency=1.0,
                         links={"p2p": (0.0, 4e8)}, update_s=0.002)
    compute, trip = 1e6 * 8 / 1e9, 2 * 4e6 / 4e8  # 8 ms of compute; push + pull 20 ms
    sync = pm.param_server(facts, machine, pm.Workload(batch=8, staleness=0))
    bounded = pm.param_server(facts, machine, pm.Workload(batch=8, staleness=4))
    assert sync.compute_s == pytest.approx(compute)
    assert sync.comm_s == pytest.approx(3 * (trip + 0.002) - compute)  # the server is the limit
    assert bounded.comm_s == pytest.approx(3 * (trip + 0.002) - compute)
    one = pm.Machine(**{**machine.__dict__, "nproc": 2})
    assert pm.param_server(facts, one, pm.Workload(batch=8, staleness=0)).comm_s == pytest.approx(trip + 0.002)
    # a lone worker waits for its round trip under a bound too: its push closes every step
    assert pm.param_server(facts, one, pm.Workload(batch=8, staleness=4)).comm_s == pytest.approx(trip + 0.002)
    lone = pm.Machine(**{**one.__dict__, "shared_host": True, "update_s": 0.005})
    assert pm.param_server(facts, lone, pm.Workload(batch=8, staleness=4)).step_s == pytest.approx(compute + 0.005)
    # over TCP the server holds the step being summed and a received gradient of each other worker
    assert bounded.grads_b == pytest.approx(4e6) and bounded.temp_b == pytest.approx(2 * 4e6)
    # on one host it also has each of the 3 workers' fp32 parameters and gradients resident
    # (shared memory); equal workers run in rounds there whatever the bound: the workers'
    # gradients, then the server's update
    shared = pm.Machine(**{**machine.__dict__, "shared_host": True})
    host = pm.param_server(facts, shared, pm.Workload(batch=8))
    assert host.temp_b == pytest.approx(3 * 8e6) and host.comm_s == pytest.approx(0.002)
    assert pm.param_server(facts, shared, pm.Workload(batch=8, staleness=0)).comm_s == pytest.approx(0.002)
    # 4 ranks on 2 cores: the probe timed all 4 computing at once; in a round the 3 workers
    # share the 2 cores (8 * 3/4 = 6 ms), then the server updates with a core (2 * 2/4 = 1 ms)
    crowded = pm.param_server(facts, pm.Machine(**{**shared.__dict__, "slots": 2.0}), pm.Workload(batch=8))
    assert crowded.compute_s == pytest.approx(0.006) and crowded.comm_s == pytest.approx(0.001)
    roomy = pm.param_server(facts, pm.Machine(**{**shared.__dict__, "slots": 4.0}), pm.Workload(batch=8))
    assert roomy.compute_s == pytest.approx(compute)  # a core each: as probed
