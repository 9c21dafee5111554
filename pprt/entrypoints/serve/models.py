"""The models one server serves, each an LLM on its own devices, found by the request's `model`.

`ModelSpec` is what the command line says about one model (its own
devices, so `--model A --devices cuda:0 --model B --devices cuda:1` puts one
model on each card). When the server serves several models, each GPU
model's stages are processes of their own, also for a model on one device
(`LLM(stage_processes=True)`): the models do not share the server's
interpreter lock, and a stage that crashes takes only its model down. A
single model, or a model on the CPU, runs a one-device stage in the
server's process: on shared cores a stage process only adds a wake-up per
step (measured on 2 busy cores: 60 decode steps of a tiny model took
1.8-4.2 s in a stage process against 0.25-0.35 s in the server's own);
`--stage-processes` / `--no-stage-processes` decide instead. `load_models`
builds an LLM per spec; a model that fails to load is kept as failed, and a
model whose engine stops later (a stage died) becomes failed when a request
finds it so: both answer 503 while the others serve. `ServedModel.admit`
counts the requests that have not produced a first token yet, the ones a
full server would keep waiting, against --max-waiting.

Knows nothing about HTTP routing or the OpenAI shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ... import LLM
from ...engine.async_llm import AsyncLLM
from ...engine.stats import Stats
from .chat import pick_tool_format
from .output_parser import THINK_CLOSE
from .protocol import RequestError
from .tool_formats import ToolFormat

log = logging.getLogger("pprt.serve")
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait


@dataclass(slots=True)
class ModelSpec:
    """One --model and the options after it."""

    model: str
    name: str | None = None  # --served-model-name (default: the --model argument)
    devices: list[str] | None = None
    options: dict = field(default_factory=dict)  # other LLM(...) keyword arguments
    tool_call_parser: str | None = None  # "hermes" or "xml" (default: from the chat template)

    @property
    def served_name(self) -> str:
        return self.name or self.model


@dataclass(slots=True, eq=False)
class ServedModel:
    name: str
    llm: LLM | None
    error: str | None = None  # why it does not serve (load failure, or its engine stopped)
    tool_format: ToolFormat | None = None
    reasoning: bool = False  # the tokenizer has </think>: replies may hold reasoning
    max_waiting: int = 256
    waiting: int = 0  # admitted requests without a first token yet
    engine: AsyncLLM | None = None

    def __post_init__(self) -> None:
        if self.llm is not None:
            self.engine = AsyncLLM(self.llm)

    @property
    def up(self) -> bool:
        if self.error is None and self.llm is not None and self.llm.executor is None:
            self.error = "its engine has stopped (a stage failed)"  # the LLM closes its stages when one fails
        return self.llm is not None and self.error is None

    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters it serves (requests name them as models); none while it is down."""
        return self.llm.loras if self.up else []

    def check_up(self) -> LLM:
        """The LLM, or RequestError 503 when the model does not serve."""
        if not self.up:
            raise RequestError(503, f"model {self.name!r} is not available: {self.error}", "model",
                               kind="service_unavailable")
        return self.llm

    def fail(self, error: BaseException) -> None:
        """Mark the model failed (its engine loop ended)."""
        if self.error is None:
            self.error = f"{type(error).__name__}: {error}"
            log.error("model %r stopped serving: %s", self.name, self.error)

    def admit(self, requests: int = 1) -> None:
        """Count `requests` as waiting, or RequestError 503 with Retry-After when too many are."""
        if self.waiting + requests > self.max_waiting:
            raise RequestError(503, f"model {self.name!r} has {self.waiting} requests waiting "
                               f"(--max-waiting {self.max_waiting}): retry later", None,
                               kind="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += requests

    def stats(self) -> Stats | None:
        """LLM.stats() (blocking), None while the model does not serve."""
        if not self.up:
            return None
        try:
            return self.llm.stats()
        except RuntimeError as e:  # the engine loop ended since
            self.fail(e)
            return None


def serve_model(name: str, llm: LLM, tool_call_parser: str | None, max_waiting: int) -> ServedModel:
    """Wrap a loaded LLM: its tool-call format and whether it reasons come from its tokenizer."""
    tok = llm.tokenizer
    tool_format = pick_tool_format(tok, llm.config.model_type, tool_call_parser) if tok is not None else None
    reasoning = tok is not None and tok.token_to_id(THINK_CLOSE) is not None
    return ServedModel(name, llm, tool_format=tool_format, reasoning=reasoning, max_waiting=max_waiting)


def load_models(specs: list[ModelSpec], max_waiting: int, stage_processes: bool | None = None,
                build: Callable[..., LLM] = LLM) -> dict[str, ServedModel]:
    """An LLM per spec, in order; one that fails is kept as failed (logged), the others load.

    stage_processes: run every model's stages in processes of their own (True), never a
    one-device model's (False), or decide per model (None: see the module docstring).
    """
    served: dict[str, ServedModel] = {}
    for spec in specs:
        name = spec.served_name
        if name in served:
            raise ValueError(f"two models are served as {name!r}: give each its own --served-model-name")
        try:
            own = stage_processes if stage_processes is not None else len(specs) > 1 and _on_gpu(spec.devices)
            llm = build(spec.model, devices=spec.devices, stage_processes=own, **spec.options)
        except Exception as e:
            log.error("model %r (%s) failed to load: %s", name, spec.model, e)
            served[name] = ServedModel(name, None, error=f"it failed to load: {type(e).__name__}: {e}",
                                       max_waiting=max_waiting)
            continue
        served[name] = serve_model(name, llm, spec.tool_call_parser, max_waiting)
        log.info("model %r ready (%s on %s)", name, spec.model, ", ".join(spec.devices or ["default devices"]))
    return served


def _on_gpu(devices: list[str] | None) -> bool:
    """Whether a model on `devices` (None: LLM's default, every GPU) runs on a GPU."""
    if devices is None:
        return torch.cuda.device_count() > 0
    return any(d.startswith("cuda") for d in devices)
