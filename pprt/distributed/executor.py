"""Executors: where the stages run, as the engine sees them.

An executor owns the stages and offers `submit(plan)` and `result()` (the
results come back in submission order), `depth` (how many micro-batches may
be in flight: one per stage) and `num_blocks` (KV blocks every stage holds).
One thread drives it (the engine loop's, which calls `bind_thread()` first);
`kill()` may come from any thread. `LocalExecutor` runs one stage in the
driver's process; PipelineExecutor (pipeline.py) one stage program per device;
TorchrunExecutor (torchrun.py) rank 0 of a torchrun job.
"""

from __future__ import annotations

from collections import deque

import torch

from ..config import ModelConfig
from ..models.kv import CacheSpec, kv_dtype_name
from .comm import choose_transport
from .step import StageCounters, StepPlan, StepResult
from .worker import Worker, WorkerSpec, peak_rss_bytes, worker_blocks

CPU_KV_BUDGET = 64 * 2**20  # bytes: by default a CPU stage's KV pool is at most this (it is zero-filled, so resident)


class LocalExecutor:
    """One stage in this process; each step runs when submitted."""

    depth = 1

    def __init__(self, spec: WorkerSpec, kv_blocks: int):
        self.worker = Worker(spec)
        self.weight_bytes = [self.worker.weight_bytes()]
        self.load_seconds = self.worker.load_seconds
        self.load_rss_bytes = [self.worker.load_rss_bytes]
        self.quant_seconds = self.worker.quant_seconds
        self.num_blocks = worker_blocks(self.worker, kv_blocks)
        self.worker.allocate_cache(self.num_blocks)
        self.kv_bytes = [self.worker.cache.nbytes]
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
                  torchrun=False, stage_processes=False):
    """Plan the cut and the KV pool (refusing before anything loads when it cannot fit), then start the stages.

    One stage runs in this process unless `stage_processes`: then it is a stage program of its
    own, as every stage of a pipeline is (its process group has one rank and carries nothing).
    """
    result = plan_stages(config, devices, split=split, dtype=dtype, quant=quant, kv_dtype=kv_dtype,
                         block_size=block_size, max_context=max_context, chunk_size=chunk_size,
                         memory_budget=memory_budget, one_host=not torchrun)
    if not result.fits:
        raise MemoryError(f"the model does not fit these devices; nothing was loaded.\n{result.message}")
    specs = [WorkerSpec(model, config, stage.layers, device, dtype, quant, kv_dtype=kv_dtype, block_size=block_size,
                        seed=seed) for stage, device in zip(result.stages, devices)]
    kv_blocks = _kv_blocks(specs, result.num_blocks, kv_cache_memory)
    if torchrun:
        from .stage_main import torchrun_transport
        from .torchrun import TorchrunExecutor

        if transport not in ("auto", torchrun_transport()):
            raise ValueError("under torchrun the transport is set for every rank by PPRT_TRANSPORT")
        return TorchrunExecutor(specs, torchrun_transport(), kv_blocks)
    if len(specs) == 1 and not stage_processes:
        return LocalExecutor(specs[0], kv_blocks)
    from .pipeline import PipelineExecutor

    transport = choose_transport(devices, transport)
    if len(specs) == 1 and transport == "nccl":
        transport = "host"  # no transfers: no NCCL communicator for a group of one
    return PipelineExecutor(specs, transport, kv_blocks, stage_timeout=stage_timeout)


def plan_stages(config: ModelConfig, devices: list[str], *, split, dtype, quant, kv_dtype, block_size, max_context,
                chunk_size, memory_budget, one_host: bool = True):
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
                split=list(split) if split is not None else None, overhead_bytes=0 if on_cpu else 2**30)


def _kv_blocks(specs: list[WorkerSpec], planned: int, kv_cache_memory: int | None) -> int:
    """Blocks every stage allocates: the plan's, or `kv_cache_memory` bytes per stage (the
    fullest stage decides); on CPU at most CPU_KV_BUDGET bytes per stage unless asked."""
    c = specs[0].config
    per_block = [CacheSpec(hi - lo, c.num_kv_heads, c.head_dim, s.block_size, s.kv_dtype or s.dtype).bytes_per_block
                 for s, (lo, hi) in ((s, s.layers) for s in specs)]
    if kv_cache_memory is not None:
        if kv_cache_memory < max(per_block):
            raise ValueError(f"kv_cache_memory = {kv_cache_memory} bytes is less than one KV block of the "
                             f"fullest stage ({max(per_block)} bytes)")
        return min(kv_cache_memory // b for b in per_block)
    if all(torch.device(s.device).type == "cpu" for s in specs):
        return min(planned, min(CPU_KV_BUDGET // b for b in per_block))
    return planned


def _device_memory(device: str) -> int:
    """Bytes free on `device`: the GPU's free memory, or the machine's available memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
