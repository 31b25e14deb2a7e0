"""launch/mpirun.sh with Open MPI from the [mpi] extra: 2 ranks of DDP bootstrapped through
mpi4py; a multirun sweep of two jobs whose weights equal the torchrun sweep's bitwise."""
import pytest
from launch_helpers import (BIN, ROOT, TRAIN, assert_bitwise_equal, final_weights, launch_env,
                            reference_weights, run, torchrun_sweep_dir)

# Real launchers, several process starts each; generous timeout for a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_mpirun_sweep_matches_torchrun_bitwise(tmp_path):
    assert (BIN / "mpirun").exists(), "mpirun missing: pip install -e '.[mpi]' (make test does)"
    sweep = tmp_path / "sweep"
    # Root in CI needs --allow-run-as-root (the script adds it); 2 ranks on fewer cores: --oversubscribe.
    run([str(ROOT / "launch" / "mpirun.sh"), "-m", *TRAIN, "optim.lr=0.05,0.02", f"hydra.sweep.dir={sweep}"],
        env=launch_env({"NP": "2", "MPIRUN_ARGS": "--oversubscribe"}))
    assert "on 2 rank(s) (mpi, " in (sweep / "0" / "train.log").read_text()
    assert_bitwise_equal(final_weights(sweep / "0"), reference_weights())
    assert_bitwise_equal(final_weights(sweep / "1"), final_weights(torchrun_sweep_dir() / "1"))
