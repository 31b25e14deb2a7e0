"""When a server under a bound s >= 1 closes a step, and when a pull waits for it (pure
logic, times passed in), and how the step's gradients are combined."""
import torch

from disttrain.ps import protocol
from disttrain.ps.rounds import CAP, RoundPolicy
from disttrain.ps.update import PendingUpdate


def _policy(compute: dict[int, float]) -> RoundPolicy:
    policy = RoundPolicy(num_workers=2, patience=0.25)
    for worker, seconds in compute.items():  # one measured computation each
        policy.granted(worker, 0, now=0.0)
        policy.pushed(worker, now=seconds)
    return policy


def test_a_step_waits_for_every_live_worker_up_to_the_cap():
    policy = _policy({0: 1.0, 1: 2.0})
    assert policy.may_close(2, {0}, {0, 1}, version=0, now=5.0) == (False, None)  # worker 1 missing
    assert policy.may_close(2, {0, 1}, {0, 1}, version=0, now=5.0)[0]
    assert policy.may_close(2 * CAP, {0}, {0, 1}, version=0, now=5.0)[0]         # a worker CAP x slower
    assert policy.may_close(1, {0}, {0}, version=0, now=5.0) == (False, None)     # never below num_workers
    assert policy.may_close(2, {0}, {0}, version=0, now=5.0)[0]                   # worker 1 gone


def test_a_closable_step_waits_for_a_gradient_due_on_its_weights_within_the_slack():
    policy = _policy({0: 1.0, 1: 2.0})
    policy.granted(0, 7, now=10.0)                          # due at 11.0, slack 0.25
    assert policy.may_close(2, {0, 1}, {0, 1}, 7, now=10.9) == (False, 11.25)
    assert policy.may_close(2, {0, 1}, {0, 1}, 7, now=11.3)[0]   # late: not waited for any longer
    assert policy.may_close(2, {0, 1}, {0, 1}, 7, now=10.5)[0]   # not due soon
    assert policy.may_close(2, {0, 1}, {0, 1}, 8, now=10.9)[0]   # computing on older weights


def test_a_pull_for_the_same_weights_waits_only_when_the_step_closes_first():
    # the straggler case: worker 0 (1 s) pushed; worker 1 (2 s) due at 2.0
    policy = _policy({0: 1.0, 1: 2.0})
    policy.granted(1, 0, now=0.0)
    assert policy.pull_deadline(0, {1}, now=1.0) is None            # its next gradient joins this step
    # equal workers: worker 1 due at 1.05, worker 0 would be back at 2.0: wait for the step
    policy = _policy({0: 1.0, 1: 1.0})
    policy.granted(1, 0, now=0.05)
    assert policy.pull_deadline(0, {1}, now=1.0) == 1.05 + 0.25
    assert policy.pull_deadline(0, set(), now=1.0) is None          # nothing to wait for
    assert _policy({}).pull_deadline(0, {1}, now=1.0) is None       # nothing measured yet: no wait


def test_the_step_is_its_weighted_sum_over_num_workers_and_remembers_who_sent_them():
    """Three gradients of two workers make a step 1.5x a DDP step's (sum / num_workers, not
    the mean); a stale one counts with its weight; the added buffers are only read (a
    worker's shared-memory gradient must not change)."""
    update = PendingUpdate()
    header = protocol.Header(protocol.PUSH, pulled_version=3)
    grads = [(0, torch.full((2,), 1.0), 1.0), (0, torch.full((2,), 2.0), 1.0), (1, torch.full((2,), 6.0), 0.5)]
    for worker, grad, scale in grads:
        update.add(worker, header, grad, scale)
    assert len(update) == 3 and update.count(0) == 2 and update.count(1) == 1
    total, parts = update.take(2)  # num_workers = 2
    assert total.tolist() == [3.0, 3.0] and [w for w, _ in parts] == [0, 0, 1]  # (1 + 2 + 0.5 * 6) / 2
    assert [g[0].item() for _, g, _ in grads] == [1.0, 2.0, 6.0]
    assert len(update) == 0 and update.total is None


def test_replies_are_collected_though_gloo_reports_them_unfinished_until_waited():
    """Gloo's Work.is_completed() is False until wait(): replies left to it piled up on the
    server (every event walked the list; pushes/s fell from 55 to 34 over 1500 steps)."""
    from types import SimpleNamespace

    from disttrain.ps.server import ShardServer

    class Work:
        def __init__(self):
            self.waited = 0

        def is_completed(self):
            return False

        def wait(self):
            self.waited += 1

    reply, weights = Work(), Work()
    fake = SimpleNamespace(sends=[([reply], [torch.zeros(4)], 0), ([weights], [torch.zeros(4), torch.zeros(8)], 1)])
    fake._wait = lambda works, worker: [w.wait() for w in works]
    ShardServer._prune_sends(fake)
    assert reply.waited == 1 and weights.waited == 0 and len(fake.sends) == 1  # the weights' send may be in flight
    ShardServer._prune_sends(fake, weights=True)  # before the optimizer writes the weights
    assert weights.waited == 1 and fake.sends == []
