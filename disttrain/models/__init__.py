"""Reference models for the demo, tests and benchmarks.

Both are ``nn.Sequential`` so that every parallelism (pipeline split, layer-wise model
parallelism, activation checkpointing per block) can treat them as a list of blocks.
"""
from disttrain.models.mlp import build_mlp
from disttrain.models.gpt import build_gpt

__all__ = ["build_mlp", "build_gpt"]
