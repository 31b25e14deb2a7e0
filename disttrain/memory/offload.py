"""Activation offloading through autograd's saved-tensor hooks: what forward saves for backward
leaves the device (``cpu``: pinned host memory; ``disk``: files) and comes back in backward.

Hand-written rather than ``torch.autograd.graph.save_on_cpu`` because that one copies on the
compute stream, offloads every saved tensor (parameters and tiny ones included) and has no
disk mode. Values round-trip exactly (raw bytes), so gradients are bitwise those of a plain run.

* Parameters and tensors under ``min_bytes`` stay put: parameters live in memory anyway.
* ``cpu`` on a GPU: device->host copies run on a side CUDA stream into pinned memory (overlapping
  the forward); backward copies back with a non-blocking copy on the compute stream. On a
  CPU-only host activations already are in host memory, so the mode is a no-op (logged once).
* ``disk``: one file per tensor under ``directory`` (one folder per rank), written by a small
  thread pool while forward goes on (at most ``max_pending`` writes in flight, so host memory
  stays bounded) and read back ahead of use in backward (the next ``prefetch`` tensors in
  reverse save order). A file is removed as soon as it has been read, or when its graph is
  dropped unread. Each offloader writes in its own folder under ``<directory>``, removed when
  it is garbage-collected or the process exits; folders of dead processes (a crash) are removed
  when the next offloader of that rank starts.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import shutil
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("disttrain")
MODES = ("none", "cpu", "disk")
_said_cpu_noop = False
_instances = itertools.count()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write(path: str, tensor: torch.Tensor) -> None:
    tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)


def _read(path: str, nbytes: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    data = torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8)
    _remove(path)  # read once: backward never asks twice (retain_graph reads a prefetched copy)
    return data.view(dtype).reshape(shape)


class _DiskTensor:
    """A saved tensor that lives in a file: written in the background, read back on demand."""

    def __init__(self, owner: "ActivationOffload", index: int, tensor: torch.Tensor):
        self.owner, self.index = owner, index
        self.path = str(owner.directory / f"{index}.bin")
        self.device, self.dtype, self.shape, self.stride = tensor.device, tensor.dtype, tensor.shape, tensor.stride()
        self.nbytes = tensor.numel() * tensor.element_size()
        host = tensor.detach().to("cpu")  # a GPU tensor is copied to host first (synchronously)
        self.written = owner.pool.submit(_write, self.path, host)
        self.loaded: Future | None = None

    def prefetch(self) -> None:
        if self.loaded is None:
            written = self.written
            self.loaded = self.owner.pool.submit(
                lambda: (written.result(), _read(self.path, self.nbytes, self.dtype, self.shape))[1])

    def get(self) -> torch.Tensor:
        self.prefetch()
        value = self.loaded.result()
        if value.stride() != self.stride:  # give backward the layout forward saved
            value = torch.empty_strided(self.shape, self.stride, dtype=self.dtype).copy_(value)
        return value.to(self.device, non_blocking=True)

    def __del__(self):  # graph dropped without backward (e.g. an exception): no file left behind
        if self.loaded is None:
            path = self.path
            self.written.add_done_callback(lambda _: _remove(path))


class _HostTensor:
    """A saved CUDA tensor copied to pinned host memory on a side stream."""

    def __init__(self, tensor: torch.Tensor, stream: "torch.cuda.Stream"):
        self.device = tensor.device
        self.host = torch.empty_like(tensor, device="cpu", pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # tensor is computed
        with torch.cuda.stream(stream):
            self.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy ends
            self.copied = torch.cuda.Event()
            self.copied.record(stream)

    def get(self) -> torch.Tensor:
        torch.cuda.current_stream(self.device).wait_event(self.copied)
        return self.host.to(self.device, non_blocking=True)


class ActivationOffload:
    """Pack/unpack hooks for one mode; ``context()`` is the saved-tensor-hooks context."""

    def __init__(self, mode: str = "disk", directory: str | os.PathLike | None = None, min_bytes: int = 1024,
                 prefetch: int = 2, max_pending: int = 8):
        if mode not in MODES:
            raise ValueError(f"memory.activation_offload={mode!r} must be one of {', '.join(MODES)}.")
        self.mode, self.min_bytes, self.prefetch_depth, self.max_pending = mode, min_bytes, prefetch, max_pending
        self.stats = {"tensors": 0, "bytes": 0}
        self._lock, self._counter = threading.Lock(), itertools.count()
        self._live: weakref.WeakValueDictionary[int, _DiskTensor] = weakref.WeakValueDictionary()
        self._pending: collections.deque[Future] = collections.deque()
        self._seen: dict[int, tuple] = {}  # id -> (weakref, version, handle) of tensors still alive
        self._stream = None
        if mode == "disk":
            if directory is None:
                raise ValueError("memory.offload_dir: disk offload needs a directory.")
            self.directory = _fresh_directory(Path(directory))
            self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="disttrain-offload")
            self._finalizer = weakref.finalize(self, _shutdown, self.pool, self.directory)

    def _keep(self, tensor: torch.Tensor) -> bool:
        """True when a tensor should stay where it is."""
        return isinstance(tensor, nn.Parameter) or tensor.numel() * tensor.element_size() < self.min_bytes

    def pack(self, tensor: torch.Tensor) -> Any:
        if self.mode == "none" or self._keep(tensor):
            return tensor
        if self.mode == "cpu":
            return self._pack_host(tensor)
        seen = self._seen.get(id(tensor))
        if seen is not None and seen[0]() is tensor and seen[1] == tensor._version:
            return seen[2]  # saved twice (a ReLU's output is the next Linear's input): one file
        with self._lock:
            index = next(self._counter)
        handle = _DiskTensor(self, index, tensor)
        self._live[index] = handle
        key, seen_map = id(tensor), self._seen
        seen_map[key] = (weakref.ref(tensor, lambda _: seen_map.pop(key, None)), tensor._version, handle)
        self._count(tensor)
        self._pending.append(handle.written)
        while len(self._pending) > self.max_pending:  # bound the host memory of queued writes
            self._pending.popleft().result()
        return handle

    def _pack_host(self, tensor: torch.Tensor) -> Any:
        if not tensor.is_cuda:
            _say_cpu_noop()
            return tensor
        if self._stream is None:
            self._stream = torch.cuda.Stream(tensor.device)
        self._count(tensor)
        return _HostTensor(tensor, self._stream)

    def _count(self, tensor: torch.Tensor) -> None:
        self.stats["tensors"] += 1
        self.stats["bytes"] += tensor.numel() * tensor.element_size()

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, _DiskTensor):
            for index in range(packed.index - 1, packed.index - 1 - self.prefetch_depth, -1):
                ahead = self._live.get(index)
                if ahead is not None:
                    ahead.prefetch()
        return packed.get()

    def context(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def close(self) -> None:
        """Stop the IO threads and remove the folder (also done automatically at exit)."""
        if self.mode == "disk":
            self._finalizer()


def _fresh_directory(root: Path) -> Path:
    """A folder of our own under ``root`` (one root per rank); folders there left by other
    processes are leftovers of a crashed or killed run of this rank, and are removed."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.iterdir():
        if not stale.name.startswith(f"{os.getpid()}-"):
            shutil.rmtree(stale, ignore_errors=True)
    directory = root / f"{os.getpid()}-{next(_instances)}"
    directory.mkdir()
    return directory


