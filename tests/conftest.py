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


#: The files that take longest (real multi-process runs, cold inductor compiles), longest first.
#: ``make test`` runs two files at a time (pytest-xdist, --dist loadfile) and hands them out in
#: collection order, so these start first and the many short unit tests fill the gaps at the
#: end, instead of one long file running alone while the other worker has nothing left.
LONGEST_FIRST = ("dist/test_feature_matrix.py", "dist/test_compile.py", "dist/test_param_server.py",
                 "dist/test_meta_init_memory.py", "launch/test_slurm.py", "dist/test_hf_models.py",
                 "launch/test_sweeps.py", "dist/test_deepspeed.py", "fault/test_kill_resume.py",
                 "launch/test_elastic.py", "fault/test_preemption.py", "dist/test_pipeline.py",
                 "dist/test_fsdp_mesh.py", "dist/test_ddp_numerics.py", "launch/test_packaging.py",
                 "unit/test_memory.py", "dist/test_input_pipeline.py", "launch/test_cli_smoke.py",
                 "launch/test_plan_validate.py",
                 "dist/test_model_parallel.py", "unit/test_no_leftover_processes.py", "unit/test_schema.py")


def _file_rank(item) -> int:
    path = item.nodeid.split("::", 1)[0]
    for rank, name in enumerate(LONGEST_FIRST):
        if path.endswith(name):
            return rank
    return len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: the order within a file and among the rest is kept
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
