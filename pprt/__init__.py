"""pprt: pipeline-parallel inference for Qwen checkpoints."""
