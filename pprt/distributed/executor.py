"""Executors: where the stages run, as the engine sees them.

An executor owns the stages and offers `submit(plan)` and `result()` (the
results come back in submission order), `depth` (how many micro-batches may
be in flight: one per stage), `num_blocks` (KV blocks every stage holds) and
`num_slots` (state slots every stage holds: hybrid models; 0 otherwise) and
`num_snapshots` (more state slots, for the prefix cache's state snapshots).
One thread drives it (the engine loop's, which calls `bind_thread()` first);
`kill()` may come from any thread. `LocalExecutor` runs one stage in the
driver's process; PipelineExecutor (pipeline.py) one stage program per device;
TorchrunExecutor (torchrun.py) rank 0 of a torchrun job.
"""

from __future__ import annotations

import logging
from collections import deque

import torch

from ..config import ModelConfig
from ..models.kv import kv_dtype_name
from .comm import choose_transport
from .step import PoolSizes, StageCounters, StepPlan, StepResult
from .worker import Worker, WorkerSpec, cache_spec, peak_rss_bytes, state_spec, worker_pools

CPU_KV_BUDGET = 64 * 2**20  # bytes: by default a CPU stage's KV pool is at most this (it is zero-filled, so resident)
CPU_STATE_BUDGET = 64 * 2**20  # bytes: the same for a CPU stage's state pool
log = logging.getLogger("pprt")


class LocalExecutor:
    """One stage in this process; each step runs when submitted."""

    depth = 1

    def __init__(self, spec: WorkerSpec, pools: PoolSizes):
        self.worker = Worker(spec)
        self.weight_bytes = [self.worker.weight_bytes()]
        self.load_seconds = self.worker.load_seconds
        self.load_rss_bytes = [self.worker.load_rss_bytes]
        self.quant_seconds = self.worker.quant_seconds
        self.pools = worker_pools(self.worker, pools)
        self.num_blocks, self.num_slots = self.pools.blocks, self.pools.slots
        self.num_snapshots = self.pools.snapshots
        self.worker.allocate_cache(self.pools)
        kv, state = self.worker.pool_bytes
        self.kv_bytes, self.state_bytes = [kv], [state]
        self._results: deque[StepResult] = deque()

    @property
    def specs(self) -> list[WorkerSpec]:
        return [self.worker.spec]

    def bind_thread(self) -> None:
        """Make the stage's GPU the calling thread's current device (Triton launches on it)."""
        if self.worker.device.type == "cuda":
            torch.cuda.set_device(self.worker.device)

    def submit(self, plan: StepPlan) -> None:
        self._results.append(self.worker.execute(plan))

    def stats(self) -> list[StageCounters]:
        return [StageCounters(0, self.worker.busy_seconds, 0.0, -1, peak_rss_bytes(), self.worker.peak_device_bytes())]

    def result(self) -> StepResult:
        return self._results.popleft()

    def kill(self) -> None:
        """Nothing to kill: the stage is this process."""

    def close(self) -> None:
        self.worker = None


def make_executor(model: str, config: ModelConfig, devices: list[str], *, split, dtype, quant, kv_dtype, block_size,
                  max_context, chunk_size, kv_cache_memory, memory_budget, transport, seed, stage_timeout,
                  torchrun=False, max_num_seqs: int = 256, state_snapshots: int = 0, max_loras: int = 0,
                  merged_lora=None, lora_layer_bytes: list[int] | None = None, stage_processes=False,
                  enforce_eager: bool = False, mtp_tokens: int = 0, draft_snapshots: bool = False):
    """Plan the cut and the pools (refusing before anything loads when it cannot fit), then start the stages.

    state_snapshots: state slots wanted beside the running ones for prefix-cache snapshots (hybrid
    models; the plan may give fewer). max_loras / merged_lora / lora_layer_bytes: LoRA adapter slots
    on every stage, an adapter folded into the weights at load, and the slots' bytes per layer.
    One stage runs in this process unless `stage_processes`: then it is a stage program of its
    own, as every stage of a pipeline is (its process group has one rank and carries nothing).
    enforce_eager: no CUDA graphs (the plan then reserves no memory for them). mtp_tokens: drafts per
    step of the MTP head (0: off; else the last stage holds the head and the embedding).
    draft_snapshots: speculative decoding on a hybrid model (up to a second state slot per running
    sequence, for the snapshot its drafts roll back to)."""
    result = plan_stages(config, devices, split=split, dtype=dtype, quant=quant, kv_dtype=kv_dtype,
                         block_size=block_size, max_context=max_context, chunk_size=chunk_size,
                         memory_budget=memory_budget, one_host=not torchrun, max_num_seqs=max_num_seqs,
                         state_snapshots=state_snapshots, lora_layer_bytes=lora_layer_bytes,
                         enforce_eager=enforce_eager, mtp_tokens=mtp_tokens, draft_snapshots=draft_snapshots)
    if not result.fits:
        raise MemoryError(f"the model does not fit these devices; nothing was loaded.\n{result.message}")
    specs = [WorkerSpec(model, config, stage.layers, device, dtype, quant, kv_dtype=kv_dtype, block_size=block_size,
                        seed=seed, max_loras=max_loras, merged_lora=merged_lora, max_context=max_context,
                        max_num_seqs=max_num_seqs, cuda_graphs="off" if enforce_eager else "auto",
                        mtp=mtp_tokens > 0)
             for stage, device in zip(result.stages, devices)]
    pools = PoolSizes(_kv_blocks(specs, result.num_blocks, kv_cache_memory),
                      *_state_slots(specs, result.num_slots, result.num_snapshots))
    if config.hybrid and pools.slots < max_num_seqs:
        per_seq = max(st.state_bytes_per_seq for st in result.stages)
        log.warning("max_num_seqs %d is bounded by recurrent-state memory: %d state slot(s) of %.1f MiB per "
                    "sequence on the fullest stage, so at most %d sequences run at once", max_num_seqs,
                    pools.slots, per_seq / 2**20, pools.slots)
    if torchrun:
        from .stage_main import torchrun_transport
        from .torchrun import TorchrunExecutor

        if transport not in ("auto", torchrun_transport()):
            raise ValueError("under torchrun the transport is set for every rank by PPRT_TRANSPORT")
        return TorchrunExecutor(specs, torchrun_transport(), pools)
    if len(specs) == 1 and not stage_processes:
        return LocalExecutor(specs[0], pools)
    from .pipeline import PipelineExecutor

    transport = choose_transport(devices, transport)
    if len(specs) == 1 and transport == "nccl":
        transport = "host"  # no transfers: no NCCL communicator for a group of one
    return PipelineExecutor(specs, transport, pools, stage_timeout=stage_timeout)


