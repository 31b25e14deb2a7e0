"""Validation of the param_server settings: one clear error per bad key, raised before
any worker starts (``check``) and again on each rank (``check_world``)."""
from __future__ import annotations

from typing import Any

STALENESS_LR = ("none", "inverse")


def check_world(num_servers: Any, world_size: int) -> None:
    if not isinstance(num_servers, int) or num_servers < 1:
        raise ValueError(f"strategy.num_servers={num_servers!r} must be an integer >= 1.")
    if num_servers >= world_size:
        raise ValueError(
            f"strategy.num_servers={num_servers} leaves no worker ranks in a world of {world_size} "
            f"process(es): raise dist.nproc_per_node (or the launcher's process count) to at least "
            f"{num_servers + 1}, or lower strategy.num_servers.")


def check(strategy: Any, world_size: int) -> None:
    """``strategy`` is the strategy config node (num_servers, max_staleness, ...)."""
    check_world(strategy.get("num_servers", 1), world_size)
    bound = strategy.get("max_staleness", 4)
    if bound is not None and (not isinstance(bound, int) or isinstance(bound, bool) or bound < 0):
        raise ValueError(f"strategy.max_staleness={bound!r} must be an integer >= 0 (0 = synchronous SGD) "
                         f"or null (fully asynchronous).")
    mode = strategy.get("staleness_lr", "none")
    if mode not in STALENESS_LR:
        raise ValueError(f"strategy.staleness_lr={mode!r} must be one of {', '.join(STALENESS_LR)} "
                         f"(inverse: lr / (1 + staleness)).")
    shared = strategy.get("shared_memory", True)
    if not isinstance(shared, bool):
        raise ValueError(f"strategy.shared_memory={shared!r} must be true (workers and servers on one host "
                         f"exchange through /dev/shm) or false (always over the process group).")
    delay = strategy.get("debug_delay_s", 0.0)
    if not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError(f"strategy.debug_delay_s={delay!r} must be a number of seconds >= 0.")
    if strategy.get("debug_hold_slow_pushes", False):
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
            raise ValueError(f"strategy.debug_hold_slow_pushes=true needs strategy.max_staleness >= 1 (it is "
                             f"{bound!r}): a held push is released when the bound stops the other workers.")
        if not strategy.get("debug_slow_workers", None):
            raise ValueError("strategy.debug_hold_slow_pushes=true needs strategy.debug_slow_workers "
                             "(the workers whose pushes are held), e.g. strategy.debug_slow_workers=[0].")
    workers = world_size - strategy.get("num_servers", 1)
    for index in strategy.get("debug_slow_workers", None) or []:
        if not isinstance(index, int) or not 0 <= index < workers:
            raise ValueError(f"strategy.debug_slow_workers has {index!r}: worker indices run from 0 to "
                             f"{workers - 1} (ranks num_servers.. are workers 0..).")
