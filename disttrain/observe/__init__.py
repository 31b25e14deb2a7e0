"""Observability: throughput, model FLOPs and MFU, step-time split, peak memory,
stragglers. ``build_observer`` is the one entry point ``disttrain.engine.run`` calls."""
from disttrain.observe.base import NullObserver
from disttrain.observe.observer import Observer, build_observer, validate

__all__ = ["NullObserver", "Observer", "build_observer", "validate"]
