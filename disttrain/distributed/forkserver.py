"""Local ranks forked from one server that imported torch once.

A fresh interpreter per rank (multiprocessing's ``spawn``) pays ~2.5 s of CPU for its own
``import torch``: on a 2-core machine a 4-rank dev run spends more time importing than
training, and a restart pays it again. Python's ``forkserver`` start method starts one
clean server process (no threads, no state of the caller's, so forking it is safe), lets it
import the modules named here once, and forks each rank from it in milliseconds.
"""
from __future__ import annotations

import multiprocessing
import os

#: what every rank imports anyway; nothing here starts a thread or touches a device
BASE = ("torch", "torch.distributed", "omegaconf")
METHOD_ENV = "DISTTRAIN_START_METHOD"


def start_method() -> str:
    """``forkserver`` where the platform has it (not on Windows: ``spawn`` there), or what
    ``DISTTRAIN_START_METHOD`` says (``spawn``: fresh interpreters, to compare or debug)."""
    default = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return os.environ.get(METHOD_ENV, default)


def context(*modules: str) -> multiprocessing.context.BaseContext:
    """The multiprocessing context to start local ranks with; with the fork server, ``modules``
    (plus ``BASE``) are imported by the server before its first fork. The server lives as long
    as this process, so the first call's list is the one that counts."""
    method = start_method()
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload([*BASE, *modules])
    return ctx
