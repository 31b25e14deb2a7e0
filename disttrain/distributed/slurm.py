"""Slurm actions taken from inside a job (environment parsing lives in ``disttrain.distributed.env``)."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Mapping

log = logging.getLogger("disttrain")


def job_id(environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")


def requeue(environ: Mapping[str, str] | None = None) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``: the job goes back to the queue with the same id
    (hence the same run dir) and resumes from its newest checkpoint when it starts again.
    Returns False (and logs why) when it cannot; the checkpoint is saved either way."""
    job = job_id(environ)
    if job is None:
        log.warning("not a Slurm job: nothing to requeue (resume by re-running the same command)")
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("scontrol is not on PATH: cannot requeue Slurm job %s; resubmit it to resume", job)
        return False
    proc = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        log.warning("scontrol requeue %s failed (%s); resubmit the job to resume", job, proc.stderr.strip())
        return False
    log.warning("Slurm job %s requeued; it resumes from the checkpoint when it starts again", job)
    return True
