"""disttrain: config-driven distributed training for PyTorch, from a laptop to Slurm."""
from disttrain.checkpoint.commit import load_model_state

__all__ = ["load_model_state"]
__version__ = "0.1.0"
