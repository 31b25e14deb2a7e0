"""The planner's sharded rows: FSDP (torch FSDP2 ``fully_shard`` per block, then the root),
HSDP, FSDP x tensor parallel (2-D) and pipeline x FSDP x tensor parallel (3-D). Pure
functions, no torch; the bytes are the ones FSDP2 really holds, so the rows follow
``trainer.precision`` rather than the fp32 accounting of the other rows:

* shards: parameters, gradients and optimizer state, 1/shard each and always fp32, so
  (4 + 4 + K)Ψ/n: the ZeRO-3 figure (for Adam the same 16 bytes as the ZeRO paper's mixed
  precision (2 + 2 + 12)Ψ/n);
* gathered units (transient): bf16/fp16 runs gather 2-byte parameters (MixedPrecisionPolicy)
  and reduce-scatter gradients in fp32. At the peak of backward a rank holds the root's
  gathered parameters and gradients (from its forward to the end of backward), the current
  block's and the prefetched next block's parameters and the current block's fp32
  reduce-scatter input (FSDP2 reshards a block before it reduces it);
* gradient accumulation (``no_sync``) keeps the full unsharded gradient, fp32, per rank;
* communication per step: an all-gather in forward and again in backward (when resharding)
  per micro-step, one reduce-scatter; HSDP adds an all-reduce of the gradient shard across
  the replicas; tensor parallelism adds its activation all-reduces.
"""
from __future__ import annotations

import dataclasses

from disttrain.plan.model import (Machine, ModelFacts, Prediction, Workload, _compute_s, _finish, allreduce_s,
                                  human, optimizer_temp, p2p_s, pipeline_bubble)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One row's degrees: dp = replicate x shard, tp, pp (their product is the world size)."""
    shard: int                  # dist.dp_shard: the ranks one FSDP group shards over
    replicate: int = 1          # dist.dp_replicate (HSDP)
    tp: int = 1
    pp: int = 1
    reshard: bool | int = True  # strategy.reshard_after_forward
    offload: bool = False       # strategy.cpu_offload

    @property
    def dp(self) -> int:
        return self.replicate * self.shard

    @property
    def name(self) -> str:
        dp, dims = ("hsdp", [self.replicate, self.shard]) if self.replicate > 1 else ("fsdp", [self.shard])
        axes = (["pp"] if self.pp > 1 else []) + [dp] + (["tp"] if self.tp > 1 else [])
        sizes = ([self.pp] if self.pp > 1 else []) + dims + ([self.tp] if self.tp > 1 else [])
        if axes == ["fsdp"]:
            return "fsdp"
        return " x ".join(axes) + " " + "x".join(str(s) for s in sizes)


def dtype_bytes(precision: str) -> tuple[int, int]:
    """(gathered parameter bytes, gradient reduce bytes): FSDP2's policy computes and gathers
    in bf16/fp16 but reduces in fp32."""
    return (4 if precision == "32" else 2), 4


def local_params(m: ModelFacts, tp: int) -> float:
    """Parameters one tensor-parallel rank holds: Linear weights split tp ways."""
    return m.params - m.linear_params + m.linear_params / tp


def units(m: ModelFacts) -> tuple[tuple[float, float], ...]:
    """(params, Linear params) per FSDP unit; without probed units, ``blocks`` equal ones."""
    if m.units:
        return m.units
    n = max(m.blocks, 1)
    return ((m.params / n, m.linear_params / n),) * n


def root_params(m: ModelFacts, tp: int) -> float:
    """What only the root's fully_shard holds (embeddings, head, ... outside the blocks)."""
    params = m.params - sum(p for p, _ in units(m))
    linear = m.linear_params - sum(lin for _, lin in units(m))
    return max(params - linear + linear / tp, 0.0)


def largest_unit(m: ModelFacts, tp: int) -> float:
    return max(p - lin + lin / tp for p, lin in units(m))


