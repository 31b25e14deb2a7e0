"""The planner's FSDP / HSDP / 2-D / 3-D rows: byte accounting against hand-computed figures
(the ZeRO paper's 7.5B-parameter example), communication against the ring formulas, and the
rows in `disttrain plan`'s output at 4 and 8 ranks."""
import pytest

from disttrain.plan import model as pm
from disttrain.plan import sharded

PSI, BLOCK, BLOCK_LINEAR = 7_500_000_000, 117_187_500, 117_000_000  # 64 blocks of 117.1875M
BIG = pm.ModelFacts(params=PSI, linear_params=64 * BLOCK_LINEAR, flops_per_sample=6 * PSI * 2048,
                    act_bytes_per_sample=1e8, boundary_bytes_per_sample=2048 * 4096 * 4, blocks=64,
                    units=((BLOCK, BLOCK_LINEAR),) * 64)
N_D = 64
MACHINE = pm.Machine(nproc=N_D, device_memory=80e9, bandwidth=50e9, latency=0.0, peak_flops=1e15, efficiency=0.4)
BF16 = pm.Workload(batch=1, accum=1, micro_batches=8, optim_bytes=8, precision="bf16")
FP32 = pm.Workload(batch=1, accum=1, micro_batches=8, optim_bytes=8, precision="32")


def _rows(machine=MACHINE, work=BF16, layouts=None):
    rows = sharded.predict_rows(BIG, machine, work, layouts)
    return {p.strategy.split(" m=")[0]: p for p in pm.predict_all(BIG, machine, work, rows)}


def _states(pred):
    return pred.params_b + pred.grads_b + pred.optim_b


def test_fsdp_full_shard_is_zero3_plus_the_gathered_blocks():
    rows = _rows()
    # ZeRO paper, Table 1: Ψ=7.5B, N_d=64, K=12 mixed precision: (2 + 2 + 12)Ψ/N_d = 1.875 GB ("1.9 GB").
    # FSDP2 keeps fp32 shards (4 + 4) and Adam's fp32 moments (8): the same 16 bytes per parameter.
    assert _states(rows["zero3"]) == pytest.approx(1.875e9)
    assert _states(rows["fsdp"]) == pytest.approx(1.875e9)
    assert rows["fsdp"].params_b == pytest.approx(4 * PSI / 64)  # fp32 shards even under bf16
    # gathered: the current and the prefetched block in bf16 (2 x 2 B) + the block's fp32
    # reduce-scatter input (4 B) = 8 B x 117,187,500 = 937.5 MB; no root parameters here
    assert sharded.gathered_b(BIG, 1, "bf16", True) == pytest.approx(937_500_000)
    # ZeRO-3's transients are DeepSpeed's default buffers (a 5e7-parameter prefetch bucket,
    # two 5e8-element reduce buckets, 2-byte); FSDP2 holds the gathered blocks above instead
    assert rows["zero3"].temp_b == pytest.approx(2 * 5e7 + 2 * 2 * 5e8)
    assert rows["fsdp"].memory_b - _states(rows["fsdp"]) - rows["fsdp"].act_b == pytest.approx(937_500_000)
    # fp32: 4 + 4 + 4 B per block parameter
    fp32 = _rows(work=FP32)
    assert fp32["fsdp"].memory_b - _states(fp32["fsdp"]) - fp32["fsdp"].act_b == pytest.approx(12 * BLOCK)


def test_root_parameters_stay_gathered_with_their_gradients():
    # a 1B embedding + head outside the blocks: the root all-gathers them around the whole forward
    # and keeps their (bf16) gradients until the end of backward: 2 + 2 B each
    facts = pm.ModelFacts(**{**BIG.__dict__, "params": PSI + 1_000_000_000})
    assert sharded.root_params(facts, 1) == 1_000_000_000
    assert sharded.gathered_b(facts, 1, "bf16", True) == pytest.approx(937_500_000 + 4e9)
    assert sharded.messages(facts) == 65


def test_hsdp_shards_within_a_group_of_dp_shard():
    rows = _rows(layouts=[sharded.Layout(shard=32, replicate=2)])
    hsdp = rows["hsdp 2x32"]
    assert _states(hsdp) == pytest.approx(16 * PSI / 32)  # 3.75 GB
    assert hsdp.temp_b == pytest.approx(937_500_000)  # gathered, next to the activations
    assert hsdp.step_temp_b == pytest.approx(4 * PSI / 32)  # Adam's temporary, at the update
    assert hsdp.samples_per_step == 64
    # all-gathers (2 + 2 B) and a reduce-scatter (4 B) over 32, then the fp32 1/32 shard all-reduced over 2
    volume = 31 / 32 * 8 * PSI + 2 * 1 / 2 * 4 * PSI / 32
    assert hsdp.comm_s == pytest.approx(volume / 50e9)


