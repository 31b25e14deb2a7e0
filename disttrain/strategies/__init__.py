"""Training strategies: one file each, all behind ``disttrain.strategies.base.Strategy``."""
from disttrain.strategies.base import SetupContext, StepStats, Strategy

__all__ = ["SetupContext", "StepStats", "Strategy"]