def messages(m: ModelFacts) -> int:
    """Collectives per pass: one per unit holding parameters (blocks, and the root's own)."""
    return sum(1 for p, _ in units(m) if p) + (1 if root_params(m, 1) else 0)


def gathered_b(m: ModelFacts, tp: int, precision: str, reshard: bool | int) -> float:
    """Transient device bytes of gathered units at the peak of backward (module docstring).
    reshard_after_forward=false keeps every unit gathered from forward to backward; an
    integer r keeps them sharded over r ranks in between."""
    gather, reduce = dtype_bytes(precision)
    root, block = root_params(m, tp), largest_unit(m, tp)
    held = gather * (root + 2 * block)
    if reshard is False:
        held = gather * local_params(m, tp)
    elif reshard is not True:
        held += gather * (local_params(m, tp) - root) / reshard
    return held + gather * root + reduce * block


def ring_s(nbytes: float, n: int, machine: Machine, count: int = 1) -> float:
    """All-gather or reduce-scatter of ``nbytes`` (the unsharded size) over n ranks, as
    ``count`` collectives: each rank moves (n-1)/n of it in n-1 hops per collective."""
    if n <= 1:
        return 0.0
    latency, bandwidth = machine.link("allgather")
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency * count


def fsdp_comm_s(m: ModelFacts, machine: Machine, w: Workload, layout: Layout, psi: float, count: int) -> float:
    """All-gathers per micro-step (forward; backward too when resharding, within r ranks for
    an integer r), then one reduce-scatter (and the HSDP all-reduce) per step."""
    gather, reduce = dtype_bytes(w.precision)
    forward = ring_s(gather * psi, layout.shard, machine, count)
    within = layout.shard if layout.reshard is True else int(layout.reshard) if layout.reshard else 1
    backward = ring_s(gather * psi, within, machine, count)
    grads = ring_s(reduce * psi, layout.shard, machine, count)
    grads += 2 * ring_s(reduce * psi / layout.shard, layout.replicate, machine, count)
    return w.accum * (forward + backward) + grads


def tp_comm_s(m: ModelFacts, machine: Machine, w: Workload, tp: int, blocks: float, batch: float,
              calls: int) -> float:
    """Megatron: two all-reduces of a block's output in forward and two in backward, per
    block and per call, in the compute precision."""
    size = m.boundary_bytes_per_sample * dtype_bytes(w.precision)[0] / 4 * batch
    return 4 * blocks * calls * allreduce_s(size, tp, machine)


def act_b(m: ModelFacts, w: Workload, tp: int) -> float:
    """Saved activations of one micro-step in the run's precision; TP splits all but the
    replicated share."""
    low = w.precision != "32" and m.act_lowp_per_sample
    per_sample = m.act_lowp_per_sample if low else m.act_bytes_per_sample
    return per_sample * w.batch * (m.tp_replicated_act + (1 - m.tp_replicated_act) / tp if tp > 1 else 1.0)


def fsdp(m: ModelFacts, machine: Machine, w: Workload, layout: Layout) -> Prediction:
    """FSDP, HSDP and FSDP x TP: what each tp rank holds, sharded over dp_shard."""
    psi, shard, tp, k = local_params(m, layout.tp), layout.shard, layout.tp, w.optim_bytes
    samples = w.batch * w.accum
    shards = [4.0 * psi / shard, 4.0 * psi / shard, k * psi / shard, optimizer_temp(psi / shard, k)]
    note = ""
    if layout.offload:
        note = f"cpu offload: {human(sum(shards))} of shards in host memory"
        shards = [0.0] * 4
    unsharded = 4.0 * psi if w.accum > 1 else 0.0  # no_sync accumulates the full gradient
    comm = fsdp_comm_s(m, machine, w, layout, psi, messages(m))
    comm += tp_comm_s(m, machine, w, tp, m.blocks, w.batch, w.accum) if tp > 1 else 0.0
    temp = gathered_b(m, tp, w.precision, layout.reshard)
    return _finish(Prediction(layout.name, shards[0], shards[1] + unsharded, shards[2], act_b(m, w, tp),
                              _compute_s(m, machine, samples, tp), comm, 0.0, samples * layout.dp,
                              machine.update_s * psi / m.params / shard, temp, note=note), machine, shards[3])


