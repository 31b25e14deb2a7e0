"""What a composition of parallelisms honours: each axis of the mesh (tensor parallel, sharded
data parallel) refuses some features for its own reason, and a strategy that stacks axes
(fsdp x tp, pp x fsdp x tp) honours only what every one of its axes honours."""
from __future__ import annotations

import dataclasses

from disttrain.strategies.capabilities import Capabilities

#: tensor parallelism, whichever strategy applies the plan
TENSOR_PARALLEL = Capabilities(
    activation_offload=("none", "cpu"), compile=False,
    why={"activation_offload": "disk offload writes saved tensors as raw bytes and tensor-parallel activations "
                               "are DTensors (no .numpy())",
         "compile": "compiled tensor-parallel blocks (DTensor) trained the MLP to weights 1e-2 away from eager on "
                    "torch 2.13 (gloo, CPU inductor)"})

#: FSDP2's fully_shard, whichever strategy applies it
SHARDED = Capabilities(
    activation_offload=("none",),
    why={"activation_offload": "its saved-tensor hooks crash FSDP2's backward (a segfault on torch 2.13, gloo); "
                               "use memory.activation_checkpointing instead"})


def because(caps: Capabilities, setting: str) -> Capabilities:
    """``caps`` as one axis of a composition: each reason names the setting that adds the axis."""
    return dataclasses.replace(caps, why={name: f"with {setting}, {reason}" for name, reason in caps.why.items()})


def narrow(*parts: Capabilities) -> Capabilities:
    """What all ``parts`` honour: each feature's values common to all, and the reason of the
    part that narrows the feature most (its own values are the common ones)."""
    default = Capabilities()
    names = [field.name for field in dataclasses.fields(Capabilities) if field.name != "why"]
    merged = {name: _common([getattr(part, name) for part in parts]) for name in names}
    why: dict[str, str] = {}
    for name in names:
        narrowing = [part for part in parts if name in part.why and getattr(part, name) != getattr(default, name)]
        narrowing.sort(key=lambda part: getattr(part, name) != merged[name])
        if narrowing:
            why[name] = narrowing[0].why[name]
    return Capabilities(**merged, why=why)


def _common(values: list):
    if isinstance(values[0], tuple):
        return tuple(v for v in values[0] if all(v in other for other in values[1:]))
    return all(values)