def plan_stages(config: ModelConfig, devices: list[str], *, split, dtype, quant, kv_dtype, block_size, max_context,
                chunk_size, memory_budget, one_host: bool = True, max_num_seqs: int = 256, state_snapshots: int = 0,
                lora_layer_bytes: list[int] | None = None, enforce_eager: bool = False, mtp_tokens: int = 0,
                draft_snapshots: bool = False):
    """The planner's cut for these devices (or `split`, checked against their memory).

    one_host: the devices are this machine's, so stages naming the same device share its
    memory (under torchrun each rank has its own).
    """
    from ..plan import DeviceBudget, plan

    if memory_budget is None:
        budgets = [_device_memory(d) // (devices.count(d) if one_host else 1) for d in devices]
    elif isinstance(memory_budget, int):
        budgets = [memory_budget] * len(devices)
    else:
        budgets = list(memory_budget)
        if len(budgets) != len(devices):
            raise ValueError(f"memory_budget has {len(budgets)} entries for {len(devices)} devices")
    on_cpu = all(torch.device(d).type == "cpu" for d in devices)
    return plan(config, [DeviceBudget(d, b) for d, b in zip(devices, budgets)],
                quant=quant or "none", kv_dtype=kv_dtype_name(kv_dtype),
                dtype_bytes=dtype.itemsize, block_size=block_size, max_context=max_context, chunk_size=chunk_size,
                split=list(split) if split is not None else None, overhead_bytes=0 if on_cpu else 2**30,
                max_num_seqs=max_num_seqs, state_snapshots=state_snapshots, lora_layer_bytes=lora_layer_bytes,
                cuda_graphs=not on_cpu and not enforce_eager, mtp_tokens=mtp_tokens,
                draft_snapshots=draft_snapshots)


def _kv_blocks(specs: list[WorkerSpec], planned: int, kv_cache_memory: int | None) -> int:
    """Blocks every stage allocates: the plan's, or `kv_cache_memory` bytes per stage (the
    fullest stage decides); on CPU at most CPU_KV_BUDGET bytes per stage unless asked."""
    per_block = [b for b in (cache_spec(s).bytes_per_block for s in specs) if b]  # stages with KV
    if not per_block:  # no full-attention layer anywhere: blocks cost nothing
        return planned
    if kv_cache_memory is not None:
        if kv_cache_memory < max(per_block):
            raise ValueError(f"kv_cache_memory = {kv_cache_memory} bytes is less than one KV block of the "
                             f"fullest stage ({max(per_block)} bytes)")
        return min(kv_cache_memory // b for b in per_block)
    if all(torch.device(s.device).type == "cpu" for s in specs):
        return min(planned, min(CPU_KV_BUDGET // b for b in per_block))
    return planned


def _state_slots(specs: list[WorkerSpec], planned: int, snapshots: int) -> tuple[int, int]:
    """(running slots, snapshot slots) every stage allocates: the plan's (running ones at most
    max_num_seqs); on CPU at most CPU_STATE_BUDGET bytes of state per stage, of which the running
    slots take at most half when snapshots are wanted. (0, 0) for models without recurrent state."""
    per_slot = [b for b in (sp.bytes_per_slot for sp in map(state_spec, specs) if sp is not None) if b]
    if not per_slot:
        return 0, 0
    if all(torch.device(s.device).type == "cpu" for s in specs):  # snapshots wanted: half the budget each
        room = min(CPU_STATE_BUDGET // b for b in per_slot)
        slots = max(1, min(planned, room // 2 if snapshots else room))
        return slots, max(0, min(snapshots, room - slots))
    return planned, snapshots


def _device_memory(device: str) -> int:
    """Bytes free on `device`: the GPU's free memory, or the machine's available memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
