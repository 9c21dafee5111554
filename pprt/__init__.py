"""pprt: pipeline-parallel inference for Qwen checkpoints.

The public API is `LLM`, `SamplingParams`, `Completion`, `Stats` and the
error types users catch; nothing else is public.

`LLM`, `Completion` and `Stats` are imported on first use (PEP 562), so that
`import pprt.models` or `import pprt.weights` (what a stage process and a
tool need) do not pull in the driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError, RequestTooLarge, StageFailed
from .params import SamplingParams

if TYPE_CHECKING:
    from .engine.llm import LLM, Completion
    from .engine.stats import Stats

_LAZY = {"LLM": "pprt.engine.llm", "Completion": "pprt.engine.llm", "Stats": "pprt.engine.stats"}

__all__ = ["LLM", "SamplingParams", "Completion", "Stats", "CheckpointError", "ConfigError", "RequestTooLarge",
           "StageFailed"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pprt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
