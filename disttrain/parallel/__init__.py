"""Building blocks for model-splitting strategies: the dp/pp/tp device mesh, splitting a
Sequential into balanced stages, Megatron-style tensor-parallel plans, and per-stage timing."""
