"""Local ranks start from a fork server that imported torch once (disttrain.distributed.forkserver):
a rank is a child of the server and finds its preloaded modules imported (omegaconf, which this
test module does not import); DISTTRAIN_START_METHOD=spawn gives fresh interpreters, children of
the caller; a rank sees the caller's environment at the time of the call, not the server's."""
from __future__ import annotations

import os
import sys

from disttrain.distributed import forkserver


def _probe(queue) -> None:
    queue.put(("omegaconf" in sys.modules, os.getppid()))


def _run(method: str, monkeypatch) -> tuple[bool, int]:
    monkeypatch.setenv(forkserver.METHOD_ENV, method)
    ctx = forkserver.context()
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_probe, args=(queue,))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    return queue.get()


def test_forked_rank_finds_torch_imported_and_spawned_one_does_not(monkeypatch):
    assert forkserver.start_method() in ("forkserver", "spawn")
    preloaded, server = _run("forkserver", monkeypatch)
    fresh, parent = _run("spawn", monkeypatch)
    assert preloaded and server != os.getpid()
    assert not fresh and parent == os.getpid()


def test_spawn_helper_gives_ranks_the_callers_current_environment(monkeypatch):
    """The fork server keeps the environment it started with; disttrain.testing.spawn passes
    the caller's current one, as a fresh interpreter would have had it."""
    from disttrain.testing import spawn

    spawn(_noop, 1, timeout=60)  # the server is up before the variable exists
    monkeypatch.setenv("DISTTRAIN_PROBE", "set-after-the-server-started")
    assert spawn(_read_probe, 2, timeout=60) == ["set-after-the-server-started"] * 2


def _noop(rank, world_size):
    return rank


def _read_probe(rank, world_size):
    return os.environ.get("DISTTRAIN_PROBE")


def test_start_method_can_be_chosen(monkeypatch):
    monkeypatch.setenv(forkserver.METHOD_ENV, "spawn")
    assert forkserver.start_method() == "spawn"
