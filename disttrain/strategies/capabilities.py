"""What each strategy can honour, declared on the strategy class and checked before any
worker starts: an unsupported combination is refused with one line naming both settings
and why, never silently ignored."""
from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

PRECISIONS = ("32", "bf16", "fp16")
CHECKPOINTING = ("none", "full", "every_n")
OFFLOAD = ("none", "cpu", "disk")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """Supported values per feature; ``why`` explains each refusal (feature -> reason)."""

    precision: tuple[str, ...] = PRECISIONS
    grad_clip: bool = True
    grad_accum: bool = True
    activation_checkpointing: tuple[str, ...] = CHECKPOINTING
    activation_offload: tuple[str, ...] = OFFLOAD
    evaluation: bool = True
    compile: bool = True
    why: dict[str, str] = dataclasses.field(default_factory=dict)


def requested(cfg: DictConfig) -> dict[str, Any]:
    """The feature settings of a run, by capability name (absent keys mean 'off')."""
    from disttrain.strategies.precision import configured

    def get(key: str, default: Any) -> Any:
        return OmegaConf.select(cfg, key, default=default)

    return {"precision": configured(cfg), "grad_clip": get("trainer.grad_clip", None),
            "grad_accum": int(get("trainer.grad_accum_steps", 1)),
            "activation_checkpointing": str(get("memory.activation_checkpointing", "none")),
            "activation_offload": str(get("memory.activation_offload", "none")),
            "evaluation": int(get("trainer.eval_every", 0) or 0), "compile": bool(get("trainer.compile", False))}


_KEYS = {"precision": "trainer.precision", "grad_clip": "trainer.grad_clip", "grad_accum": "trainer.grad_accum_steps",
         "activation_checkpointing": "memory.activation_checkpointing",
         "activation_offload": "memory.activation_offload", "evaluation": "trainer.eval_every",
         "compile": "trainer.compile"}
_WHY: dict[str, str] = {}
_OFF = {"precision": "32", "grad_clip": None, "grad_accum": 1, "activation_checkpointing": "none",
        "activation_offload": "none", "evaluation": 0, "compile": False}


def refusal(strategy: str, caps: Capabilities, want: dict[str, Any]) -> str | None:
    """The one-line refusal for the first unsupported setting, or None when all are honoured."""
    for feature, value in want.items():
        allowed = getattr(caps, feature)
        ok = value in allowed if isinstance(allowed, tuple) else (allowed or value == _OFF[feature])
        if not ok:
            shown = value if not isinstance(value, bool) else str(value).lower()
            reason = caps.why.get(feature) or _WHY.get(feature, "not implemented for this strategy")
            fix = f"use one of {', '.join(allowed)}" if isinstance(allowed, tuple) else f"leave {_KEYS[feature]} off"
            return f"strategy={strategy} does not support {_KEYS[feature]}={shown}: {reason}; {fix}."
    return None
