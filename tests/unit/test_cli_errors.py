"""Every sub-command turns a config or usage error into one line and exit code 2, as the
training command does; bugs keep their traceback (HYDRA_FULL_ERROR=1 shows it for both)."""
import sys

import pytest

from disttrain.__main__ import run_subcommand
from helpers import cli_env, run_process


@pytest.mark.parametrize("argv,message", [
    (["trainer.max_stepz=3"], "Could not override 'trainer.max_stepz'. To append to your config use +trainer.max_stepz=3"),
    (["model=nosuch"], "Could not find 'model/nosuch' (options: gpt_tiny, hf_bert, hf_llama, mlp)"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' is not an integer"),
    (["a=b=c"], "cannot parse the override 'a=b=c'"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 must be an integer >= 1."),       # disttrain's own checks
    (["plan.device_memory=lots"], "plan.device_memory='lots' is not a size"),
    (["--config-dir", "/no/such/dir"], "--config-dir /no/such/dir: no such directory"),
], ids=["key", "group", "type", "syntax", "range", "plan-value", "config-dir"])
def test_plan_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert run_subcommand("plan", argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.rstrip("\n")
    assert "\n" not in err and err.startswith("disttrain plan: ") and message in err, err


def test_report_and_prepare_data_errors(tmp_path, capsys):
    assert run_subcommand("report", [str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("disttrain report: no TensorBoard scalars under")
    for name, argv in (("report", []), ("prepare-data", [str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])):
        with pytest.raises(SystemExit) as exit_info:  # argparse's own usage errors: exit 2 as well
            run_subcommand(name, argv)
        assert exit_info.value.code == 2


def test_full_error_keeps_the_traceback(monkeypatch):
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigCompositionException):
        run_subcommand("plan", ["trainer.max_stepz=3"])


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    proc = run_process([sys.executable, "-m", "disttrain", "plan", "trainer.max_stepz=3"], timeout=120,
                       env=cli_env(), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain plan: Could not override 'trainer.max_stepz'"), lines
