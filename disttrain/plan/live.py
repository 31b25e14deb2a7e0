"""Peak bytes of the tensors one forward + backward holds at once, beyond the parameters:
what the saved-for-backward count misses (the loss's and attention's intermediates, the
gradients flowing back through the activations). Every tensor an op returns is tracked by
a TorchDispatchMode from its creation until its last Python reference dies; storages shared
by views count once. Gradients of parameters are taken off at the end (they are counted as
the row's gradients)."""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Live(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refs: dict[int, list] = {}  # storage pointer -> [tensors alive, bytes]
        self.live = self.peak = 0

    def _gone(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if not key:
                    continue
                if key not in self.refs:
                    self.refs[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._gone, key)
        return out


def peak_bytes(model: torch.nn.Module, inputs, targets, loss_fn) -> int:
    """Peak live bytes of one forward + backward of ``model`` (parameters' gradients excluded)."""
    model.zero_grad(set_to_none=True)
    mode = _Live()
    with mode:
        loss_fn(model(inputs), targets).backward()
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return max(mode.peak - grads, 0)
