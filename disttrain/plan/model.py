"""The planner's cost model: memory per rank and step time per strategy, from a few facts
about the model and the machine. Pure functions, no torch: unit-testable formulas.

Memory follows the ZeRO paper's accounting, with the bytes each engine really stores for
``trainer.precision`` (``state_bytes``): parameters, gradients, optimizer state (K = 8 for
Adam's two moments, 4 for momentum SGD, 0 for plain SGD, plus DeepSpeed's fp32 master
copy), activations saved for backward (per pipeline schedule), transients, a fixed
framework term measured once per host, and (CPU) the code the model's own kernels page in
beyond the calibration model's (``plan.pages``). Step time = compute (model FLOPs over peak x
efficiency) + communication (per-collective latency + bytes / bandwidth, ring volumes) +
the pipeline bubble (p-1)/(m+p-1) (less where ranks outnumber cores: ``pipeline_bubble``) + the
training loop's own per-step overhead. The FSDP /
HSDP / 2-D / 3-D rows (``plan.sharded``) follow ``trainer.precision`` as FSDP2 stores it.
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
    tp_share: float = 1.0          # compute time share TP divides (plan/tp_share.py); the rest replicated


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
    # measured per collective: {"allreduce" | "allgather" | "p2p": (latency s, bandwidth B/s)};
    # a missing one falls back to (latency, bandwidth)
    links: dict = dataclasses.field(default_factory=dict)
    overhead_s: float = 0.0        # the training loop's own time per step (data, observer, hooks)
    base_b: float = 0.0            # framework memory per rank a run adds to its model's bytes
    code_b: float = 0.0            # code the model's kernels page in beyond the calibration's (CPU: plan.pages)
    shared_host: bool = False      # all ranks on this host: param_server exchanges through shared memory
    slots: float = 0.0             # ranks this host runs at full speed at once (CPU: cores / threads); 0: one each

    def link(self, op: str) -> tuple[float, float]:
        return self.links.get(op, (self.latency, self.bandwidth))


@dataclasses.dataclass
class Workload:
    batch: int                     # per rank, per micro-step (data.batch_size)
    accum: int = 1
    micro_batches: int = 8         # pipeline m
    optim_bytes: int = 8           # K
    precision: str = "32"          # trainer.precision: 32 | bf16 | fp16
    schedule: str = "1f1b"         # pipeline schedule: gpipe keeps every micro-batch's activations
    staleness: int | None = 4      # param_server's max_staleness (None: fully asynchronous)


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
    temp_b: float = 0.0            # transients next to the activations (buckets, gathered blocks, DDP rebuild)
    fits: bool = True
    note: str = ""
    base_b: float = 0.0            # the host's framework term (Machine.base_b)
    overhead_s: float = 0.0        # the loop's per-step time (Machine.overhead_s)
    step_temp_b: float = 0.0       # transients of the optimizer step, after backward freed the activations
    code_b: float = 0.0            # the model's kernel code beyond the calibration's (Machine.code_b)

    @property
    def memory_b(self) -> float:
        """Model states + the larger of the two peaks (end of forward / during backward:
        activations + their transients; the update: its temporaries) + the framework term
        + the model's kernel code (CPU: resident pages of the library code its step runs)."""
        peak = max(self.act_b + self.temp_b, self.step_temp_b)
        return self.params_b + self.grads_b + self.optim_b + peak + self.base_b + self.code_b

    @property
    def step_s(self) -> float:
        return self.compute_s / (1.0 - self.bubble) + self.update_s + self.comm_s + self.overhead_s

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
    latency, bandwidth = machine.link("allreduce")
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def p2p_s(nbytes: float, messages: float, machine: Machine) -> float:
    """Point-to-point sends (pipeline boundaries): latency per message + bytes / bandwidth."""
    latency, bandwidth = machine.link("p2p")
    return nbytes / bandwidth + messages * latency


ENGINES = {"single": "torch", "ddp": "torch", "zero1": "deepspeed", "zero2": "deepspeed", "zero3": "deepspeed"}


