"""One stage: build it, load its weights, allocate its pools, execute step plans.

A `Worker` is what runs on each device. In a one-device run it lives in the
caller's process; in a pipeline each lives in its own process (see comm.py
and engine.py) and is driven the same way: `execute(plan, x)` runs the stage
on one micro-batch. Its pools: KV blocks for its full-attention layers and, for
hybrid models, state slots for its DeltaNet layers (slots of chunks that start
at position 0 are zeroed before the step runs; with prefix caching, snapshots
are restored into slots before it runs and saved from them after it ran; under
speculative decoding a chunk's state is first restored from, then copied to,
its own snapshot slot). The last stage samples, or accepts drafts
(pprt.models.speculative); with MTP drafting (`WorkerSpec.mtp`) it also holds
the model's MTP head, whose KV is one more layer of its KV pool, and drafts
after sampling (mtp_drafts.py; such a last stage runs eagerly, without CUDA graphs). A step's tensors come from `StepInputs` (one copy
to the device); pure-decode steps without a LoRA adapter replay CUDA graphs
(graphs.py) unless the spec says `cuda_graphs="off"`. Only the last stage
waits for the device (for the sampled ids): a non-last stage hands its output
to the transport, which is ordered after it on the device. Knows nothing of
tokenization or scheduling.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.kv import CacheSpec, KVCache, StateCache, StateSpec
from ..models.lora import LoraBank, merge_lora
from ..models.sampler import Sampler
from ..models.speculative import verify
from ..models.stage import Stage
from ..weights.checkpoint import CheckpointReader, ModelSource
from ..weights.loader import load_stage
from ..weights.lora import LoraAdapter
from .graphs import DecodeGraphs
from .mtp_drafts import MTPDrafter
from .step import PoolSizes, StepPlan, StepResult
from .step_inputs import StepInputs

CUDA_GRAPHS = ("auto", "off", "padded")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a stage process needs to build itself (picklable)."""

    model: str  # directory or hub id
    config: ModelConfig
    layers: tuple[int, int]
    device: str
    dtype: torch.dtype
    quant: str | None = None
    kv_dtype: torch.dtype | None = None  # None: the model dtype
    block_size: int = 16
    seed: int | None = None
    max_loras: int = 0  # LoRA adapter slots (0: none)
    merged_lora: LoraAdapter | None = None  # folded into the float base weights at load
    max_context: int | None = None  # the longest sequence (None: the config's max_position_embeddings)
    max_num_seqs: int = 256  # the most sequences of a step: the largest CUDA graph
    # "auto": CUDA graphs of decode steps on a CUDA device; "off": eager (enforce_eager);
    # "padded": the graphs' padded static-buffer path run eagerly (tests; any device)
    cuda_graphs: str = "auto"
    mtp: bool = False  # MTP drafting: the last stage holds the model's MTP head (and the embedding)

    @property
    def holds_mtp(self) -> bool:
        """This stage holds the MTP head: MTP drafting is on and it is the last stage."""
        return self.mtp and self.layers[1] == self.config.num_layers

    def __post_init__(self) -> None:
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ValueError(f"cuda_graphs={self.cuda_graphs!r} is not one of {', '.join(CUDA_GRAPHS)}")