def pp_fsdp_tp(m: ModelFacts, machine: Machine, w: Workload, layout: Layout) -> Prediction:
    """3-D: a stage holds 1/pp of the blocks, tp-sharded, FSDP-sharded over dp. torch's
    pipelining keeps a stage's parameters gathered and its gradients unsharded (fp32) until
    the last micro-batch's backward: one all-gather and one reduce-scatter per step."""
    p, tp, mb, k = layout.pp, layout.tp, w.micro_batches, w.optim_bytes
    psi, shard, samples = local_params(m, tp) / p, layout.shard, w.batch * w.accum
    gather, reduce = dtype_bytes(w.precision)
    once = dataclasses.replace(w, accum=1)
    comm = w.accum * fsdp_comm_s(m, machine, once, dataclasses.replace(layout, reshard=False), psi,
                                 max(messages(m) // p, 1))
    comm += tp_comm_s(m, machine, w, tp, m.blocks / p, w.batch / mb, w.accum * mb)
    # every micro-batch's activation crosses each stage boundary forward, its gradient backward
    comm += 2 * p2p_s(m.boundary_bytes_per_sample * gather / 4 * samples, mb * w.accum, machine)
    pred = Prediction(f"{layout.name} m={mb}", 4.0 * psi / shard, 4.0 * psi / shard + reduce * psi,
                      k * psi / shard, act_b(m, w, tp) / p, _compute_s(m, machine, samples / p, tp, micro=True),
                      comm, pipeline_bubble(p, mb, machine.slots, layout.dp * tp), samples * layout.dp,
                      machine.update_s * psi / m.params / shard,
                      gather * psi)
    if w.batch % mb:
        pred.fits, pred.note = False, f"data.batch_size={w.batch} not divisible by m={mb}"
    return _finish(pred, machine, optimizer_temp(psi / shard, k))


def predict(m: ModelFacts, machine: Machine, w: Workload, layout: Layout) -> Prediction:
    return pp_fsdp_tp(m, machine, w, layout) if layout.pp > 1 else fsdp(m, machine, w, layout)


def layouts(n: int, tp: int | None = None, pp: int | None = None, replicate: int | None = None,
            reshard: bool | int = True, offload: bool = False) -> list[Layout]:
    """The sharded rows worth listing at n ranks: FSDP over all of them, HSDP, FSDP x TP and
    PP x FSDP x TP where the degrees divide n and leave >= 2 ranks to shard over. Unset
    degrees default to 2 (a pair of neighbouring ranks); a degree of 1 drops its rows."""
    t, p, r = (2 if d is None else d for d in (tp, pp, replicate))

    def fsdp_layout(shard: int, **degrees) -> Layout:
        keep = reshard if isinstance(reshard, bool) or shard % reshard == 0 else True
        return Layout(shard, reshard=keep, offload=offload, **degrees)

    out = [fsdp_layout(n)]
    if r >= 2 and n % r == 0 and n // r >= 2:
        out.append(fsdp_layout(n // r, replicate=r))
    if t >= 2 and n % t == 0 and n // t >= 2:
        out.append(fsdp_layout(n // t, tp=t))
    if t >= 2 and p >= 2 and n % (t * p) == 0 and n // (t * p) >= 2:
        out.append(Layout(n // (t * p), tp=t, pp=p, reshard=False))
    return out


def predict_rows(m: ModelFacts, machine: Machine, w: Workload, chosen: list[Layout] | None = None) -> list[Prediction]:
    """The sharded rows for ``chosen`` layouts (None: the default ones for ``machine.nproc``)."""
    return [predict(m, machine, w, layout) for layout in (layouts(machine.nproc) if chosen is None else chosen)]
