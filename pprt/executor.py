"""Executors: where the stages run, as the engine sees them.

An executor owns the stages and offers `submit(plan)` and `result()` (the
results come back in submission order), `depth` (how many micro-batches may
be in flight: one per stage) and `num_blocks` (KV blocks every stage holds).
`LocalExecutor` runs one stage in the caller's process.
"""

from __future__ import annotations

import os
from collections import deque

import torch

from .comm import choose_transport
from .config import ModelConfig
from .step import StepPlan, StepResult
from .worker import Worker, WorkerSpec

CPU_KV_BUDGET = 2 * 2**30  # bytes: the default KV pool on CPU is at most this
GPU_MEMORY_FRACTION = 0.90  # of a GPU's free memory after weights, for the KV pool


def kv_budget(worker: Worker, max_context: int, explicit: int | None) -> int:
    """Bytes for the KV pool of `worker`'s stage."""
    if explicit is not None:
        return explicit
    if worker.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(worker.device)
        return int(free * GPU_MEMORY_FRACTION)
    per_token = worker.cache_spec.bytes_per_block // worker.cache_spec.block_size
    return min(CPU_KV_BUDGET, 4 * max_context * per_token)


class LocalExecutor:
    """One stage in this process; each step runs when submitted."""

    depth = 1

    def __init__(self, spec: WorkerSpec, max_context: int, kv_cache_memory: int | None):
        self.worker = Worker(spec)
        self.num_blocks = worker_blocks(self.worker, max_context, kv_cache_memory)
        self.worker.allocate_cache(self.num_blocks)
        self._results: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        self._results.append(self.worker.execute(plan))

    def result(self) -> StepResult:
        return self._results.popleft()

    def close(self) -> None:
        self.worker = None


def worker_blocks(worker: Worker, max_context: int, kv_cache_memory: int | None) -> int:
    blocks = worker.cache_spec.blocks_for(kv_budget(worker, max_context, kv_cache_memory))
    if blocks == 0:
        raise MemoryError(f"{worker.device}: no memory left for a single KV block "
                          f"({worker.cache_spec.bytes_per_block} bytes) after the weights")
    return blocks


def make_executor(model: str, config: ModelConfig, devices: list[str], *, split, dtype, quant, kv_dtype, block_size,
                  max_context, kv_cache_memory, transport, seed, chunk_size=2048, torchrun=False):
    """Plan the cut (refusing before anything loads when it cannot fit) and start the stages."""
    cut = choose_split(config, devices, split=split, dtype=dtype, quant=quant, kv_dtype=kv_dtype,
                       block_size=block_size,
                       max_context=max_context, chunk_size=chunk_size, kv_cache_memory=kv_cache_memory)
    bounds = [(sum(cut[:i]), sum(cut[: i + 1])) for i in range(len(cut))]
    specs = [WorkerSpec(model, config, b, d, dtype, quant, kv_dtype=kv_dtype, block_size=block_size, seed=seed)
             for b, d in zip(bounds, devices)]
    if torchrun:
        from .pipeline import TorchrunExecutor
        from .serve import torchrun_transport

        if transport not in ("auto", torchrun_transport()):
            raise ValueError("under torchrun the transport is set for every rank by PPRT_TRANSPORT")
        return TorchrunExecutor(specs, torchrun_transport(), max_context, kv_cache_memory)
    if len(specs) == 1:
        return LocalExecutor(specs[0], max_context, kv_cache_memory)
    from .pipeline import PipelineExecutor

    return PipelineExecutor(specs, choose_transport(devices, transport), max_context, kv_cache_memory)


def choose_split(config: ModelConfig, devices: list[str], *, split, dtype, quant, kv_dtype, block_size, max_context,
                 chunk_size, kv_cache_memory) -> list[int]:
    """Layers per stage: the planner's cut for these devices, or `split` checked against memory."""
    from .plan import DeviceBudget, plan

    budgets = [DeviceBudget(d, _device_budget(d)) for d in devices]
    kv = "fp8" if kv_dtype.itemsize == 1 else "auto"
    result = plan(config, budgets, quant="int4" if quant else "none", kv_dtype=kv, dtype_bytes=dtype.itemsize,
                  block_size=block_size, max_context=max_context, chunk_size=chunk_size,
                  split=list(split) if split is not None else None,
                  overhead_bytes=0 if devices[0] == "cpu" else 2**30)
    if not result.fits and any(torch.device(d).type == "cuda" for d in devices):
        raise MemoryError(f"the model does not fit these devices; nothing was loaded.\n{result.message}")
    return result.split


def _device_budget(device: str) -> int:
    """Bytes a stage on `device` may use: free GPU memory, or the machine's memory on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
