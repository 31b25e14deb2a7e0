"""A checkpoint knows what wrote it: strategy, degrees, world size, precision and the model.

Recorded in the manifest; on resume, a different strategy or layout is resharded (DCP keys
are the unsplit model's FQNs, optimizer state included) and reported in one line, while a
different *model* is refused in one line naming the keys that differ, before DCP would fail
on a missing key deep inside a load.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


#: the start of compare()'s message when only the model weights can be carried over
WEIGHTS_ONLY = "model weights only"


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def model_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else {}


def strategy_name(cfg: DictConfig) -> str:
    """``ddp``, ``pipeline``, ``model_parallel:tensor``... (a user's own strategy: its target)."""
    target = str(cfg.strategy._target_)
    if not target.startswith("disttrain.strategies."):
        return target
    name = target.rsplit(".", 2)[-2]
    return f"{name}:{cfg.strategy.get('mode', 'layer')}" if name == "model_parallel" else name


def _digest(model: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe(cfg: DictConfig, strategy: Any, world_size: int) -> dict[str, Any]:
    """What the manifest records about the run that writes a checkpoint."""
    model = model_config(cfg)
    digest = _digest(model)
    dp = strategy.data_shard()[1] if hasattr(strategy, "data_shard") else world_size
    return {"strategy": strategy_name(cfg), "world_size": world_size,
            "degrees": {"dp": dp, **{axis: OmegaConf.select(cfg, f"dist.{axis}", default=None) for axis in ("pp", "tp")}},
            "precision": str(cfg.trainer.precision), "model_class": str(model.get("_target_", "")),
            "model_hash": digest, "model": model}


def _other_model(written: dict[str, Any], model: dict[str, Any], directory: Any) -> str | None:
    if written.get("model_hash") in (None, _digest(model)):
        return None
    there, here = _flat(written.get("model", {})), _flat(model)
    diff = [f"model.{k}={there.get(k)!r} there, {here.get(k)!r} here"
            for k in sorted(set(there) | set(here)) if there.get(k) != here.get(k)]
    return (f"checkpoint {directory} was written for another model ({'; '.join(diff[:4]) or 'model config differs'}): "
            "resume with the model it was written for, or start a new run dir (hydra.run.dir=...).")


def refuse_other_model(cfg: DictConfig, run_dir: Path) -> None:
    """Before any worker starts: the checkpoint this run would resume from was written for
    the configured model (read from its manifest; the full check runs again at restore)."""
    from disttrain.checkpoint.manifest import MANIFEST, read_manifest, step_dirs
    from disttrain.config.errors import ConfigError

    resume = str(OmegaConf.select(cfg, "checkpoint.resume", default="auto"))
    if resume == "never":
        return
    own = [d for d in step_dirs(Path(run_dir) / "checkpoints") if (d / MANIFEST).is_file()]
    directory = own[0] if own else (Path(resume) if resume != "auto" and (Path(resume) / MANIFEST).is_file() else None)
    if directory is None:
        return
    try:
        written = read_manifest(directory).get("writer", {})
    except ValueError:  # unreadable: the restore skips it with the reason
        return
    refusal = _other_model(written, model_config(cfg), directory)
    if refusal:
        raise ConfigError(refusal)


def _layout(writer: dict[str, Any]) -> str:
    degrees = ", ".join(f"{k} {v}" for k, v in writer.get("degrees", {}).items() if v is not None)
    return f"{writer.get('strategy')} on {writer.get('world_size')} rank(s) ({degrees})"


def compare(written: dict[str, Any], now: dict[str, Any], directory: Any) -> tuple[str | None, str | None]:
    """(the resharding to report or None, the refusal or None) for resuming ``written`` as ``now``."""
    if not written:  # a checkpoint from before manifests recorded their writer
        return None, None
    refusal = _other_model(written, now["model"], directory)
    if refusal:
        return None, refusal
    if now["strategy"] == "deepspeed" and written.get("strategy") != "deepspeed":
        return None, (f"checkpoint {directory} was written by {written.get('strategy')} and this run is "
                      "deepspeed, whose engine reads only its own format: resume with the strategy that wrote "
                      "it (or any other but deepspeed), or export the weights (disttrain export RUN_DIR) and "
                      "start a new run from them.")
    if written.get("strategy") == "deepspeed" and now["strategy"] != "deepspeed":
        return (f"{WEIGHTS_ONLY}: checkpoint {getattr(directory, 'name', directory)} is DeepSpeed's own format; "
                f"{now['strategy']} loads its model weights, step and data position, and the optimizer "
                "state starts again"), None
    changes = [key for key in ("strategy", "world_size", "degrees", "precision") if written.get(key) != now.get(key)]
    if not changes:
        return None, None
    return f"resharding {directory.name if hasattr(directory, 'name') else directory}: written by {_layout(written)} " \
           f"at precision {written.get('precision')}, resumed as {_layout(now)} at precision {now['precision']}", None