def _shutdown(pool: ThreadPoolExecutor, directory: Path) -> None:
    pool.shutdown(wait=True)
    shutil.rmtree(directory, ignore_errors=True)


def _say_cpu_noop() -> None:
    global _said_cpu_noop
    if not _said_cpu_noop:
        _said_cpu_noop = True
        log.warning("memory.activation_offload=cpu does nothing here: the model is on the CPU, so its "
                    "activations already are in host memory (use disk to move them out of memory).")


def attach_offload(model: nn.Module, offload: ActivationOffload) -> nn.Module:
    """Run ``model``'s forward inside the offload hooks. A plain Sequential gets the hooks on
    each child, so a pipeline split of its children keeps them; other models, and a Sequential
    whose own forward checkpoints groups of children, on the root (the hooks must sit outside
    the checkpoints, or they would replace checkpointing's own hooks). The hooks a tensor was
    saved under are the ones that restore it, so backward needs no context."""
    per_child = isinstance(model, nn.Sequential) and "forward" not in vars(model)
    targets = list(model.children()) if per_child else [model]
    for module in targets:
        contexts: list[Any] = []

        def enter(_module, _args, contexts=contexts):
            contexts.append(offload.context())
            contexts[-1].__enter__()

        def leave(_module, _args, _output, contexts=contexts):
            contexts.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)
    model._disttrain_offload = offload  # keeps it alive as long as the model, for close()
    return model