def test_fsdp_x_tp_shards_what_each_tp_rank_holds():
    rows = _rows(layouts=[sharded.Layout(shard=32, tp=2)])
    two_d = rows["fsdp x tp 32x2"]
    local = PSI - 64 * BLOCK_LINEAR / 2  # 3.756e9 on each tp rank
    assert local == 3_756_000_000
    assert _states(two_d) == pytest.approx(16 * local / 32)  # 1.878 GB
    block = BLOCK - BLOCK_LINEAR / 2  # 58,687,500
    assert two_d.temp_b == pytest.approx(8 * block) and two_d.step_temp_b == pytest.approx(4 * local / 32)
    assert two_d.act_b == pytest.approx(1e8 * (0.5 + 0.5 / 2))
    fsdp = 31 / 32 * 8 * local / 50e9
    tp = 4 * 64 * 2 * 1 / 2 * (2048 * 4096 * 2) / 50e9  # 4 bf16 all-reduces per block over 2 ranks
    assert two_d.comm_s == pytest.approx(fsdp + tp)
    assert two_d.samples_per_step == 32


def test_pp_x_fsdp_x_tp_keeps_the_stage_gathered_over_micro_batches():
    three_d = _rows(layouts=[sharded.Layout(shard=16, tp=2, pp=2, reshard=False)])["pp x fsdp x tp 2x16x2"]
    stage = 3_756_000_000 / 2  # half the blocks of one tp rank
    assert three_d.params_b == pytest.approx(4 * stage / 16)
    assert three_d.optim_b == pytest.approx(8 * stage / 16)
    # torch's pipelining defers the reduce-scatter to the last micro-batch: a full fp32 gradient
    assert three_d.grads_b == pytest.approx(4 * stage / 16 + 4 * stage)
    assert three_d.temp_b == pytest.approx(2 * stage)  # the bf16 stage, gathered
    assert three_d.step_temp_b == pytest.approx(4 * stage / 16)  # Adam's temporary
    assert three_d.bubble == pytest.approx(1 / 9)
    assert three_d.act_b == pytest.approx(1e8 * 0.75 / 2)
    assert three_d.samples_per_step == 16


def test_communication_against_ddp():
    """fp32: 3 x (n-1)/n·4Ψ vs DDP's 2 x; bf16 gathers halve the two all-gathers."""
    fp32, bf16 = _rows(work=FP32), _rows()
    ddp = 2 * 63 / 64 * 4 * PSI / 50e9
    assert fp32["ddp"].comm_s == pytest.approx(ddp)
    assert fp32["fsdp"].comm_s == pytest.approx(1.5 * ddp)
    assert bf16["fsdp"].comm_s == pytest.approx(ddp)  # (2 + 2 + 4) B = DDP's fp32 volume
    kept = _rows(layouts=[sharded.Layout(shard=64, reshard=False)])["fsdp"]
    assert kept.comm_s == pytest.approx(63 / 64 * 6 * PSI / 50e9)  # one all-gather less
    # and its parameters stay gathered from forward to backward: all of them, in bf16
    assert kept.temp_b == pytest.approx(2 * PSI + 4 * BLOCK)


def test_latency_counts_one_collective_per_unit():
    slow = pm.Machine(**{**MACHINE.__dict__, "latency": 1e-5})
    delta = _rows(slow)["fsdp"].comm_s - _rows()["fsdp"].comm_s
    assert delta == pytest.approx(3 * 64 * 63 * 1e-5)  # 2 all-gathers + 1 reduce-scatter, 64 units


def test_accumulation_keeps_the_full_unsharded_gradient():
    work = pm.Workload(**{**BF16.__dict__, "accum": 4})
    fsdp = _rows(work=work)["fsdp"]
    assert fsdp.grads_b == pytest.approx(4 * PSI / 64 + 4 * PSI)  # no_sync: fp32, whole model
    gathers, reduce = 63 / 64 * 4 * PSI, 63 / 64 * 4 * PSI
    assert fsdp.comm_s == pytest.approx((4 * gathers + reduce) / 50e9)


