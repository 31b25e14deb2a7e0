"""The planner's cost model: memory per rank and step time per strategy, from a few facts
about the model and the machine. Pure functions, no torch: unit-testable formulas.

Memory follows the ZeRO paper's accounting with fp32 training: parameters 4Ψ, gradients
4Ψ, optimizer state KΨ bytes (K = 8 for Adam's two moments, 4 for momentum SGD, 0 for
plain SGD), plus activations saved for backward. Step time = compute (model FLOPs over
peak x efficiency) + communication (ring all-reduce 2(n-1)/n·S/B plus 2(n-1) latencies),
and for pipelines the GPipe bubble (p-1)/(m+p-1). The FSDP / HSDP / 2-D / 3-D rows
(``plan.sharded``) follow ``trainer.precision`` as FSDP2 stores it.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ModelFacts:
    params: int                    # Ψ
    linear_params: int             # Ψ inside Linear layers (what tensor parallelism shards)
    flops_per_sample: float        # forward + backward
    act_bytes_per_sample: float    # saved for backward, one sample
    boundary_bytes_per_sample: float  # one block's output: what crosses a pipeline/TP boundary
    blocks: int                    # repeated blocks (TP all-reduces per block)
    tp_replicated_act: float = 0.5  # share of activations tensor parallelism cannot shard
    # FSDP units (the blocks fully_shard wraps): (params, tp-sharded Linear weights) each;
    # () = `blocks` equal ones
    units: tuple[tuple[int, int], ...] = ()
    act_lowp_per_sample: float = 0.0  # activations under trainer.precision bf16/fp16 (0: as fp32)


@dataclasses.dataclass
class Machine:
    nproc: int
    device_memory: float           # bytes per rank
    bandwidth: float               # bytes/s per rank link
    latency: float                 # seconds per message hop
    peak_flops: float              # per rank
    efficiency: float              # achieved/peak for this model's kernels
    micro_efficiency: float = 0.0  # the same at a pipeline micro-batch (0: use efficiency)
    update_s: float = 0.0          # optimizer update of all parameters on one rank (seconds)


@dataclasses.dataclass
class Workload:
    batch: int                     # per rank, per micro-step (data.batch_size)
    accum: int = 1
    micro_batches: int = 8         # pipeline m
    optim_bytes: int = 8           # K
    precision: str = "32"          # trainer.precision: 32 | bf16 | fp16


@dataclasses.dataclass
class Prediction:
    strategy: str
    params_b: float
    grads_b: float
    optim_b: float
    act_b: float
    compute_s: float
    comm_s: float
    bubble: float
    samples_per_step: float
    update_s: float = 0.0          # optimizer update (after the pipeline drains; not in the bubble)
    temp_b: float = 0.0            # transient buffers (optimizer temporaries, DDP bucket rebuild)
    fits: bool = True
    note: str = ""

    @property
    def memory_b(self) -> float:
        return self.params_b + self.grads_b + self.optim_b + self.act_b + self.temp_b

    @property
    def step_s(self) -> float:
        return self.compute_s / (1.0 - self.bubble) + self.update_s + self.comm_s

    @property
    def samples_per_s(self) -> float:
        return self.samples_per_step / self.step_s if self.step_s > 0 else 0.0


def human(nbytes: float) -> str:
    """Bytes as the table prints them (powers of ten, three digits)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def allreduce_s(nbytes: float, n: int, machine: Machine) -> float:
    """Ring all-reduce: each rank sends and receives 2(n-1)/n·S in 2(n-1) messages."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / machine.bandwidth + 2 * (n - 1) * machine.latency


def zero_memory(stage: int, psi: int, n: int, k: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per rank for ZeRO stage 0..3 (fp32, K bytes/param)."""
    params = 4.0 * psi / (n if stage >= 3 else 1)
    grads = 4.0 * psi / (n if stage >= 2 else 1)
    optim = float(k) * psi / (n if stage >= 1 else 1)
    return params, grads, optim


def optimizer_temp(psi_local: float, k: int) -> float:
    """torch's multi-tensor Adam(W) builds one fp32 temporary per parameter (the bias-
    corrected sqrt of the second moment); SGD's momentum update is in place."""
    return 4.0 * psi_local if k == 8 else 0.0


def _compute_s(m: ModelFacts, machine: Machine, samples: float, shards: int = 1, micro: bool = False) -> float:
    efficiency = machine.micro_efficiency if micro and machine.micro_efficiency else machine.efficiency
    return m.flops_per_sample * samples / shards / (machine.peak_flops * efficiency)


