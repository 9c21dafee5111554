"""Executors: where the stages run, as the engine sees them.

An executor owns the stages and offers `submit(plan)` and `result()` (the
results come back in submission order), `depth` (how many micro-batches may
be in flight: one per stage) and `num_blocks` (KV blocks every stage holds).
`LocalExecutor` runs one stage in the caller's process.
"""

from __future__ import annotations

from collections import deque

import torch

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


def make_executor(model: str, config: ModelConfig, devices: list[str], *, split, dtype, quant, block_size,
                  max_context, kv_cache_memory, transport, seed):
    if len(devices) == 1:
        if split is not None and list(split) != [config.num_layers]:
            raise ValueError(f"split {split} does not fit one device holding {config.num_layers} layers")
        spec = WorkerSpec(model, config, (0, config.num_layers), devices[0], dtype, quant,
                          block_size=block_size, seed=seed)
        return LocalExecutor(spec, max_context, kv_cache_memory)
    raise NotImplementedError("several devices (pipeline) are not implemented yet")
