"""param_server settings are rejected before any worker starts, naming key and fix."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from disttrain.config.errors import ConfigError
from disttrain.config.resolvers import config_dir
from disttrain.engine.preflight import validate


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(Path(config_dir())), version_base="1.3"):
        return compose(config_name="config", overrides=["strategy=param_server", *overrides])


@pytest.mark.parametrize("overrides,world,match", [
    (["strategy.num_servers=3"], 3, r"strategy\.num_servers=3 leaves no worker ranks.*dist\.nproc_per_node"),
    (["strategy.num_servers=1"], 1, r"no worker ranks"),
    (["strategy.num_servers=0"], 3, r"strategy\.num_servers=0 must be an integer >= 1"),
    (["strategy.max_staleness=-1"], 3, r"strategy\.max_staleness=-1 must be an integer >= 0"),
    (["strategy.max_staleness=1.5"], 3, r"strategy\.max_staleness"),
    (["strategy.staleness_lr=sqrt"], 3, r"strategy\.staleness_lr='sqrt' must be one of none, inverse"),
    (["strategy.shared_memory=maybe"], 3, r"strategy\.shared_memory='maybe' must be true"),
    (["strategy.debug_slow_workers=[2]"], 3, r"strategy\.debug_slow_workers.*0 to 1"),
    (["strategy.debug_delay_s=-1"], 3, r"strategy\.debug_delay_s"),
    (["strategy.debug_hold_slow_pushes=true", "strategy.debug_slow_workers=[0]", "strategy.max_staleness=0"], 3,
     r"debug_hold_slow_pushes=true needs strategy\.max_staleness >= 1"),
    (["strategy.debug_hold_slow_pushes=true"], 3, r"debug_hold_slow_pushes=true needs strategy\.debug_slow_workers"),
])
def test_bad_settings_are_named(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        validate(_compose(*overrides), world_size=world)


@pytest.mark.parametrize("overrides", [[], ["strategy.max_staleness=null"], ["strategy.max_staleness=0"],
                                       ["strategy.num_servers=2", "strategy.staleness_lr=inverse"]])
def test_good_settings_pass(overrides):
    validate(_compose(*overrides), world_size=4)