def _data_parallel(name: str, stage: int, m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    n, samples = machine.nproc, w.batch * w.accum
    params, grads, optim = zero_memory(stage, m.params, n, w.optim_bytes)
    volume = 4.0 * m.params * (1.5 if stage == 3 else 1.0)  # stage 3 gathers parameters again in backward
    update = machine.update_s / (n if stage >= 1 else 1)  # ZeRO >= 1: each rank updates its shard
    # DDP rebuilds its gradient buckets after the first step: old and new coexist briefly
    rebuild = 4.0 * m.params if (stage == 0 and n > 1) else 0.0
    temp = optimizer_temp(m.params / (n if stage >= 1 else 1), w.optim_bytes) + rebuild
    return Prediction(name, params, grads, optim, m.act_bytes_per_sample * w.batch,
                      _compute_s(m, machine, samples), allreduce_s(volume, n, machine), 0.0, samples * n, update, temp)


def single(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    one = dataclasses.replace(machine, nproc=1)
    return _data_parallel("single (1 rank)", 0, m, one, w)


def pipeline(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    """p = n stages over one batch of ``batch`` split into m micro-batches (GPipe)."""
    p, mb = machine.nproc, w.micro_batches
    samples = w.batch * w.accum
    # every micro-batch's activation crosses each boundary forward and its gradient backward
    comm = 2 * (m.boundary_bytes_per_sample * samples / machine.bandwidth + mb * w.accum * machine.latency)
    pred = Prediction(f"pipeline m={mb}", 4.0 * m.params / p, 4.0 * m.params / p, w.optim_bytes * m.params / p,
                      m.act_bytes_per_sample * w.batch / p, _compute_s(m, machine, samples, p, micro=True),
                      comm if p > 1 else 0.0, (p - 1) / (mb + p - 1), samples, machine.update_s / p,
                      optimizer_temp(m.params / p, w.optim_bytes))
    if w.batch % mb:
        pred.fits, pred.note = False, f"data.batch_size={w.batch} not divisible by m={mb}"
    return pred


def tensor_parallel(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    """Megatron-style: Linear weights sharded n ways; two all-reduces of a block's output
    per block forward and two backward."""
    t, samples = machine.nproc, w.batch * w.accum
    psi = m.params - m.linear_params + m.linear_params / t
    act = m.act_bytes_per_sample * w.batch * (m.tp_replicated_act + (1 - m.tp_replicated_act) / t)
    comm = 4 * m.blocks * w.accum * allreduce_s(m.boundary_bytes_per_sample * w.batch, t, machine)
    return Prediction("tensor parallel", 4.0 * psi, 4.0 * psi, w.optim_bytes * psi, act,
                      _compute_s(m, machine, samples, t), comm, 0.0, samples, machine.update_s / t,
                      optimizer_temp(psi, w.optim_bytes))


def param_server(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    """One server (parameters + optimizer) and n-1 workers; each worker step pushes the
    gradients and pulls the parameters, and the server's link carries all workers' traffic."""
    n, samples = machine.nproc, w.batch * w.accum
    workers = max(n - 1, 1)
    compute = _compute_s(m, machine, samples)
    per_worker = 2 * (4.0 * m.params / machine.bandwidth + machine.latency)
    # the server's link and its updates serve every worker: past some count they are the limit
    comm = max(per_worker, workers * (per_worker + machine.update_s) - compute)
    optim, act = w.optim_bytes * m.params, m.act_bytes_per_sample * w.batch
    # per rank = the larger role: the server (optimizer state) or a worker (activations)
    server_role = optim >= act
    pred = Prediction("param_server", 4.0 * m.params, 4.0 * m.params, optim if server_role else 0.0,
                      0.0 if server_role else act, compute, comm, 0.0, samples * workers)
    if n < 2:
        pred.fits, pred.note = False, "needs >= 2 ranks (1 server + workers)"
    return pred


def predict_all(m: ModelFacts, machine: Machine, w: Workload, sharded: list[Prediction] = ()) -> list[Prediction]:
    """Every strategy at ``machine.nproc`` ranks (plus the one-rank reference); marks those
    over ``device_memory``. ``sharded``: the FSDP rows (``plan.sharded.predict_rows``), listed
    after ZeRO (that module builds on this one, so they are passed in)."""
    preds = [single(m, machine, w), _data_parallel("ddp", 0, m, machine, w)]
    preds += [_data_parallel(f"zero{s}", s, m, machine, w) for s in (1, 2, 3)]
    preds += list(sharded)
    preds += [pipeline(m, machine, w), tensor_parallel(m, machine, w), param_server(m, machine, w)]
    for pred in preds:
        if pred.memory_b > machine.device_memory:
            pred.fits = False
            pred.note = (pred.note + "; " if pred.note else "") + "does not fit"
    return preds


def recommend(preds: list[Prediction]) -> Prediction | None:
    """The fitting strategy with the highest throughput; on a tie the simpler one (listed
    first: ddp before ZeRO), since sharding buys memory, not speed, here."""
    fitting = [(i, p) for i, p in enumerate(preds) if p.fits]
    if not fitting:
        return None
    return max(fitting, key=lambda ip: (round(ip[1].samples_per_s, 6), -ip[0]))[1]
