"""The rendezvous store fails with a message instead of hanging when its port is taken
(a Slurm master port is derived from the job id, so another program can hold it)."""
from __future__ import annotations

import socket
import time
import zlib

import pytest

from disttrain.distributed import process_group
from disttrain.distributed.env import LauncherEnvError, World, slurm_port


def _listener() -> socket.socket:
    """A socket that accepts connections and never answers (like another job's gloo listener)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_master_port_in_use_names_the_port_and_the_fix():
    with _listener() as held:
        port = held.getsockname()[1]
        world = World(rank=0, world_size=2, master_addr="127.0.0.1", master_port=port, launcher="slurm")
        with pytest.raises(LauncherEnvError, match=rf"127.0.0.1:{port}.*export MASTER_PORT"):
            process_group._connect_store(world, True, process_group.datetime.timedelta(seconds=2))


def test_client_answered_by_a_foreign_listener_raises_after_the_timeout(monkeypatch):
    """torch's own timeout does not cover this wait (the client would hang forever); an
    exception, not an exit, so the launcher (submitit) records the rank as failed."""
    monkeypatch.setattr(process_group, "STORE_GRACE_S", 0.5)
    with _listener() as held:
        port = held.getsockname()[1]
        world = World(rank=1, world_size=2, master_addr="127.0.0.1", master_port=port, launcher="slurm")
        start = time.monotonic()
        with pytest.raises(LauncherEnvError, match=rf"rank 1: no answer .* 127.0.0.1:{port} .*MASTER_PORT"):
            process_group._connect_store(world, False, process_group.datetime.timedelta(seconds=1))
    assert time.monotonic() - start < 10


def test_client_of_a_live_master_connects():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = dict(world_size=2, master_addr="127.0.0.1", master_port=port, launcher="slurm")
    timeout = process_group.datetime.timedelta(seconds=10)
    master = process_group._connect_store(World(rank=0, **base), True, timeout)
    client = process_group._connect_store(World(rank=1, **base), False, timeout)
    client.set("k", "v")
    assert master.get("k") == b"v"


def test_slurm_ports_lie_below_the_ephemeral_range():
    ports = [slurm_port(str(job)) for job in range(5000)]
    assert min(ports) >= 15000 and max(ports) < 32768
    assert slurm_port("3") == 15000 + zlib.crc32(b"3") % 17000
    assert len(set(ports)) > 4000  # spread: neighbouring job ids rarely share a port