@dataclass(frozen=True, slots=True)
class StageBoot:
    """The first message a stage program receives from the driver that started it."""

    stage: int
    world: int
    spec: WorkerSpec
    transport: str  # "nccl", "gloo" or "host"
    init_method: str  # the process group's rendezvous, e.g. tcp://127.0.0.1:PORT
    pools: PoolSizes  # KV blocks and state slots wanted (the stage reports how many its memory allows)
    threads: int | None  # torch threads of the stage (None: torch's default)
    group_timeout_s: float  # a blocking transfer between stages fails after this long


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it does not
    inherit the peak of the process that forked before exec, as spawned stages are)."""
    return _proc_status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


log = logging.getLogger("pprt")
GPU_MEMORY_FRACTION = 0.90  # of a GPU's free memory after weights, at most, for the KV and state pools


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.device = torch.device(spec.device)
        t0 = time.perf_counter()
        self.stage = Stage(spec.config, spec.layers, mtp=spec.mtp)
        rss_before = current_rss_bytes()
        # q/k/v and gate/up merged also with LoRA slots: adapters add to their part of the merged layer
        self.quant_seconds = load_stage(self.stage, CheckpointReader(ModelSource(spec.model)),
                                        self.device, spec.dtype, spec.quant)
        if spec.merged_lora is not None:
            merge_lora(self.stage, spec.merged_lora.stage_tensors(spec.layers, self.device, torch.float32))
        self.load_rss_bytes = peak_rss_bytes() - rss_before  # host memory the load took at its peak
        self.load_seconds = time.perf_counter() - t0
        if spec.quant:
            log.info("layers %d-%d: loaded in %.2f s, of which %.2f s quantizing to %s", self.stage.lo,
                     self.stage.hi - 1, self.load_seconds, self.quant_seconds, spec.quant)
        self.cache_spec = cache_spec(spec)
        self.state_spec = state_spec(spec)
        self.cache: KVCache | None = None
        self.state: StateCache | None = None
        self.sampler = Sampler(spec.config.vocab_size, self.device, spec.seed) if self.stage.is_last else None
        # time spent in steps: on a CUDA stage other than the last, the time to issue them
        self.busy_seconds = 0.0
        self.inputs: StepInputs | None = None  # with the pools
        self.graphs: DecodeGraphs | None = None
        self.drafter: MTPDrafter | None = None  # with the pools (MTP drafting, last stage)
        self.loras = LoraBank(self.stage, spec.max_loras, self.device, spec.dtype) if spec.max_loras else None
        self._lora_step = False  # the step being run has tokens with an adapter

    def peak_device_bytes(self) -> int | None:
        """Peak GPU memory this stage allocated (None on CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.stage.state_dict().values())

    def allocate_cache(self, pools: PoolSizes) -> None:
        """The KV pool, (hybrid models with DeltaNet layers on this stage) the state pool, the step
        inputs and (CUDA) the decode graphs, captured now. Padded decode steps get a scratch KV
        block and a scratch state slot."""
        mode = self.graph_mode()
        padded = mode != "off"
        self.cache = KVCache(self.cache_spec, pools.blocks, self.device, pad_block=padded)
        if self.state_spec is not None and self.state_spec.num_layers and pools.slots:
            self.state = StateCache(self.state_spec, pools.slots + pools.snapshots, self.device, pad_slot=padded)
        max_context = self.spec.max_context or self.spec.config.max_position_embeddings
        columns = -(-max_context // self.spec.block_size)
        self.inputs = StepInputs(self.device, self.spec.block_size, columns, self.cache.pad_block,
                                 state=self.state is not None,
                                 pad_slot=self.state.pad_slot if self.state is not None else None)
        if self.spec.holds_mtp:  # the head's KV: the pool's layer after the stage's own
            self.drafter = MTPDrafter(self.stage, self.cache.layer(self.stage.num_attention_layers), self.inputs)
        if not padded:
            return
        try:
            self.graphs = DecodeGraphs(self.stage, self.cache, self.state, self.inputs, self.spec.max_num_seqs,
                                       columns, self.spec.dtype, capture=mode == "capture")
        except Exception as e:  # a kernel that cannot be captured: this stage runs eagerly
            if mode != "capture":
                raise
            log.warning("layers %d-%d: CUDA graph capture failed, running eagerly: %s: %s", self.stage.lo,
                        self.stage.hi - 1, type(e).__name__, e)
            self.graphs = None

    def graph_mode(self) -> str:
        """"capture" (CUDA graphs), "padded" (their path, eager) or "off" (always off on a last stage
        that drafts with the MTP head: its steps go on after the stage's layers)."""
        mode = self.spec.cuda_graphs
        if self.spec.holds_mtp:
            return "off"
        if mode == "auto":
            return "capture" if self.device.type == "cuda" else "off"
        return mode

    @property
    def pool_bytes(self) -> tuple[int, int]:
        """(KV pool, state pool) bytes as allocated."""
        return self.cache.nbytes, self.state.nbytes if self.state is not None else 0

    def execute(self, plan: StepPlan, x: torch.Tensor | None = None) -> torch.Tensor | StepResult:
        """Run one micro-batch: returns hidden states [T, H], or on the last stage the sampled tokens.

        `x` is the previous stage's hidden states (None on the first stage).
        """
        t0 = time.perf_counter()
        # Idempotent: a plan that failed here may be sent again (see Scheduler.abort).
        for seq_id in plan.removed:
            self.inputs.forget(seq_id)
            if self.sampler is not None and seq_id in self.sampler:
                self.sampler.remove(seq_id)
        if self.sampler is not None:
            for new in plan.added:
                if new.seq_id not in self.sampler:
                    self.sampler.add(new.seq_id, new.params, new.prompt_ids)
        self._apply_loras(plan)
        size = self.graphs.size_for(plan) if self.graphs is not None and not self._lora_step else None
        if size is not None:
            out = self.graphs.run(plan, x, size)  # every row samples
        else:
            step = self.inputs.build(plan)
            if self.loras is not None:
                self.loras.bind(step.lora_slots)
            if self.state is not None:  # sequences (re)starting at position 0 start from zero state
                self.state.reset(step.fresh_slots)
                self.state.copy(*step.resume)  # prefix cache: resume from a snapshot
                # speculation: roll back to the snapshot, then snapshot the state the drafts start from
                self.state.copy(*step.restore)
                self.state.copy(*step.keep)
            out = self.stage(step.token_ids if self.stage.is_first else x, step.batch, self.cache, self.state,
                             step.logits_indices if self.stage.is_last else None,
                             with_hidden=self.drafter is not None)
            if self.state is not None:  # prefix cache: snapshots of the state after this step's tokens
                self.state.copy(*step.save)
        if not self.stage.is_last:
            self.busy_seconds += time.perf_counter() - t0
            return out
        hidden = None
        if self.drafter is not None:
            out, hidden = out  # logits, and every row's hidden state after the final norm
        if any(c.num_drafts for c in plan.chunks):
            result = self._verify(plan, out)
        else:
            seq_ids = [c.seq_id for c in plan.chunks if c.sample]
            sampled = self.sampler.sample(seq_ids, out) if seq_ids else None
            result = StepResult(plan.step, seq_ids, sampled.token_ids if sampled else [],
                                sampled.logprobs if sampled else None)
        if self.drafter is not None:
            drafts = self.drafter.run(plan, step, hidden, result)
            result.drafts = drafts if any(c.propose for c in plan.chunks) else None
        result.compute_seconds = time.perf_counter() - t0
        self.busy_seconds += result.compute_seconds
        return result

    def _verify(self, plan: StepPlan, logits: torch.Tensor) -> StepResult:
        """A step with drafts: plain sampling for chunks without, acceptance for those with
        (pprt.models.speculative); logits [R, V] hold each sampling chunk's last num_drafts + 1 rows."""
        sampling = [c for c in plan.chunks if c.sample]
        rows = torch.tensor([0] + [c.num_drafts + 1 for c in sampling]).cumsum(0).tolist()
        plain = [i for i, c in enumerate(sampling) if not c.num_drafts]
        spec = [i for i, c in enumerate(sampling) if c.num_drafts]
        tokens, accepted, logprobs = [0] * len(sampling), [[] for _ in sampling], None
        if plain:
            sampled = self.sampler.sample([sampling[i].seq_id for i in plain],
                                          logits[torch.tensor([rows[i] for i in plain], device=logits.device)])
            for j, i in enumerate(plain):
                tokens[i] = sampled.token_ids[j]
            if sampled.logprobs is not None:
                logprobs = [None] * len(sampling)
                for j, i in enumerate(plain):
                    logprobs[i] = sampled.logprobs[j]
        spec_rows = torch.cat([torch.arange(rows[i], rows[i + 1]) for i in spec]).to(logits.device)
        verified = verify(self.sampler, [sampling[i].seq_id for i in spec],
                          [sampling[i].token_ids[-sampling[i].num_drafts:] for i in spec], logits[spec_rows])
        for j, i in enumerate(spec):
            tokens[i], accepted[i] = verified.token_ids[j], verified.accepted[j]
        return StepResult(plan.step, [c.seq_id for c in sampling], tokens, logprobs, accepted=accepted)


    def _apply_loras(self, plan: StepPlan) -> None:
        """Fill or empty the plan's adapter slots, and note whether a token of the step has an adapter
        (the tokens' slots travel with the step inputs; such a step runs eagerly)."""
        for change in plan.loras:
            if change.adapter is None:
                self.loras.remove(change.slot)
            else:
                tensors = change.adapter.stage_tensors(self.spec.layers, self.device, self.spec.dtype)
                self.loras.add(change.slot, tensors)  # this stage's layers only
        self._lora_step = self.loras is not None and any(c.lora_slot >= 0 for c in plan.chunks)


def cache_spec(spec: WorkerSpec) -> CacheSpec:
    """The KV pool geometry of a stage: its full-attention layers, and the MTP head's layer on a
    last stage that drafts with it."""
    attention, _ = spec.config.layers_of(*spec.layers)
    attention += 1 if spec.holds_mtp else 0
    return CacheSpec(attention, spec.config.num_kv_heads, spec.config.head_dim, spec.block_size,
                     spec.kv_dtype or spec.dtype)


def state_spec(spec: WorkerSpec) -> StateSpec | None:
    """The state pool geometry of a stage: its DeltaNet layers (None for models without them)."""
    lin = spec.config.linear
    if lin is None:
        return None
    _, linear = spec.config.layers_of(*spec.layers)
    return StateSpec(linear, lin.conv_dim, lin.conv_kernel - 1, lin.num_value_heads, lin.key_head_dim,
                     lin.value_head_dim, spec.dtype)


def worker_pools(worker: Worker, wanted: PoolSizes) -> PoolSizes:
    """The pools `worker` can hold: `wanted`, or fewer if its GPU has less free memory now (state
    slots first, as the plan sized them; KV blocks from the rest; snapshot slots, which only make
    the prefix cache reach further, from what the wanted KV blocks leave)."""
    blocks, slots, snapshots = wanted.blocks, wanted.slots, wanted.snapshots
    state_bytes = worker.state_spec.bytes_per_slot if worker.state_spec is not None else 0
    if worker.device.type == "cuda":
        free = int(torch.cuda.mem_get_info(worker.device)[0] * GPU_MEMORY_FRACTION)
        if state_bytes:
            slots = min(slots, worker.state_spec.slots_for(free))
            free -= slots * state_bytes
        room = worker.cache_spec.blocks_for(free)
        blocks = blocks if room is None else min(blocks, room)
        if state_bytes:
            snapshots = min(snapshots, worker.state_spec.slots_for(free - blocks * worker.cache_spec.bytes_per_block))
    if blocks <= 0:
        raise MemoryError(f"{worker.device}: no memory left for a single KV block "
                          f"({worker.cache_spec.bytes_per_block} bytes) after the weights")
    if state_bytes and wanted.slots and slots <= 0:
        raise MemoryError(f"{worker.device}: no memory left for the state of a single sequence "
                          f"({state_bytes} bytes) after the weights")
    return PoolSizes(blocks, slots, snapshots if slots > 0 else 0)
