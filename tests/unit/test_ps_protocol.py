"""Parameter-server wire format and shard plan (no processes)."""
import pytest
import torch

from disttrain.ps import protocol


def test_header_round_trip_keeps_integers_and_loss():
    header = protocol.Header(protocol.PUSH, clock=12345, pulled_version=2**40, loss=0.123456789)
    assert protocol.Header.unpack(header.pack()) == header


def test_shards_cover_every_parameter_once_and_balance_by_size():
    sizes = [4096, 128, 16384, 128, 16384, 128, 128, 1]
    plan = protocol.plan_shards(sizes, 2)
    assert sorted(i for shard in plan for i in shard) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in shard) for shard in plan]
    assert max(loads) - min(loads) <= 4096  # the two big matrices land on different servers
    assert all(shard == sorted(shard) for shard in plan)  # model order inside a shard


def test_one_server_gets_everything():
    assert protocol.plan_shards([3, 2, 1], 1) == [[0, 1, 2]]


def test_flatten_and_unflatten_round_trip():
    tensors = [torch.randn(3, 4), torch.randn(5)]
    flat = protocol.flatten(tensors)
    targets = [torch.zeros(3, 4), torch.zeros(5)]
    protocol.unflatten_into(flat, targets)
    assert all(torch.equal(a, b) for a, b in zip(tensors, targets))


def test_missing_gradient_is_sent_as_zeros():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    a.grad = torch.full((2,), 5.0)
    assert protocol.flat_grads([a, b]).tolist() == [5.0, 5.0, 0.0, 0.0, 0.0]


def test_bound_parameters_and_gradients_are_views_of_one_buffer():
    """What lets a worker receive weights and push gradients without a copy: a write into
    the flat buffer is the update, and backward accumulates into the flat gradients."""
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    flat = protocol.bind_flat(list(model.parameters()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # values kept
    flat.fill_(0.5)
    assert all(bool((p == 0.5).all()) for p in model.parameters())
    grads = protocol.bind_grads(list(model.parameters()))
    model(torch.ones(4, 3)).sum().backward()
    assert grads.tolist() == [4.0] * 6 + [4.0, 4.0]  # d/dW = sum of inputs, d/db = batch size


def test_shared_buffers_are_one_memory_and_vanish_when_unlinked(tmp_path, monkeypatch):
    """disttrain.ps.shm: the worker's and the server's mappings are the same bytes, the files
    are gone after unlink (the mappings stay valid), and a /dev/shm without room for the
    buffers is not used (tmpfs would SIGBUS past its limit)."""
    from disttrain.ps import shm

    monkeypatch.setattr(shm, "SHM_DIR", tmp_path)
    worker = shm.open_buffers("tok", 0, 1, 8, torch.float32, create=True)
    server = shm.open_buffers("tok", 0, 1, 8, torch.float32, create=False)
    worker[1].fill_(3.0)
    assert torch.equal(server[1], torch.full((8,), 3.0))
    shm.unlink("tok", 0, 1)
    assert not list(tmp_path.iterdir())
    server[0].fill_(2.0)
    assert torch.equal(worker[0], torch.full((8,), 2.0))
    with pytest.raises(RuntimeError, match="strategy.shared_memory=false"):
        shm.open_buffers("tok", 0, 2, 8, torch.float32, create=False)
    assert shm.room(1) and not shm.room(1 << 60)
