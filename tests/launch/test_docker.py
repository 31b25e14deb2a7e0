"""The Dockerfiles cannot be built here (no docker engine): lint them instead, with hadolint
where it is installed and always with the project's own rules."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]


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
    assert 'pip install -e ".[${EXTRAS}]"' in runs
    assert next(a for i, a in reversed(steps) if i == "USER") != "root"
    for i, a in steps:
        if i == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed (the rules test still runs)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    proc = subprocess.run(["hadolint", "--failure-threshold", "warning", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
