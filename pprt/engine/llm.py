"""LLM: the public entry point. Starts the stages, runs the scheduler loop,
detokenizes and streams.

The loop keeps the pipeline full (a micro-batch per stage, plus one waiting
at stage 0): it fills it from the scheduler, then waits for the oldest step's
sampled tokens, applies them (stop rules, text) and plans again. With one stage the
executor runs each step at once in this process.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from ..config import default_context, extend_context, parse_dtype
from ..distributed.executor import make_executor
from ..distributed.stage_main import local_device, torchrun_rank
from ..errors import CheckpointError, StageFailed
from ..models.kv import parse_kv_dtype
from ..params import SamplingParams, check_seed
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from ..weights.checkpoint import CheckpointReader, ModelSource, load_config
from ..weights.loader import resolve_tied_head
from .blocks import BlockManager, SlotManager
from .prompts import as_prompt_list, check_vocab
from .scheduler import Scheduler, Sequence
from .stats import StageStats, Stats

log = logging.getLogger("pprt")


@dataclass(slots=True)
class Completion:
    text: str
    token_ids: list[int]  # generated tokens only
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    logprobs: list[dict[int, float]] | None = None  # one dict per generated token, when asked


@dataclass(slots=True, eq=False)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    pieces: list[str] = field(default_factory=list)  # streamed, not yet consumed


class LLM:
    """Run a Qwen checkpoint on one or several devices.

    model: a directory or a hub id. devices: None means every visible GPU (or
    ["cpu"]); several devices make a pipeline, one stage each (under torchrun:
    one stage per rank). split: layers per stage (default: the planner's cut).
    dtype: default float32 on CPU, bfloat16 on CUDA. quant: None, "int4" or
    "fp8" to quantize a float checkpoint while loading (quantized checkpoints:
    GPTQ, AWQ, FP8, compressed-tensors, run in their own format). max_context:
    the longest prompt + generation (default: the checkpoint's window, or the
    window its YaRN serves; past max_position_embeddings YaRN is enabled over
    the window the checkpoint was trained for, e.g. factor 4 over 32768 for
    131072 on Qwen3). rope_scaling: rope scaling instead of the checkpoint's,
    in config.json's spelling, e.g. {"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768}; {"rope_type": "default"}
    turns the checkpoint's off. block_size: tokens per KV block. chunk_size:
    tokens per prefill chunk. kv_cache_memory: bytes of KV pool per stage
    (default: what the plan leaves; at most 64 MiB on CPU). kv_dtype: "auto"
    (the model dtype), "bf16", "fp16", "fp32" or "fp8". memory_budget: bytes
    each device may use (default: a GPU's free memory; on CPU an equal share
    of the available memory). transport: "auto", "nccl", "gloo" or "host".
    seed: for requests without their own seed.
    """

    def __init__(self, model: str, *, devices: list[str] | None = None, split: list[int] | None = None,
                 dtype: str | torch.dtype | None = None, quant: str | None = None,
                 max_context: int | None = None, block_size: int = 16, chunk_size: int = 2048,
                 max_num_seqs: int = 256, kv_cache_memory: int | None = None, kv_dtype: str = "auto",
                 memory_budget: int | list[int] | None = None, transport: str = "auto", seed: int | None = None,
                 rope_scaling: dict | None = None):
        torchrun = torchrun_rank()
        if torchrun is not None:  # each rank is a stage; this one (rank 0) is also the driver
            if torchrun[0] != 0:
                raise RuntimeError("under torchrun, only rank 0 builds the LLM; other ranks call "
                                   "pprt.distributed.stage_main.serve_torchrun()")
            if devices is not None:
                raise ValueError("under torchrun each rank uses its own device: leave devices=None")
            devices = [local_device()] * torchrun[1]
        elif devices is None:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        if not devices:
            raise ValueError("devices must name at least one device")
        if quant not in (None, "int4", "fp8"):
            raise ValueError(f"quant={quant!r} is not supported (None, 'int4' or 'fp8')")
        for name, value in (("block_size", block_size), ("chunk_size", chunk_size), ("max_num_seqs", max_num_seqs),
                            ("max_context", 1 if max_context is None else max_context)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_seed(seed)
        self.source = ModelSource(model)
        self.config = resolve_tied_head(load_config(self.source), CheckpointReader(self.source))
        self.config = self.config.with_rope_scaling(rope_scaling)
        on_cuda = torch.device(devices[0]).type == "cuda"
        self.dtype = parse_dtype(dtype) if dtype is not None else (torch.bfloat16 if on_cuda else torch.float32)
        self.max_context = max_context or default_context(self.config)
        self.config = extend_context(self.config, self.max_context)
        self.tokenizer = _load_tokenizer(self.source)
        self.executor = make_executor(self.source.name, self.config, devices, split=split, dtype=self.dtype,
                                      quant=quant, kv_dtype=parse_kv_dtype(kv_dtype, self.dtype),
                                      block_size=block_size, max_context=self.max_context,
                                      kv_cache_memory=kv_cache_memory, memory_budget=memory_budget,
                                      transport=transport, seed=seed,
                                      chunk_size=chunk_size, torchrun=torchrun is not None,
                                      max_num_seqs=max_num_seqs)
        self.blocks = BlockManager(self.executor.num_blocks, block_size)
        self.slots = SlotManager(self.executor.num_slots) if self.executor.num_slots else None
        self.scheduler = Scheduler(self.blocks, max_context=self.max_context, chunk_size=chunk_size,
                                   max_num_seqs=max_num_seqs, eos_token_ids=self.config.eos_token_ids,
                                   slots=self.slots)
        self._requests: dict[int, _Request] = {}
        self._seqs: dict[int, Sequence] = {}
        self._in_flight: deque = deque()

    # ---- public API --------------------------------------------------------
    def generate(self, prompts, sampling: SamplingParams | None = None) -> list[Completion]:
        """Complete one prompt or a batch (str, list of str, token ids, or lists of token ids).

        Raises ValueError for a prompt of another form, a token id outside the vocabulary or a
        bad sampling field (nothing of the call is queued), RequestTooLarge for a request no
        KV pool could hold, RuntimeError once the LLM is closed.
        """
        self._check_open()
        batch = [self._prepare(p, sampling) for p in as_prompt_list(prompts)]  # all checked before any runs
        reqs: list[_Request] = []
        try:
            for ids, params in batch:
                reqs.append(self._add(ids, params))  # a refused prompt cancels the whole call
            while any(r.seq.finish_reason is None for r in reqs):
                self._step()
        except BaseException:
            for r in reqs:
                self._cancel(r)
            raise
        return [self._complete(r) for r in reqs]

    def stream(self, prompt, sampling: SamplingParams | None = None) -> Generator[str, None, Completion]:
        """Yield the completion's text piece by piece as tokens are produced.

        The generator's return value (StopIteration.value, or `yield from`) is the Completion.
        The prompt and sampling are checked at the call; the request is queued at the first `next()`.
        """
        self._check_open()
        prompts = as_prompt_list(prompt)
        if len(prompts) != 1:
            raise ValueError(f"stream() takes one prompt, got {len(prompts)}: use generate() for a batch")
        return self._stream(*self._prepare(prompts[0], sampling))

    def _stream(self, ids: list[int], params: SamplingParams) -> Generator[str, None, Completion]:
        req = self._add(ids, params)
        try:
            while True:
                while req.pieces:
                    yield req.pieces.pop(0)
                if req.seq.finish_reason is not None:
                    return self._complete(req)
                self._step()
        finally:
            self._cancel(req)

    def chat(self, messages: list[dict], sampling: SamplingParams | None = None, **template_kwargs) -> Completion:
        """Render the model's chat template over `messages` (a non-empty list of dicts with a
        'role') and complete it."""
        self._check_open()
        if not isinstance(messages, (list, tuple)) or not messages or \
                not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ValueError(f"chat() needs a non-empty list of messages, each a dict with a 'role' "
                             f"(and 'content'); got {str(messages)[:80]}")
        if self.tokenizer is None:
            raise ValueError(f"model {self.source.name!r} has no tokenizer.json: chat needs one")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return self.generate(prompt, sampling)[0]

    def stats(self) -> Stats:
        """A snapshot of the counters (see `pprt.engine.stats.Stats`); works while steps are in flight."""
        self._check_open()
        ex, sched = self.executor, self.scheduler
        stages = tuple(
            StageStats(i, spec.device, tuple(spec.layers), weight, kv, c.busy_seconds, c.wait_seconds, c.steps,
                       c.peak_rss_bytes, c.peak_device_bytes, state)
            for i, (spec, c, weight, kv, state)
            in enumerate(zip(ex.specs, ex.stats(), ex.weight_bytes, ex.kv_bytes, ex.state_bytes)))
        slots = self.slots
        return Stats(
            requests_running=len(sched.running), requests_waiting=len(sched.waiting),
            requests_finished=sched.num_finished, prompt_tokens=sched.num_prompt_tokens,
            computed_tokens=sched.num_computed_tokens, generated_tokens=sched.num_generated_tokens,
            preemptions=sched.num_preemptions, kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_blocks - self.blocks.num_free, kv_block_size=self.blocks.block_size,
            state_slots_total=slots.num_slots if slots else 0,
            state_slots_used=slots.num_slots - slots.num_free if slots else 0,
            load_seconds=ex.load_seconds, quantize_seconds=ex.quant_seconds, stages=stages)

    def close(self) -> None:
        executor, self.executor = getattr(self, "executor", None), None
        if executor is not None:
            executor.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------
    def _check_open(self) -> None:
        if getattr(self, "executor", None) is None:
            raise RuntimeError("this LLM is closed")

    def _prepare(self, prompt: str | list[int], sampling: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        """Token ids and resolved sampling of one prompt (from as_prompt_list), every id checked."""
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        params = (sampling or SamplingParams()).resolve(self.config.generation_defaults)  # re-validates
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.source.name!r} has no tokenizer.json: give token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = prompt
        check_vocab(ids, self.config.vocab_size, "prompt")
        check_vocab(params.stop_token_ids, self.config.vocab_size, "stop_token_ids:")
        return ids, params

    def _add(self, ids: list[int], params: SamplingParams) -> _Request:
        self._check_open()
        seq = self.scheduler.add(ids, params)
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        req = _Request(seq, detok)
        self._requests[seq.seq_id] = req
        self._seqs[seq.seq_id] = seq
        return req

    def _step(self) -> None:
        """Fill the pipeline, then apply the oldest step's tokens."""
        self._check_open()  # e.g. a stream still iterated after close()
        active = len(self.scheduler.running) + len(self.scheduler.waiting)
        group = max(1, math.ceil(active / self.executor.depth))
        # A pipeline keeps one micro-batch more than it has stages in flight: the extra one
        # waits in stage 0's queue, so stage 0 does not idle while a result makes its way
        # back through the driver (bench/pipeline.py measured 6-8% idle per stage without).
        limit = self.executor.depth + 1 if self.executor.depth > 1 else 1
        while len(self._in_flight) < limit:
            plan = self.scheduler.schedule(max_seqs=group)
            if plan is None:
                break
            try:
                self.executor.submit(plan)
            except StageFailed:
                self.close()  # a pipeline with a dead stage cannot go on: end the others now
                raise
            except BaseException:  # the step never ran (an error in this process): undo its plan
                self.scheduler.abort(plan, self._seqs)
                raise
            self._in_flight.append(plan)
        if not self._in_flight:
            raise RuntimeError("the scheduler has work but could not plan a step")
        try:
            result = self.executor.result()
        except StageFailed:
            self.close()
            raise
        # Only now is the plan done: an interrupt while waiting leaves it in flight, and its
        # result is the next one to come back.
        plan = self._in_flight.popleft()
        for seq in self.scheduler.complete(plan, result, self._seqs):
            self._on_token(seq)
        for chunk in plan.chunks:
            self._forget_if_done(chunk.seq_id)

    def _forget_if_done(self, seq_id: int) -> None:
        """Drop a finished sequence once nothing of it is in flight."""
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.finish_reason is not None and seq.in_flight == 0:
            del self._seqs[seq_id]

    def _on_token(self, seq: Sequence) -> None:
        req = self._requests.get(seq.seq_id)
        if req is None or req.detok is None:
            return
        token = seq.output_ids[-1]
        if not self.scheduler.is_stop_token(seq, token):  # the text of a stop token is not output
            req.text += req.detok.push(token)
        if seq.finish_reason is not None:
            req.text += req.detok.flush()
        stop = seq.params.stop
        if stop:
            cut = _find_stop(req.text, stop, since=req.emitted)
            if cut is not None:
                req.text = req.text[:cut]
                self.scheduler.finish(seq, "stop")
                seq.finish_reason = "stop"  # also when this token was the last one allowed
        # Hold back a tail that could still become a stop string.
        hold = 0 if seq.finish_reason is not None else max((len(s) - 1 for s in stop), default=0)
        end = max(req.emitted, len(req.text) - hold)
        if end > req.emitted:
            req.pieces.append(req.text[req.emitted:end])
            req.emitted = end

    def _cancel(self, req: _Request) -> None:
        """Stop `req` if it is still running and forget it."""
        if req.seq.finish_reason is None:
            self.scheduler.finish(req.seq, "cancelled")
        self._requests.pop(req.seq.seq_id, None)
        self._forget_if_done(req.seq.seq_id)

    def _complete(self, req: _Request) -> Completion:
        self._requests.pop(req.seq.seq_id, None)
        seq = req.seq
        text = req.text if req.detok is not None else ""
        logprobs = list(seq.logprobs) if seq.params.logprobs is not None else None
        return Completion(text, list(seq.output_ids), list(seq.prompt_ids), seq.finish_reason, logprobs)


def _find_stop(text: str, stops: tuple[str, ...], since: int) -> int | None:
    """Index where the earliest stop string starts in `text` (searching from near `since`)."""
    found = [i for s in stops if (i := text.find(s, max(0, since - len(s)))) >= 0]
    return min(found) if found else None


def _load_tokenizer(source: ModelSource) -> Tokenizer | None:
    path = source.get("tokenizer.json")
    if path is None:
        log.warning("model %r has no tokenizer.json: prompts must be token ids", source.name)
        return None
    try:
        return Tokenizer.from_files(path, source.get("tokenizer_config.json"), source.get("chat_template.jinja"))
    except Exception as e:  # a broken tokenizer is a broken checkpoint
        raise CheckpointError(f"model {source.name!r}: cannot load its tokenizer ({e})") from e