def test_cpu_offload_leaves_gathered_blocks_and_activations_on_the_device():
    fsdp = _rows(layouts=[sharded.Layout(shard=64, offload=True)])["fsdp"]
    assert fsdp.params_b == fsdp.grads_b == fsdp.optim_b == 0
    assert fsdp.memory_b == pytest.approx(1e8 + 937_500_000)
    assert "cpu offload: 2.34 GB of shards" in fsdp.note  # 1.875 GB of shards + Adam's 0.469 GB temporary


@pytest.mark.parametrize("n,names", [
    (1, ["fsdp"]), (2, ["fsdp"]),
    (4, ["fsdp", "hsdp 2x2", "fsdp x tp 2x2"]),
    (8, ["fsdp", "hsdp 2x4", "fsdp x tp 4x2", "pp x fsdp x tp 2x2x2"]),
])
def test_layouts_listed_where_the_degrees_fit(n, names):
    assert [layout.name for layout in sharded.layouts(n)] == names


def test_stated_degrees_replace_the_defaults():
    assert [x.name for x in sharded.layouts(8, tp=4, replicate=4)] == ["fsdp", "hsdp 4x2", "fsdp x tp 2x4"]
    assert [x.name for x in sharded.layouts(8, tp=1)] == ["fsdp", "hsdp 2x4"]
    # an integer must divide the shard group (4 here); the 3-D row keeps the stage gathered
    assert [x.reshard for x in sharded.layouts(8, reshard=8)] == [8, True, True, False]
    assert sharded.Layout(shard=2, replicate=2, tp=2).name == "hsdp x tp 2x2x2"


def test_probe_finds_the_units_fsdp_wraps():
    from disttrain.plan import probe
    from disttrain.plan.core import compose

    facts = probe.model_facts(compose(["trainer.precision=bf16"]), 32)
    # the MLP (32 -> 128 -> 128 -> 128 -> 1): each Linear is a unit, all four in the tp plan's pairs
    assert facts.units == ((4224, 4096), (16512, 16384), (16512, 16384), (129, 128))
    assert 0 < facts.act_lowp_per_sample < facts.act_bytes_per_sample
    gpt = probe.model_facts(compose(["experiment=gpt_text"]), 4)
    assert gpt.units[-1] == (16512, 0)  # the LM head: a unit tensor parallelism leaves replicated
    assert gpt.act_lowp_per_sample == 0  # fp32 run: not measured


def _plan(capsys, nproc, *extra):
    from disttrain.plan.cli import main

    code = main([f"dist.nproc_per_node={nproc}", "plan.device_memory=8GB", "plan.bandwidth=10Gbps",
                 "plan.peak_flops=1e12", "plan.efficiency=0.3", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return {line.split("  ")[0]: line.split()[len(line.split("  ")[0].split()):] for line in out.splitlines()}


def test_plan_lists_the_sharded_rows_at_4_ranks(capsys):
    rows = _plan(capsys, 4)
    assert "pp x fsdp x tp 2x2x2 m=8" not in rows
    # the default MLP, 37,377 parameters, momentum SGD: (4 + 4 + 4) B / 4 ranks, like ZeRO-3
    assert rows["fsdp"][:6] == rows["zero3"][:6] == ["37.4", "KB", "37.4", "KB", "37.4", "KB"]
    # fp32 gathers of the largest unit (16,512): 4 x 2 (current + prefetched) + 4 (reduce-scatter input)
    assert rows["fsdp"][8:10] == ["198", "KB"]
    assert rows["hsdp 2x2"][:2] == ["74.8", "KB"]  # 4 x 37,377 / 2
    assert rows["fsdp x tp 2x2"][:2] == ["37.8", "KB"]  # 4 x (37,377 - 36,992 / 2) / 2


def test_plan_lists_the_3d_row_at_8_ranks_in_the_run_precision(capsys):
    rows = _plan(capsys, 8, "trainer.precision=bf16", "optim=adamw")
    for name in ("fsdp", "hsdp 2x4", "fsdp x tp 4x2", "pp x fsdp x tp 2x2x2 m=8"):
        assert rows[name][16] == "yes", rows[name]
    # Adam, bf16: (4 + 4 + 8) B / 8 shards; gathered 2 x 2 + 4 B per largest-unit parameter
    assert rows["fsdp"][:6] == ["18.7", "KB", "18.7", "KB", "37.4", "KB"]
    assert rows["fsdp"][8:12] == ["132", "KB", "18.7", "KB"]  # 8 x 16,512; Adam's 4 x 37,377 / 8 temporary
