"""disttrain as users install it: a wheel (built from the sdist, as pip does for an sdist)
installed into a ``--target`` directory and run from an unrelated directory, where only the
packaged configs (disttrain/conf) can be found. The venv supplies the dependencies."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, cli_env, run_process

SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "Makefile", "disttrain", "conf", "launch", "docker")
CONFIGS = sorted(str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml"))
# ~40 s here, most of it the five CLI starts (torch + Hydra imports)
pytestmark = pytest.mark.timeout(240)


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = run_process(cmd, timeout=timeout, env=env or cli_env(), cwd=cwd)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _build(src: Path, out: Path, what: str) -> Path:
    """A wheel with pip (no network: no build isolation, no dependencies) or an sdist."""
    if what == "wheel":
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src], src)
        return next(out.glob("disttrain-*.whl"))
    _run([sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(out)!r})"], src)
    return next(out.glob("disttrain-*.tar.gz"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """sdist -> wheel -> ``pip install --target``; also the wheel built from the checkout."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: builds write build/ and *.egg-info next to the sources
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    tree_wheel = _build(src, tmp / "tree-wheel", "wheel")
    sdist = _build(src, tmp / "sdist", "sdist")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    from_sdist = _build(next((tmp / "unpacked").iterdir()), tmp / "sdist-wheel", "wheel")
    target = tmp / "target"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", target, from_sdist], tmp)
    elsewhere = tmp / "elsewhere"  # no conf/ here or above: only the installed package's
    elsewhere.mkdir()
    env = cli_env({"PYTHONPATH": str(target)})
    return {"tree_wheel": tree_wheel, "sdist": sdist, "target": target, "cwd": elsewhere, "env": env}


def _packaged(names: list[str], prefix: str) -> list[str]:
    return sorted(n[len(prefix):] for n in names if n.startswith(prefix) and n.endswith(".yaml"))


def test_wheel_and_sdist_carry_every_config(installed):
    with zipfile.ZipFile(installed["tree_wheel"]) as whl:
        assert _packaged(whl.namelist(), "disttrain/conf/") == CONFIGS
        assert "disttrain/data/corpus.txt" in whl.namelist()
        metadata = whl.read(next(n for n in whl.namelist() if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata  # the SPDX form: no deprecation warning
    with tarfile.open(installed["sdist"]) as tar:
        top = tar.getnames()[0].split("/")[0]
        assert _packaged(tar.getnames(), f"{top}/disttrain/conf/") == CONFIGS
    assert _packaged([str(p.relative_to(installed["target"])) for p in installed["target"].rglob("*.yaml")],
                     "disttrain/conf/") == CONFIGS


def _python(installed, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run([sys.executable, *args], installed["cwd"], installed["env"], timeout)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_installed_package_trains_from_anywhere(installed):
    """The default training, from the wheel: its configs and its code, not the checkout's."""
    run_dir = installed["cwd"] / "run"
    proc = _python(installed, "-c", "import disttrain.config.resolvers as c; print(c.__file__); print(c.config_dir())")
    module, conf = proc.stdout.split()
    assert Path(module).is_relative_to(installed["target"]) and Path(conf) == installed["target"] / "disttrain" / "conf"
    _python(installed, "-m", "disttrain", "trainer.max_steps=6", "trainer.log_every=3", "trainer.progress=log",
            "metrics.peak_flops=1e12", f"hydra.run.dir={run_dir}")
    last = [r for r in _records(run_dir) if "loss" in r][-1]
    assert last["step"] == 6 and math.isfinite(last["loss"]) and 0 < last["loss"] < 10
    assert (run_dir / "checkpoints" / "step_00000006" / "manifest.json").is_file()


def test_installed_gpt_text_uses_the_shipped_corpus(installed):
    run_dir = installed["cwd"] / "gpt"
    _python(installed, "-m", "disttrain", "experiment=gpt_text", "trainer.max_steps=2", "trainer.log_every=1",
            "trainer.progress=log", "metrics.peak_flops=1e12", "checkpoint.every_steps=0", f"hydra.run.dir={run_dir}")
    losses = [r["loss"] for r in _records(run_dir) if "loss" in r]
    # character-level cross-entropy starts near ln(256) = 5.5 (untrained logits over 256 bytes)
    assert len(losses) == 2 and all(3.0 < loss < 7.0 for loss in losses), losses


def test_user_config_dir_help_and_plan(installed, tmp_path):
    """Users add config groups with --config-dir / hydra.searchpath; --help lists them and
    ``plan`` sizes the user's model (its parameter count, computed here independently)."""
    user = tmp_path / "my-configs"
    (user / "model").mkdir(parents=True)
    (user / "model" / "wide_mlp.yaml").write_text("defaults:\n  - mlp\n  - _self_\nhidden: 48\n")
    exe = installed["target"] / "bin" / "disttrain"  # the console script pip installed
    help_text = _run([exe, "--config-dir", user, "--help"], installed["cwd"], installed["env"]).stdout
    assert "model: gpt_tiny, hf_bert, hf_llama, mlp, wide_mlp" in help_text and "== Config ==" in help_text
    plan = _python(installed, "-m", "disttrain", "plan", f"hydra.searchpath=[file://{user}]", "model=wide_mlp",
                   "plan.device_memory=8GB", "plan.bandwidth=10Gbps", "plan.peak_flops=1e12", "plan.efficiency=0.3")
    from disttrain.models import build_mlp

    params = sum(p.numel() for p in build_mlp(in_dim=32, hidden=48, depth=3, out_dim=1, activation="relu").parameters())
    assert f"{params:,} parameters" in plan.stdout, plan.stdout
    assert "recommended: " in plan.stdout and "(device memory per rank: 8 GB;" in plan.stdout


def test_editable_checkout_reads_the_top_level_conf():
    """In the checkout (and the editable install) disttrain/conf is a link to conf/: users
    edit conf/, the package reads it."""
    assert (ROOT / "disttrain" / "conf").resolve() == (ROOT / "conf").resolve()
    proc = run_process([sys.executable, "-c", "import disttrain.config.resolvers as c; print(c.config_dir())"], timeout=60,
                       env={k: v for k, v in cli_env().items() if k != "PYTHONPATH"}, cwd=Path(os.sep))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "conf"