def state_bytes(engine: str, precision: str, stage: int, psi: float, n: int, k: int) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer state) bytes per rank as each engine stores them.

    torch (disttrain's single, ddp, pipeline, tensor parallel, parameter server): autocast
    keeps fp32 parameters and gradients whatever ``trainer.precision`` (4 + 4 + K).
    deepspeed, bf16/fp16: 2-byte parameters and gradients, the optimizer holds an fp32
    master copy next to its K bytes (ZeRO paper: 2 + 2 + 12 for Adam); fp32: 4-byte
    parameters and gradients, and stages 1-2 still clone their fp32 partition as the
    optimizer's own (stage 3 updates the partition in place). Stage s >= 1 shards the
    optimizer, >= 2 the gradients, 3 the parameters over n ranks.
    """
    if engine == "torch":
        return 4.0 * psi, 4.0 * psi, float(k) * psi
    low = precision in ("bf16", "fp16")
    width = 2.0 if low else 4.0
    master = 4.0 if (low or stage in (1, 2)) else 0.0
    params = width * psi / (n if stage >= 3 else 1)
    grads = width * psi / (n if stage >= 2 else 1)
    optim = (k + master) * psi / (n if stage >= 1 else 1)
    return params, grads, optim


def zero_memory(stage: int, psi: int, n: int, k: int, precision: str = "32") -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes per rank for ZeRO stage 0..3: stage 0 is torch DDP,
    1-3 DeepSpeed's ZeRO (``state_bytes``)."""
    return state_bytes("torch" if stage == 0 else "deepspeed", precision, stage, psi, n, k)


def pipeline_activations(act_per_sample: float, batch: int, p: int, m: int, schedule: str) -> float:
    """Saved activations on the busiest (first) stage, which holds 1/p of the model: GPipe
    runs all m forwards before the first backward (m micro-batches of batch/m samples =
    the whole batch); 1F1B (and the interleaved / zero-bubble schedules, which keep the
    same bound per rank) starts a backward once p forwards are in flight: min(p, m)."""
    in_flight = m if schedule == "gpipe" else min(p, m)
    return act_per_sample * batch / m / p * in_flight


def optimizer_temp(psi_local: float, k: int) -> float:
    """torch's multi-tensor Adam(W) builds one fp32 temporary per parameter (the bias-
    corrected sqrt of the second moment); SGD's momentum update is in place."""
    return 4.0 * psi_local if k == 8 else 0.0


def _compute_s(m: ModelFacts, machine: Machine, samples: float, tp: int = 1, micro: bool = False) -> float:
    """Forward + backward of ``samples`` on one rank; under ``tp`` > 1 ways of tensor
    parallelism only ``m.tp_share`` of it is divided, the rest every TP rank computes."""
    efficiency = machine.micro_efficiency if micro and machine.micro_efficiency else machine.efficiency
    divided = (1.0 - m.tp_share) + m.tp_share / tp if tp > 1 else 1.0
    return m.flops_per_sample * samples * divided / (machine.peak_flops * efficiency)


def autocast_temp(psi_local: float, precision: str) -> float:
    """torch autocast casts each fp32 weight to bf16/fp16 once per forward and keeps the cast
    for backward."""
    return 2.0 * psi_local if precision in ("bf16", "fp16") else 0.0


def _finish(pred: Prediction, machine: Machine, step_temp: float = 0.0) -> Prediction:
    """Adds the host terms and moves the update's temporaries to their own peak."""
    pred.base_b, pred.overhead_s, pred.code_b = machine.base_b, machine.overhead_s, machine.code_b
    pred.step_temp_b = step_temp
    return pred


#: DeepSpeed's default buffer sizes (elements): reduce_bucket_size, stage3_prefetch_bucket_size
DS_REDUCE_BUCKET, DS_PREFETCH = 5e8, 5e7


def deepspeed_buffers(stage: int, psi: float, n: int, width: float) -> tuple[float, float]:
    """(backward transients, update transients) of DeepSpeed's ZeRO with default buckets,
    next to the activations: stages 1-2 flatten the gradients into a reduce bucket of up to
    reduce_bucket_size elements; stage 1 also keeps the averaged fp32 gradient partition,
    stage 2 first copies the gradients into its contiguous buffer (a second bucket); stage 3
    holds the gathered parameters (up to stage3_prefetch_bucket_size) and two buckets of
    unreduced gradients. The update builds the fp32 gradient partition and the optimizer's
    temporary. (Measured on 2 CPU ranks, fp32: within 2-7% of the live peak.)"""
    bucket = width * min(psi, DS_REDUCE_BUCKET)
    partition = 4.0 * psi / n
    if stage == 3:
        backward = width * min(psi, DS_PREFETCH) + 2 * bucket
    elif stage == 2:  # the averaged partition is the gradient shard itself (the grads column)
        backward = 2 * bucket
    else:
        backward = bucket + partition
    return backward, 2 * partition


def _data_parallel(name: str, stage: int, m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    n, samples = machine.nproc, w.batch * w.accum
    engine = ENGINES.get(name, "torch")
    params, grads, optim = state_bytes(engine, w.precision, stage, m.params, n, w.optim_bytes)
    # what the gradient reduction moves: fp32 under torch autocast, the engine's width under DeepSpeed
    width = grads / m.params * (n if stage >= 2 else 1)
    volume = width * m.params * (1.5 if stage == 3 else 1.0)  # stage 3 gathers parameters again in backward
    update = machine.update_s / (n if stage >= 1 else 1)  # ZeRO >= 1: each rank updates its shard
    # DDP rebuilds its gradient buckets at the start of the second step (old and new coexist
    # briefly, before the forward has saved anything): a peak of its own, like the update's
    rebuild = 4.0 * m.params if (stage == 0 and n > 1) else 0.0
    step_temp = max(optimizer_temp(m.params / (n if stage >= 1 else 1), w.optim_bytes), rebuild)
    temp = autocast_temp(m.params, w.precision) if engine == "torch" else 0.0
    if engine == "deepspeed":
        backward, update_temp = deepspeed_buffers(stage, m.params, n, width)
        step_temp = max(step_temp, update_temp)
        if m.params <= DS_REDUCE_BUCKET:  # one bucket: reduced once backward has freed the activations
            step_temp = max(step_temp, backward)
        else:  # full buckets are reduced during backward, next to the activations
            temp += backward
    act = m.act_lowp_per_sample if engine == "deepspeed" and w.precision != "32" and m.act_lowp_per_sample \
        else m.act_bytes_per_sample
    return _finish(Prediction(name, params, grads, optim, act * w.batch, _compute_s(m, machine, samples),
                              allreduce_s(volume, n, machine), 0.0, samples * n, update, temp), machine, step_temp)


def single(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    one = dataclasses.replace(machine, nproc=1)
    return _data_parallel("single (1 rank)", 0, m, one, w)


def largest_stage(m: ModelFacts, p: int) -> float:
    """Parameters of the heaviest of p contiguous stages, split as strategy.balance=params
    does (the heaviest group as small as possible) over the model's units; Ψ/p without them."""
    sizes = [u[0] for u in m.units]
    if p <= 1 or len(sizes) < p or sum(sizes) != m.params:
        return m.params / p
    best = {(0, 0): 0.0}  # (stages used, units used) -> smallest heaviest stage
    for k in range(1, p + 1):
        for i in range(k, len(sizes) + 1):
            best[k, i] = min(max(best[k - 1, j], sum(sizes[j:i])) for j in range(k - 1, i) if (k - 1, j) in best)
    return best[p, len(sizes)]


def pipeline_bubble(p: int, m: int, slots: float = 0.0, ranks_per_stage: int = 1) -> float:
    """Share of a GPipe/1F1B step a stage waits: (p-1)/(m+p-1) with a device per rank. On a
    host with fewer ``slots`` (ranks at full speed at once: cores / threads) than ranks, the
    probe times a stage with every rank busy, but at the pipeline's fill and drain only the
    stages holding a micro-batch run, on the cores the idle ones leave: a step slot with k of
    p stages busy takes max(k r, slots) / (p r) of the probed time (r ranks per stage).
    MLP 4x1024, 4 stages, m=4 on 2 cores: 4.5 probed micro-batch times per pass, not 7
    (measured 51-54 ms a step, modelled 65 without this)."""
    n = p * ranks_per_stage
    if not slots or slots >= n:
        return (p - 1) / (m + p - 1)
    active = [min(t, p - 1) - max(0, t - m + 1) + 1 for t in range(m + p - 1)]  # stages busy in slot t
    span = sum(max(k * ranks_per_stage, slots) for k in active) / n  # in probed micro-batch times
    return 1.0 - m / span


def pipeline(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    """p = n stages over one batch of ``batch`` split into m micro-batches; activations as
    the schedule keeps them (``pipeline_activations``), the bubble (p-1)/(m+p-1) or, on
    fewer cores than ranks, less (``pipeline_bubble``)."""
    p, mb = machine.nproc, w.micro_batches
    samples = w.batch * w.accum
    # every micro-batch's activation crosses each boundary forward and its gradient backward
    comm = 2 * p2p_s(m.boundary_bytes_per_sample * samples, mb * w.accum, machine)
    act = pipeline_activations(m.act_bytes_per_sample, w.batch, p, mb, w.schedule)
    psi = largest_stage(m, p)  # the busiest rank: memory and the slowest stage's compute
    share = psi / m.params
    pred = Prediction(f"pipeline m={mb}", 4.0 * psi, 4.0 * psi, w.optim_bytes * psi,
                      act, _compute_s(m, machine, samples * share, 1, micro=True),
                      comm if p > 1 else 0.0, pipeline_bubble(p, mb, machine.slots), samples,
                      machine.update_s * share,
                      autocast_temp(psi, w.precision))
    if w.batch % mb:
        pred.fits, pred.note = False, f"data.batch_size={w.batch} not divisible by m={mb}"
    return _finish(pred, machine, optimizer_temp(psi, w.optim_bytes))


def tensor_parallel(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    """Megatron-style: Linear weights sharded n ways; two all-reduces of a block's output
    per block forward and two backward."""
    t, samples = machine.nproc, w.batch * w.accum
    psi = m.params - m.linear_params + m.linear_params / t
    act = m.act_bytes_per_sample * w.batch * (m.tp_replicated_act + (1 - m.tp_replicated_act) / t)
    comm = 4 * m.blocks * w.accum * allreduce_s(m.boundary_bytes_per_sample * w.batch, t, machine)
    return _finish(Prediction("tensor parallel", 4.0 * psi, 4.0 * psi, w.optim_bytes * psi, act,
                              _compute_s(m, machine, samples, t), comm, 0.0, samples, machine.update_s / t,
                              autocast_temp(psi, w.precision)), machine, optimizer_temp(psi, w.optim_bytes))


def param_server(m: ModelFacts, machine: Machine, w: Workload) -> Prediction:
    """One server (parameters + optimizer) and n-1 workers; each worker step pushes the
    gradients and pulls the parameters, and the server's link and updates serve every
    worker in turn. Over a network, synchronous (max_staleness=0) a worker waits for its own
    round trip; with bounded staleness its pushes and pulls overlap its next steps, and only
    a server busier than one step of compute shows. A lone worker (2 ranks) waits for its
    round trip whatever the bound: each of its pushes closes a step.

    On one host the exchange is memory copies (disttrain.ps.shm), and equal workers run in
    rounds whatever the bound: the server answers a pull with the step the worker's own push
    is about to close rather than the weights it holds (``ps.server._waits_for_step``), so a
    step is the workers' gradients, computed at once, then the server's update alone.
    Measured (MLP 4x1024, AdamW, 2 cores): staleness 0 throughout; 3 workers + 1 server
    step 36-40 ms at 4 samples and 53-58 ms at 64, i.e. compute with 3 processes on the 2
    cores + the update; the overlapped form (compute + max(update - compute, 0)) gave
    -20...-34% on that row in five runs."""
    n, samples = machine.nproc, w.batch * w.accum
    workers = max(n - 1, 1)
    synchronous = w.staleness == 0 or workers == 1
    compute = _compute_s(m, machine, samples)
    if machine.shared_host:
        update = machine.update_s
        if machine.slots and n > machine.slots:
            # the probe timed all n ranks busy at once; in a round the workers compute together
            # (a core each while they fit), then the server updates with a core of its own
            compute *= max(workers, machine.slots) / n
            update *= machine.slots / n
        comm = update
    else:
        per_worker = 2 * p2p_s(4.0 * m.params, 1, machine)
        server = workers * (per_worker + machine.update_s)
        if synchronous:
            comm = max(per_worker + machine.update_s, server - compute)
        else:
            comm = max(server - compute, 0.0)
    optim, act = w.optim_bytes * m.params, m.act_bytes_per_sample * w.batch
    # per rank = the larger role. The server: the model, the step being summed, the optimizer
    # state, and (one host) every worker's parameter and gradient buffers it reads and writes
    # in shared memory (disttrain.ps.shm: resident in its process too, though the pages are
    # the workers'). A worker: the model, its gradients, its activations.
    # (over TCP instead: one received gradient per other worker in flight)
    shared = 8.0 * m.params * workers if machine.shared_host else 4.0 * m.params * (workers - 1)
    server_role = optim + shared >= act
    pred = Prediction("param_server", 4.0 * m.params, 4.0 * m.params, optim if server_role else 0.0,
                      0.0 if server_role else act, compute, comm, 0.0, samples * workers,
                      temp_b=shared if server_role else 0.0)
    if n < 2:
        pred.fits, pred.note = False, "needs >= 2 ranks (1 server + workers)"
    return _finish(pred, machine, optimizer_temp(m.params, w.optim_bytes) if server_role else 0.0)


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
