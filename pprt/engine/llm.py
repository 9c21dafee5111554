"""LLM: the public entry point. Starts the stages and the engine loop, takes prompts, returns text.

The caller's side of the engine: prompts become token ids and resolved
sampling parameters here (in the caller's thread, so a bad prompt raises at
once and nothing of it starts), then go to the engine loop (loop.py), whose
thread runs the steps for every caller together. `generate`, `stream` and
`chat` wait for their requests' outputs in the caller's thread; Ctrl-C (or
any exception) there cancels that call's requests and leaves the LLM usable.
`submit` and `cancel` are the non-blocking form a server builds on.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import weakref
from collections.abc import Generator

import torch

from ..config import default_context, extend_context, parse_dtype
from ..distributed.executor import make_executor
from ..distributed.pipeline import DEFAULT_STAGE_TIMEOUT_S
from ..distributed.stage_main import local_device, torchrun_rank
from ..errors import CheckpointError
from ..models.kv import parse_kv_dtype
from ..params import SamplingParams, check_seed
from ..tokenizer import Tokenizer
from ..weights.checkpoint import CheckpointReader, ModelSource, load_config
from ..weights.loader import check_mtp_head, resolve_tied_head
from ..weights.lora import LoraAdapter, linear_shapes, read_adapter, slot_bytes
from .blocks import BlockManager, SlotManager, SnapshotCache
from .drafts import SpeculativeConfig
from .loop import EngineLoop
from .loras import LoraRegistry
from .prefix import cache_salt, prefix_cache_for
from .prompts import as_prompt_list, check_vocab
from .requests import Completion, OutputSink, RequestOutput
from .scheduler import Scheduler
from .stats import Stats

log = logging.getLogger("pprt")


class LLM:
    """Run a Qwen checkpoint on one or several devices.

    model: a directory or a hub id. devices: None means every visible GPU (or
    ["cpu"]); several devices make a pipeline, one stage process each (under
    torchrun: one stage per rank). split: layers per stage (default: the
    planner's cut). dtype: default float32 on CPU, bfloat16 on CUDA. quant:
    None, "int4" or "fp8" to quantize a float checkpoint while loading
    (quantized checkpoints: GPTQ, AWQ, FP8, compressed-tensors, run in their
    own format). max_context: the longest prompt + generation (default: the
    checkpoint's window, or the window its YaRN serves; past
    max_position_embeddings YaRN is enabled over the window the checkpoint was
    trained for, e.g. factor 4 over 32768 for 131072 on Qwen3). rope_scaling:
    rope scaling instead of the checkpoint's, in config.json's spelling, e.g.
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings":
    32768}; {"rope_type": "default"} turns the checkpoint's off. block_size:
    tokens per KV block. chunk_size: tokens per prefill chunk.
    kv_cache_memory: bytes of KV pool per stage (default: what the plan
    leaves; at most 64 MiB on CPU). kv_dtype: "auto" (the model dtype),
    "bf16", "fp16", "fp32" or "fp8". memory_budget: bytes each device may use
    (default: a GPU's free memory; on CPU an equal share of the available
    memory). transport: "auto", "nccl", "gloo" or "host". seed: for requests
    without their own seed. stage_timeout: seconds a stage process may leave
    a heartbeat unanswered before it counts as hung (StageFailed naming it).
    enable_prefix_caching: reuse the KV of full blocks across requests that
    share a prefix (pprt.engine.prefix; on by default). state_snapshots:
    hybrid models with prefix caching, state slots kept for snapshots of the
    recurrent and conv state, each one sequence's state on every stage
    (default: max_num_seqs, fewer when memory is short; 0 turns prefix
    caching off for hybrid models).
    lora: {name: directory or hub id} of PEFT LoRA adapters to load (see
    pprt.weights.lora for what is served); a request picks one with
    SamplingParams(lora=name), and requests of different adapters and none share
    a batch. max_loras: adapter slots on every stage (default: len(lora));
    `load_lora` / `unload_lora` change them later. merge: fold the one adapter of
    `lora` into the float base weights at load (no per-token cost; every request
    then runs with it, and load_lora is refused).
    stage_processes: run a single stage in a process of its own too (several
    devices always do), e.g. so that several models in one program (the
    server's one model per card) neither share its interpreter lock nor fall
    together when one's stage crashes.
    enforce_eager: no CUDA graphs (by default each CUDA stage captures its
    decode step at padded batch sizes up to max_num_seqs after loading, and
    replays them for pure-decode steps).
    speculative: speculative decoding, e.g. {"method": "ngram",
    "num_speculative_tokens": 3} (prompt lookup) or {"method": "mtp",
    "num_speculative_tokens": 2} (the checkpoint's own multi-token-prediction
    head, on the last stage; a checkpoint without one raises CheckpointError)
    (see pprt.engine.drafts.SpeculativeConfig); None: off. Requests with
    logprobs or a repetition, presence or frequency penalty are not drafted.

    Every method may be called from any thread; calls from several threads
    are served together (their requests share the running batch).
    """

    def __init__(self, model: str, *, devices: list[str] | None = None, split: list[int] | None = None,
                 dtype: str | torch.dtype | None = None, quant: str | None = None,
                 max_context: int | None = None, block_size: int = 16, chunk_size: int = 2048,
                 max_num_seqs: int = 256, kv_cache_memory: int | None = None, kv_dtype: str = "auto",
                 memory_budget: int | list[int] | None = None, transport: str = "auto", seed: int | None = None,
                 rope_scaling: dict | None = None, stage_timeout: float = DEFAULT_STAGE_TIMEOUT_S,
                 enable_prefix_caching: bool = True, state_snapshots: int | None = None,
                 lora: dict[str, str] | None = None, max_loras: int | None = None, merge: bool = False,
                 speculative: SpeculativeConfig | dict | None = None, stage_processes: bool = False,
                 enforce_eager: bool = False):
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
        if isinstance(stage_timeout, bool) or not isinstance(stage_timeout, (int, float)) or not stage_timeout > 0:
            raise ValueError(f"stage_timeout must be a positive number of seconds, got {stage_timeout!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        if state_snapshots is not None and (not isinstance(state_snapshots, int) or isinstance(state_snapshots, bool)
                                            or state_snapshots < 0):
            raise ValueError(f"state_snapshots must be an int >= 0, got {state_snapshots!r}")
        if not isinstance(stage_processes, bool):
            raise ValueError(f"stage_processes must be True or False, got {stage_processes!r}")
        if not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager must be True or False, got {enforce_eager!r}")
        check_seed(seed)
        speculative = SpeculativeConfig.parse(speculative)
        self.source = ModelSource(model)
        config = load_config(self.source)  # (a bad config.json is named before missing weights)
        reader = CheckpointReader(self.source)
        self.config = resolve_tied_head(config, reader)
        mtp = speculative is not None and speculative.mtp
        if mtp:
            check_mtp_head(self.config, reader)  # CheckpointError naming what is missing
        self.config = self.config.with_rope_scaling(rope_scaling)
        on_cuda = torch.device(devices[0]).type == "cuda"
        self.dtype = parse_dtype(dtype) if dtype is not None else (torch.bfloat16 if on_cuda else torch.float32)
        self.max_context = max_context or default_context(self.config)
        self.config = extend_context(self.config, self.max_context)
        self.tokenizer = _load_tokenizer(self.source)
        kv_type = parse_kv_dtype(kv_dtype, self.dtype)
        snapshots = 0
        if enable_prefix_caching and self.config.hybrid:
            snapshots = max_num_seqs if state_snapshots is None else state_snapshots
        adapters, max_loras, self.merged_lora = _read_loras(self.config, lora, max_loras, merge)
        executor = make_executor(self.source.name, self.config, devices, split=split, dtype=self.dtype,
                                 quant=quant, kv_dtype=kv_type,
                                 block_size=block_size, max_context=self.max_context,
                                 kv_cache_memory=kv_cache_memory, memory_budget=memory_budget,
                                 transport=transport, seed=seed, stage_timeout=float(stage_timeout),
                                 chunk_size=chunk_size, torchrun=torchrun is not None,
                                 max_num_seqs=max_num_seqs, state_snapshots=snapshots, max_loras=max_loras,
                                 merged_lora=adapters[0] if merge else None,
                                 lora_layer_bytes=slot_bytes(adapters, max_loras, self.config.num_layers,
                                                             self.dtype.itemsize) if max_loras else None,
                                 stage_processes=stage_processes, enforce_eager=enforce_eager,
                                 mtp_tokens=speculative.num_speculative_tokens if mtp else 0,
                                 draft_snapshots=speculative is not None)
        loras = LoraRegistry(max_loras) if max_loras else None
        for adapter in adapters if loras is not None else ():
            loras.add(adapter)
        slots = SlotManager(executor.num_slots) if executor.num_slots else None
        # the chains' root names what decides a block's KV besides its tokens
        prefix = prefix_cache_for(self.config, enabled=enable_prefix_caching, block_size=block_size,
                                  salt=cache_salt(self.config.rope, self.dtype, kv_type, quant, self.config.quant),
                                  snapshots=SnapshotCache(executor.num_slots, executor.num_snapshots) if slots else None,
                                  snapshot_every=max(block_size, chunk_size // block_size * block_size),
                                  lookahead=int(mtp))
        scheduler = Scheduler(BlockManager(executor.num_blocks, block_size), max_context=self.max_context,
                              chunk_size=chunk_size, max_num_seqs=max_num_seqs,
                              eos_token_ids=self.config.eos_token_ids, slots=slots, loras=loras,
                              speculative=speculative, prefix=prefix)
        self._engine = EngineLoop(executor, scheduler, self.tokenizer)
        # close() at garbage collection or interpreter exit, whichever comes first
        self._finalizer = weakref.finalize(self, self._engine.close)

    @property
    def executor(self):
        """The stages (None once closed)."""
        return self._engine.executor

    @property
    def scheduler(self) -> Scheduler:
        return self._engine.scheduler

    @property
    def blocks(self) -> BlockManager:
        return self._engine.blocks

    @property
    def slots(self) -> SlotManager | None:
        """The state slots of a hybrid model (None for models without recurrent state)."""
        return self._engine.scheduler.slots

    # ---- public API --------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Load the PEFT LoRA adapter at `path` (directory or hub id) under `name`, for requests with
        SamplingParams(lora=name). Checked here against the model (CheckpointError naming the field
        or tensor); the stages read it before the next step. Raises ValueError when the name is
        taken, every slot (max_loras) is used, or the LLM was built without adapter slots."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA adapter's name must be a non-empty str, got {name!r}")
        loras = self._engine.scheduler.loras
        if loras is None:
            raise ValueError("this LLM has no LoRA slots: build it with max_loras=N (or lora={...} without merge)")
        adapter = read_adapter(name, path, self.config)
        self._engine.call(lambda: loras.add(adapter))

    def unload_lora(self, name: str) -> None:
        """Free adapter `name`'s slot. Raises ValueError for an unknown name or one that unfinished
        requests still use."""
        self._check_open()
        loras = self._engine.scheduler.loras
        if loras is None:
            raise ValueError("this LLM has no LoRA slots")

        def unload() -> None:
            loras.slot_of(name)
            busy = self._engine.scheduler.uses_lora(name)
            if busy:
                raise ValueError(f"LoRA adapter {name!r} is used by {busy} unfinished request(s)")
            loras.remove(name)

        self._engine.call(unload)

    @property
    def loras(self) -> list[str]:
        """Names of the adapters requests may choose (the merged one included)."""
        loras = self._engine.scheduler.loras
        return ([self.merged_lora.name] if self.merged_lora else []) + (loras.names if loras else [])

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Complete one prompt or a batch (str, list of str, token ids, or lists of token ids).

        sampling: one SamplingParams for every prompt, or a list of one per prompt (so one call
        can mix LoRA adapters and settings).

        Raises ValueError for a prompt of another form, a token id outside the vocabulary or a
        bad sampling field, RequestTooLarge for a request no KV pool could hold (then nothing
        of the call is queued), StageFailed when a stage fails, RuntimeError once closed.
        """
        self._engine.refuse_on_loop_thread("generate")
        self._check_open()
        prompt_list = as_prompt_list(prompts)
        if isinstance(sampling, (list, tuple)):
            if len(sampling) != len(prompt_list):
                raise ValueError(f"{len(sampling)} SamplingParams for {len(prompt_list)} prompts: give one, "
                                 "or one per prompt")
            per_prompt = list(sampling)
        else:
            per_prompt = [sampling] * len(prompt_list)
        prepared = [self._prepare(p, s) for p, s in zip(prompt_list, per_prompt)]  # all checked before any runs
        finished: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        ids = [self._engine.new_request_id() for _ in prepared]
        completions: dict[int, Completion] = {}

        def on_output(out: RequestOutput) -> None:  # only the last output of each request wakes this thread
            if out.finished:
                finished.put(out)

        try:
            for request_id, (prompt_ids, params) in zip(ids, prepared):
                self._engine.add(request_id, prompt_ids, params, on_output)
            while len(completions) < len(ids):
                out = finished.get()
                if out.error is not None:
                    raise out.error
                completions[out.request_id] = out.completion
        except BaseException:  # Ctrl-C, or one request failed: the call's other requests stop too
            for request_id in ids:
                self._engine.cancel(request_id)
            raise
        return [completions[i] for i in ids]

    def stream(self, prompt, sampling: SamplingParams | None = None) -> Generator[str, None, Completion]:
        """Yield the completion's text piece by piece as tokens are produced.

        The generator's return value (StopIteration.value, or `yield from`) is the Completion.
        The prompt and sampling are checked at the call; the request is queued at the first
        `next()`, and closing the generator early cancels it.
        """
        self._engine.refuse_on_loop_thread("stream")
        self._check_open()
        prompts = as_prompt_list(prompt)
        if len(prompts) != 1:
            raise ValueError(f"stream() takes one prompt, got {len(prompts)}: use generate() for a batch")
        return self._stream(*self._prepare(prompts[0], sampling))

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Generator[str, None, Completion]:
        outputs: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        request_id = self._engine.new_request_id()
        done = False
        try:
            self._engine.add(request_id, prompt_ids, params, outputs.put)
            while True:
                out = outputs.get()
                done = out.finished
                if out.error is not None:
                    raise out.error
                if out.text:
                    yield out.text
                if done:
                    return out.completion
        finally:
            if not done:
                self._engine.cancel(request_id)

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

    def submit(self, prompt, sampling: SamplingParams | None = None, on_output: OutputSink | None = None) -> int:
        """Start one request without waiting for it; returns its id (for `cancel`).

        `on_output` receives every RequestOutput of the request, in order, on the engine
        loop's thread, and must return at once: e.g. `queue.put`, or from asyncio
        `lambda out: loop.call_soon_threadsafe(q.put_nowait, out)`. Its last output is
        `finished` (a Completion, or the error that ended the request). Raises like `generate`.
        """
        self._check_open()
        prompts = as_prompt_list(prompt)
        if len(prompts) != 1:
            raise ValueError(f"submit() takes one prompt (a str or a list of token ids), got {len(prompts)}")
        prompt_ids, params = self._prepare(prompts[0], sampling)
        request_id = self._engine.new_request_id()
        self._engine.add(request_id, prompt_ids, params, on_output or _ignore)
        return request_id

    def cancel(self, request_id: int) -> None:
        """Stop a request started by `submit` (its last output says "cancelled"); finished ids are ignored."""
        self._engine.cancel(request_id)

    def stats(self) -> Stats:
        """A snapshot of the counters (see `pprt.engine.stats.Stats`); from any thread, also while steps
        are in flight (it is taken between two steps)."""
        return self._engine.stats()

    def close(self) -> None:
        """Stop the engine loop and the stages; waiting calls in other threads raise RuntimeError."""
        self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self._engine.closed_reason is not None:
            raise RuntimeError(self._engine.closed_reason)

    def _prepare(self, prompt: str | list[int], sampling: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        """Token ids and resolved sampling of one prompt (from as_prompt_list), checked so that the
        engine loop can serve it: every id, the sampling fields, the KV it needs."""
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        params = (sampling or SamplingParams()).resolve(self.config.generation_defaults)  # re-validates
        if params.lora is not None:
            if self.merged_lora is not None and params.lora == self.merged_lora.name:
                params = dataclasses.replace(params, lora=None)  # merged into the weights
            elif self._engine.scheduler.loras is None:
                raise ValueError(f"no LoRA adapter named {params.lora!r}: this LLM has none loaded")
            else:
                self._engine.scheduler.loras.slot_of(params.lora)  # ValueError naming the known ones
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.source.name!r} has no tokenizer.json: give token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = prompt
        check_vocab(ids, self.config.vocab_size, "prompt")
        check_vocab(params.stop_token_ids, self.config.vocab_size, "stop_token_ids:")
        self._engine.scheduler.check(ids, params)
        return ids, params


def _ignore(out: RequestOutput) -> None:
    pass


def _read_loras(config, lora: dict[str, str] | None, max_loras: int | None,
                merge: bool) -> tuple[list[LoraAdapter], int, LoraAdapter | None]:
    """The adapters of LLM(lora=...), checked against the model; the slots each stage holds; the merged one."""
    if lora is not None and not (isinstance(lora, dict) and all(isinstance(k, str) and k for k in lora)):
        raise ValueError(f"lora must be a dict {{name: directory or hub id}}, got {lora!r}")
    lora = lora or {}
    if max_loras is not None and (not isinstance(max_loras, int) or isinstance(max_loras, bool) or max_loras < 0):
        raise ValueError(f"max_loras must be an int >= 0, got {max_loras!r}")
    shapes = linear_shapes(config) if lora else {}
    adapters = [read_adapter(name, str(path), config, shapes) for name, path in lora.items()]
    if merge:
        if len(adapters) != 1 or max_loras:
            raise ValueError(f"merge=True folds exactly one adapter into the weights (got {len(adapters)}; "
                             "and no max_loras)")
        return adapters, 0, adapters[0]
    slots = len(adapters) if max_loras is None else max_loras
    if slots < len(adapters):
        raise ValueError(f"max_loras={max_loras} is fewer than the {len(adapters)} adapters given")
    return adapters, slots, None


def _load_tokenizer(source: ModelSource) -> Tokenizer | None:
    path = source.get("tokenizer.json")
    if path is None:
        log.warning("model %r has no tokenizer.json: prompts must be token ids", source.name)
        return None
    try:
        return Tokenizer.from_files(path, source.get("tokenizer_config.json"), source.get("chat_template.jinja"))
    except Exception as e:  # a broken tokenizer is a broken checkpoint
        raise CheckpointError(f"model {source.name!r}: cannot load its tokenizer ({e})") from e
