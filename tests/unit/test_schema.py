"""The typed schema (disttrain.config.schema): a wrong type fails at compose time naming the key,
in one line with exit code 2 from the CLI; the defaults are those conf/config.yaml had."""
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from disttrain.config import schema
from disttrain.config.resolvers import config_dir

BAD = [  # override, the line's start (key=value), the type it needs
    ("dist.timeout_s=abc", "dist.timeout_s='abc'", "float"),
    ("metrics.straggler_ratio=abc", "metrics.straggler_ratio='abc'", "float"),
    ("trainer.max_steps=1.5", "trainer.max_steps=1.5", "integer"),
    ("checkpoint.keep=x", "checkpoint.keep='x'", "integer"),
    ("trainer.grad_clip=abc", "trainer.grad_clip='abc'", "float"),
]

#: the values conf/config.yaml held before the schema took them over.
OLD_DEFAULTS = {
    "dist": {"nproc_per_node": 1, "backend": "auto", "timeout_s": 300, "max_restarts": 0,
             "dp": None, "pp": None, "tp": None},
    "trainer": {"max_steps": 100, "grad_accum_steps": 1, "seed": 0, "log_every": 10, "progress": "auto",
                "precision": 32, "eval_every": 0, "stop_on_nonfinite": True},
    "checkpoint": {"every_steps": 50, "keep": 3, "resume": "auto"},
    "memory": {"activation_checkpointing": "none", "checkpoint_every": 2, "activation_offload": "none",
               "offload_dir": None, "offload_min_bytes": 1024},
    "fault": {"requeue_signal": "USR1", "save_on_signal": True, "requeue": "auto", "watchdog": True,
              "hang_timeout_s": None, "debug": {}},
    "sweep": {"objective": "best", "direction": "minimize", "pruner": None},
    "metrics": {"peak_flops": None, "peak_dtype": "auto", "count_flops": True, "straggler_every": 50,
                "straggler_ratio": 1.5, "debug_slow_rank": -1, "debug_slow_s": 0.0, "timeline_step": 5},
    "plan": {"device_memory": None, "bandwidth": None, "peak_flops": None, "efficiency": None,
             "micro_batches": 8, "validate": False, "validate_nproc": 2, "validate_steps": 30,
             "validate_repeats": 2},
}


def _compose(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("override,start,kind", BAD)
def test_bad_type_fails_at_compose_naming_the_key(override, start, kind):
    with pytest.raises(schema.COMPOSE_ERRORS) as info:
        _compose(override)
    line = schema.explain(info.value)
    assert line.startswith(f"{start} is not a") and kind in line and "\n" not in line


@pytest.mark.parametrize("override,start,kind", BAD)
def test_cli_prints_one_line_and_exits_2(run_cli, override, start, kind):
    proc = run_cli(override, "trainer.max_steps=1", check=False, timeout=120,
                   env={"HYDRA_FULL_ERROR": "0"})  # "0" is unset to Hydra: disttrain's own report
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"disttrain: config error: {start} is not a") and kind in proc.stderr
    assert "Traceback" not in proc.stderr


def test_user_full_error_keeps_hydras_traceback(run_cli):
    proc = run_cli("dist.timeout_s=abc", check=False, timeout=120, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "dist.timeout_s" in proc.stderr


def test_defaults_are_the_old_config_yaml_values():
    cfg = _compose()
    for section, values in OLD_DEFAULTS.items():
        got = OmegaConf.to_container(cfg[section])
        assert {k: got[k] for k in values} == values, section
    assert cfg.data.val_fraction == 0.0
    assert cfg.trainer.grad_clip is None and cfg.trainer.compile is False
    assert cfg.sweep.dir is None  # filled in per trial by disttrain.sweep.job
    structured = OmegaConf.structured(schema.DisttrainConfig)  # the values live in the schema only
    assert all(cfg[s] == structured[s] for s in OLD_DEFAULTS)


def test_free_form_groups_and_added_keys_still_compose():
    cfg = _compose("+fault.debug.kill_rank=3", "++fault.debug.kill_step=2", "strategy=deepspeed",
                   "+strategy.config.optimizer.type=Adam", "model.hidden=64", "+data.extra=1",
                   "sweep.pruner={_target_:optuna.pruners.MedianPruner,n_warmup_steps:20}",
                   "trainer.precision=bf16", "trainer.grad_clip=1", "data.val_fraction=0.25")
    assert cfg.fault.debug == {"kill_rank": 3, "kill_step": 2}
    assert cfg.strategy.config.optimizer.type == "Adam" and cfg.model.hidden == 64 and cfg.data.extra == 1
    assert cfg.sweep.pruner.n_warmup_steps == 20 and cfg.trainer.precision == "bf16"
    assert cfg.trainer.grad_clip == 1.0 and cfg.data.val_fraction == 0.25


def test_unknown_key_and_missing_option_are_one_line():
    with pytest.raises(schema.COMPOSE_ERRORS) as info:
        _compose("dist.nproc=2")
    assert "dist.nproc" in schema.explain(info.value) and "\n" not in schema.explain(info.value)
    with pytest.raises(schema.COMPOSE_ERRORS) as info:
        _compose("strategy=nope")
    line = schema.explain(info.value)
    assert "Could not find 'strategy/nope'" in line and "(options: ddp, " in line and "\n" not in line
