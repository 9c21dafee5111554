"""Speculative decoding on the driver: its settings and the n-gram (prompt lookup) draft proposer.

`SpeculativeConfig` is what `LLM(speculative=...)` takes. Method "mtp" drafts
with the model's own multi-token-prediction head on the last stage
(pprt.distributed.mtp_drafts): the drafts come back with each step's sampled
token and go out with the sequence's next chunk (the scheduler keeps them on
the Sequence). With method "ngram"
the scheduler asks `propose_ngram` for up to k drafts for a decoding
sequence: the tokens that followed the latest earlier occurrence of the
sequence's last n tokens (n from `prompt_lookup_max` down to
`prompt_lookup_min`), in its prompt and output (prompt lookup decoding, as
transformers' `prompt_lookup_num_tokens` and vLLM's "ngram" method propose).
No weights: it helps where the output repeats the input (code editing,
agents, extraction). Ids only; how drafts are verified is
pprt.models.speculative, how they are scheduled and rolled back scheduler.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..params import SamplingParams
from .sequence import Sequence

METHODS = ("ngram", "mtp")


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding settings (LLM(speculative=SpeculativeConfig(...)) or the same as a dict)."""

    method: str = "ngram"  # "ngram": prompt lookup; "mtp": the checkpoint's MTP head
    num_speculative_tokens: int = 3  # k: drafts per sequence and step, 1..16
    prompt_lookup_max: int = 4  # ngram: the longest n-gram matched
    prompt_lookup_min: int = 1  # ngram: the shortest n-gram matched

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not supported (one of {METHODS})")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative {name} must be an int >= 1, got {value!r}")
        if self.num_speculative_tokens > 16:
            raise ValueError(f"speculative num_speculative_tokens must be <= 16, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict | None) -> SpeculativeConfig | None:
        """A config from LLM's `speculative` argument; raises ValueError naming a bad or unknown field."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative must be a dict or SpeculativeConfig, got {type(value).__name__}")
        unknown = set(value) - set(cls.__slots__)
        if unknown:
            raise ValueError(f"speculative has unknown field(s) {sorted(unknown)}; known: {list(cls.__slots__)}")
        return cls(**value)

    @property
    def mtp(self) -> bool:
        """Drafts come from the model's MTP head (method "mtp")."""
        return self.method == "mtp"


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens of `tokens`.

    Tries n = n_max down to n_min and returns the first continuation found ([] when none):
    the match at i (tokens[i:i+n] == tokens[-n:], i + n < len(tokens)) proposes
    tokens[i+n : i+n+k].
    """
    L = len(tokens)
    if k <= 0 or L < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # [L - n, n]: starts i < L - n
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            i = int(hits[-1])
            return tokens[i + n: i + n + k]
    return []


def can_draft(params: SamplingParams) -> bool:
    """Drafts go to requests whose sampling needs no per-position state on the last stage:
    no repetition, presence or frequency penalty (their presence and count rows would need
    every accepted token), no logprobs."""
    return (params.logprobs is None and params.repetition_penalty == 1.0
            and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0)


def mtp_propose(spec: SpeculativeConfig | None, seq: Sequence, end: int, tokens: int,
                can_hold: Callable[[int], bool]) -> tuple[int, int]:
    """MTP drafting: (drafts a chunk of `seq` ending at `end` asks the last stage for, tokens its
    table must hold). A chunk that ends the known tokens of a request that may draft asks for k,
    and its table holds k - 1 positions past its `tokens` for the head's draft steps (within the
    sequence's max_len), fewer drafts when `can_hold` (blocks free) says so; otherwise (0, tokens)."""
    if spec is None or not spec.mtp or end != seq.num_tokens or not can_draft(seq.params):
        return 0, tokens
    k = spec.num_speculative_tokens
    while k > 1:
        need = max(tokens, min(tokens + k - 1, seq.max_len))
        if can_hold(need):
            return k, need
        k -= 1
    return k, tokens


def mtp_next_token(spec: SpeculativeConfig | None, seq: Sequence, end: int) -> int:
    """MTP drafting: the token after a chunk of `seq` ending at `end` that does not sample (-1 otherwise)."""
    if spec is None or not spec.mtp or end >= seq.num_tokens:
        return -1
    return seq.token_slice(end, end + 1)[0]
