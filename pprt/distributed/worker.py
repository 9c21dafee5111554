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
(pprt.models.speculative). Knows nothing of tokenization or scheduling.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..models.batch import StepBatch
from ..models.kv import CacheSpec, KVCache, StateCache, StateSpec
from ..models.lora import LoraBank, merge_lora
from ..models.sampler import Sampler
from ..models.speculative import verify
from ..models.stage import Stage
from ..weights.checkpoint import CheckpointReader, ModelSource
from ..weights.loader import load_stage
from ..weights.lora import LoraAdapter
from .step import PoolSizes, StepPlan, StepResult


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
_NO_BLOCKS = torch.zeros(0, dtype=torch.int32)


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.device = torch.device(spec.device)
        t0 = time.perf_counter()
        self.stage = Stage(spec.config, spec.layers)
        rss_before = current_rss_bytes()
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
        self.busy_seconds = 0.0  # time spent computing steps
        self.tables: dict[int, torch.Tensor] = {}  # block table of each sequence (int32, host)
        self.loras = LoraBank(self.stage, spec.max_loras, self.device, spec.dtype) if spec.max_loras else None

    def peak_device_bytes(self) -> int | None:
        """Peak GPU memory this stage allocated (None on CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.stage.state_dict().values())

    def allocate_cache(self, pools: PoolSizes) -> None:
        """The KV pool and (hybrid models with DeltaNet layers on this stage) the state pool."""
        self.cache = KVCache(self.cache_spec, pools.blocks, self.device)
        if self.state_spec is not None and self.state_spec.num_layers and pools.slots:
            self.state = StateCache(self.state_spec, pools.slots + pools.snapshots, self.device)

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
            self.tables.pop(seq_id, None)
            if self.sampler is not None and seq_id in self.sampler:
                self.sampler.remove(seq_id)
        if self.sampler is not None:
            for new in plan.added:
                if new.seq_id not in self.sampler:
                    self.sampler.add(new.seq_id, new.params, new.prompt_ids)
        self._apply_loras(plan)
        batch, logits_indices = self._batch(plan)
        if self.state is not None:  # sequences (re)starting at position 0 start from zero state
            fresh = [c.state_slot for c in plan.chunks if c.start == 0]
            if fresh:
                self.state.reset(torch.tensor(fresh, dtype=torch.long, device=self.device))
            restore = [(c.restore_from, c.state_slot) for c in plan.chunks if c.restore_from >= 0]
            if restore:  # prefix cache: resume from a snapshot
                self.state.copy(*self._pairs(restore))
            # speculation: roll back to the snapshot, then snapshot the state the drafts start from
            back = [(c.snapshot_slot, c.state_slot) for c in plan.chunks if c.restore_state]
            if back:
                self.state.copy(*self._pairs(back))
            keep = [(c.state_slot, c.snapshot_slot) for c in plan.chunks if c.num_drafts]
            if keep:
                self.state.copy(*self._pairs(keep))
        if self.stage.is_first:
            x = torch.tensor([t for c in plan.chunks for t in c.token_ids], dtype=torch.long, device=self.device)
        out = self.stage(x, batch, self.cache, self.state, logits_indices)
        save = [(c.state_slot, c.save_to) for c in plan.chunks if c.save_to >= 0]
        if self.state is not None and save:  # prefix cache: snapshots of the state after this step's tokens
            self.state.copy(*self._pairs(save))
        if not self.stage.is_last:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.busy_seconds += time.perf_counter() - t0
            return out
        if any(c.num_drafts for c in plan.chunks):
            result = self._verify(plan, out)
        else:
            seq_ids = [c.seq_id for c in plan.chunks if c.sample]
            sampled = self.sampler.sample(seq_ids, out) if seq_ids else None
            result = StepResult(plan.step, seq_ids, sampled.token_ids if sampled else [],
                                sampled.logprobs if sampled else None)
        result.compute_seconds = time.perf_counter() - t0
        self.busy_seconds += result.compute_seconds
        return result

    def _pairs(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        src, dst = zip(*pairs)
        return (torch.tensor(src, dtype=torch.long, device=self.device),
                torch.tensor(dst, dtype=torch.long, device=self.device))

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
        """Fill or empty the plan's adapter slots, then bind each token's slot (none: no LoRA work)."""
        for change in plan.loras:
            if change.adapter is None:
                self.loras.remove(change.slot)
            else:
                tensors = change.adapter.stage_tensors(self.spec.layers, self.device, self.spec.dtype)
                self.loras.add(change.slot, tensors)  # this stage's layers only
        if self.loras is None:
            return
        slots = [c.lora_slot for c in plan.chunks]
        if max(slots) < 0:
            self.loras.bind(None)
            return
        per_token = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32),
                                            torch.tensor([len(c.token_ids) for c in plan.chunks]))
        self.loras.bind(per_token.to(self.device))

    def _batch(self, plan: StepPlan) -> tuple[StepBatch, torch.Tensor]:
        """Tensors of a plan: positions, KV slots, block tables, query offsets, context lengths, state slots."""
        bs = self.spec.block_size
        starts, ctx, sample_rows, rows = [0], [], [], []
        for c in plan.chunks:
            old = self.tables.get(c.seq_id, _NO_BLOCKS)
            if c.new_blocks or c.blocks_from < len(old):
                self.tables[c.seq_id] = torch.cat([old[: c.blocks_from], torch.tensor(c.new_blocks, dtype=torch.int32)])
            rows.append(self.tables[c.seq_id])
            starts.append(starts[-1] + len(c.token_ids))
            ctx.append(c.end)
            if c.sample:  # the last token's row, and the row of each draft's predecessor
                sample_rows.extend(range(starts[-1] - 1 - c.num_drafts, starts[-1]))
        tables = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, max blocks]
        q_lens = torch.tensor([len(c.token_ids) for c in plan.chunks])
        seq_of_token = torch.repeat_interleave(torch.arange(len(plan.chunks)), q_lens)  # [T]
        positions = torch.cat([torch.arange(c.start, c.end) for c in plan.chunks])  # [T]
        slots = tables[seq_of_token, positions // bs].long() * bs + positions % bs  # [T]
        dev = self.device
        state_indices = None
        if self.state is not None:
            state_indices = torch.tensor([c.state_slot for c in plan.chunks], dtype=torch.int32, device=dev)
        batch = StepBatch(
            positions=positions.to(dev),
            slot_mapping=slots.to(dev),
            block_tables=tables.to(dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev),
            max_query_len=max(len(c.token_ids) for c in plan.chunks),
            max_context_len=max(ctx),
            state_indices=state_indices,
        )
        return batch, torch.tensor(sample_rows, dtype=torch.long, device=dev)


def cache_spec(spec: WorkerSpec) -> CacheSpec:
    """The KV pool geometry of a stage: its full-attention layers only."""
    attention, _ = spec.config.layers_of(*spec.layers)
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
