"""Surviving faults: the per-step guard (stop requests, hang detection, restarts) in ``guard``,
signal handling in ``signals``, the hang watchdog thread in ``watchdog``."""
