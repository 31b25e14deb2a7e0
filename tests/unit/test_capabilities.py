"""Every strategy x feature combination is honoured or refused before any worker starts,
with one line naming both settings; the refused set is exactly the README's table."""
import itertools
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from disttrain.config.errors import ConfigError
from disttrain.config.resolvers import config_dir
from disttrain.engine.preflight import validate
from helpers import ROOT, cli_env

STRATEGIES = {"single": ["strategy=single"], "ddp": ["strategy=ddp"], "pipeline": ["strategy=pipeline"],
              "layer": ["strategy=model_parallel", "strategy.mode=layer"],
              "tensor": ["strategy=model_parallel", "strategy.mode=tensor"],
              "deepspeed": ["strategy=deepspeed"], "param_server": ["strategy=param_server"]}
FEATURES = {"bf16": "trainer.precision=bf16", "fp16": "trainer.precision=fp16", "grad_clip": "trainer.grad_clip=1.0",
            "grad_accum": "trainer.grad_accum_steps=2", "ac_full": "memory.activation_checkpointing=full",
            "ac_every_n": "memory.activation_checkpointing=every_n", "offload_disk": "memory.activation_offload=disk",
            "eval": "trainer.eval_every=5", "compile": "trainer.compile=true"}
REFUSED = {("tensor", "offload_disk"), ("param_server", "fp16"), ("tensor", "compile"), ("deepspeed", "compile"),
           ("param_server", "compile")}


def _refusal(strategy, feature):
    overrides = [*STRATEGIES[strategy], FEATURES[feature], "data.val_fraction=0.2", "data.batch_size=8"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    try:
        validate(cfg, world_size=2 if strategy != "param_server" else 3)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("strategy,feature", list(itertools.product(STRATEGIES, FEATURES)))
def test_each_combination_is_honoured_or_refused_naming_both_keys(strategy, feature):
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    message = _refusal(strategy, feature)
    if (strategy, feature) in REFUSED:
        key = FEATURES[feature].split("=")[0]
        assert message is not None, (strategy, feature)
        assert key in message and "strategy=" in message and ("use " in message or "leave " in message), message
    else:
        assert message is None, message


def test_refusal_exits_2_before_any_worker_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "disttrain", "strategy=model_parallel", "strategy.mode=tensor",
                           "memory.activation_offload=disk", "dist.nproc_per_node=2", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "disttrain: config error: strategy=model_parallel strategy.mode=tensor does not support "
        "memory.activation_offload=disk")
    assert "starting 2 local workers" not in proc.stdout + proc.stderr and not (tmp_path / "checkpoints").exists()
