"""The error types users catch (all re-exported from `pprt`).

A leaf module: every layer of the runtime raises these, so they live apart
from the code that raises them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config.json field is missing, wrong, or asks for something unsupported."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file/tensor."""


class StageFailed(RuntimeError):
    """A stage process raised, died or stopped answering; the message names the stage.

    `stage` is that stage's index (None when no single stage could be named).
    """

    def __init__(self, message: str, stage: int | None = None):
        super().__init__(message)
        self.stage = stage


class RequestTooLarge(ValueError):
    """A request that no amount of waiting could serve (its prompt or KV need exceed the limits)."""
