"""Shared fixtures: run the real ``disttrain`` CLI in a subprocess, or a function on N real
gloo processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def pytest_configure(config):
    # Workers spawned by the tests inherit this: one intra-op thread each on a 2-core box.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def run_cli(tmp_path):
    """``run_cli(*overrides, run_dir=None, timeout=180, check=True)`` -> CompletedProcess."""
    from helpers import run_disttrain

    def run(*overrides: str, run_dir: Path | None = None, timeout: float = 180, check: bool = True,
            env: dict | None = None):
        return run_disttrain(list(overrides), run_dir or tmp_path / "run", timeout=timeout, check=check, env=env)

    return run


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
