"""SamplingParams: what a request asks of the sampler (a leaf module: the driver and the stages both use it).

A None sampling field means "the model's default (generation_config.json),
else the standard default"; `resolve(defaults)` fills those in and is done
once per request by the driver. The batched sampler that applies them lives
on the last stage (`pprt.models.sampler`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# A temperature below this samples greedily (vLLM's _SAMPLING_EPS): dividing logits by it
# would only pick the argmax anyway, or overflow to inf/NaN on the way.
GREEDY_TEMPERATURE = 1e-5
SEED_LIMIT = 2**63  # seeds are in [0, 2**63): what every stage's torch.Generator takes
# The standard defaults, used when neither the request nor the model sets a field.
STANDARD_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                     "presence_penalty": 0.0, "frequency_penalty": 0.0}
# OpenAI's range for presence_penalty and frequency_penalty
PENALTY_LIMIT = 2.0
_SAMPLING_FIELDS = tuple(STANDARD_DEFAULTS)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_seed(seed: object, name: str = "seed") -> None:
    """Raise ValueError unless `seed` is None or an int in [0, 2**63)."""
    if seed is not None and not (_is_int(seed) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"{name} must be an int in [0, 2**63), got {seed!r}")


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate, at least 1
    temperature: float | None = None  # 0 (or anything below GREEDY_TEMPERATURE, 1e-5) = greedy
    top_p: float | None = None  # nucleus mass in (0, 1]; 1 = off
    top_k: int | None = None  # 0 (or -1) = off
    min_p: float | None = None  # drop tokens with p < min_p * p_max; 0 = off
    repetition_penalty: float | None = None  # HF rule over prompt + generated; 1 = off
    presence_penalty: float | None = None  # OpenAI rule over generated tokens, in [-2, 2]; 0 = off
    frequency_penalty: float | None = None  # OpenAI rule over generated tokens, in [-2, 2]; 0 = off
    seed: int | None = None  # private generator for this request
    stop: list[str] | str | None = None  # stop strings (tuple after resolve)
    stop_token_ids: list[int] | None = None  # extra stop tokens besides EOS (tuple after resolve)
    ignore_eos: bool = False
    logprobs: int | None = None  # k: chosen token's logprob + the top k
    lora: str | None = None  # name of a loaded LoRA adapter (LLM(lora=...), LLM.load_lora); None: the base model

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        t = self.temperature
        if t is not None and not (_is_num(t) and t >= 0 and math.isfinite(t)):
            raise ValueError(f"temperature must be >= 0 and finite, got {t!r}")
        if self.top_p is not None and not (_is_num(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            if not _is_int(self.top_k) or self.top_k < -1:
                raise ValueError(f"top_k must be an int >= 0 (or -1 for off), got {self.top_k!r}")
            self.top_k = max(self.top_k, 0)
        if self.min_p is not None and not (_is_num(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        rp = self.repetition_penalty
        if rp is not None and not (_is_num(rp) and rp > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {rp!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not (_is_num(value) and -PENALTY_LIMIT <= value <= PENALTY_LIMIT):
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        check_seed(self.seed)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and self.logprobs >= 0):
            raise ValueError(f"logprobs must be an int >= 0, got {self.logprobs!r}")
        if self.lora is not None and not (isinstance(self.lora, str) and self.lora):
            raise ValueError(f"lora must be the name of a loaded adapter (a non-empty str), got {self.lora!r}")
        stops = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stops is not None and not (isinstance(stops, (list, tuple)) and all(isinstance(s, str) and s for s in stops)):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        ids = self.stop_token_ids
        if ids is not None and not (isinstance(ids, (list, tuple)) and all(_is_int(t) and t >= 0 for t in ids)):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {ids!r}")

    @property
    def greedy(self) -> bool:
        """True when the temperature is below GREEDY_TEMPERATURE (1e-5): such a request takes
        the argmax instead of dividing the logits by a vanishing temperature."""
        return self.temperature is not None and self.temperature < GREEDY_TEMPERATURE

    @property
    def resolved(self) -> bool:
        return all(getattr(self, f) is not None for f in _SAMPLING_FIELDS)

    def resolve(self, defaults: dict | None = None) -> SamplingParams:
        """A copy with every None sampling field filled from `defaults`
        (generation_config.json keys; `do_sample: false` means greedy), then from
        STANDARD_DEFAULTS; `stop` and `stop_token_ids` become tuples."""
        defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
        if defaults.get("do_sample") is False:
            defaults["temperature"] = 0.0
        filled = {}
        for name, standard in STANDARD_DEFAULTS.items():
            value = getattr(self, name)
            if value is None:
                value = defaults.get(name, standard)
            filled[name] = int(value) if name == "top_k" else float(value)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return dataclasses.replace(self, **filled, stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()))
