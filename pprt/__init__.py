"""pprt: pipeline-parallel inference for Qwen checkpoints.

The public API is `LLM`, `SamplingParams` and `Completion`; nothing else is public.
"""

from .engine import LLM, Completion
from .sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "Completion"]
