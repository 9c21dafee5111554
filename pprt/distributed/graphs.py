"""CUDA graphs of a stage's decode step, captured per padded batch size and replayed for pure-decode steps.

A decode step launches hundreds of small kernels; on a GPU their launch costs
exceed the time the kernels run at small batches. `DecodeGraphs` captures the
stage's forward pass once per batch size of `graph_sizes(max_batch)` (1, 2, 4,
8, 12, 16, 24, 32, ... up to max_batch) on fixed input tensors
(`StepInputs.static`: token ids or hidden states, positions, slots, block
tables, query offsets, context lengths), after the stage is loaded and its KV
pool allocated. A pure-decode step of B sequences is padded to the next size
(padded rows compute on a scratch KV block and state slot, their outputs are
dropped) and
the graph is replayed; prefill and mixed steps run eagerly. The attention
kernels of a graph are sized for the longest context (`columns` blocks), so
any decode step within it replays the same graph.

With `capture=False` the same padded, static-buffer path runs eagerly: that
is how it is tested without a GPU (tests/test_graphs.py), and what a stage
whose layers still wait for the host (a per-expert MoE loop) would run.
Capture time and the memory of the graphs' pool are logged. Knows nothing of
processes or transports.
"""

from __future__ import annotations

import logging
import time

import torch

from ..models.kv import KVCache, StateCache
from ..models.stage import Stage
from .step import StepPlan
from .step_inputs import StepInputs

log = logging.getLogger("pprt")
WARMUP = 2  # eager runs before a capture (Triton compiles, cuBLAS workspaces)


def graph_sizes(max_batch: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then powers of two and their 1.5x, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, s = {max_batch}, 1
    while s < max_batch:
        sizes.add(s)
        if s >= 8 and 3 * s // 2 < max_batch:
            sizes.add(3 * s // 2)
        s *= 2
    return sorted(sizes)


class DecodeGraphs:
    """Padded decode steps of one stage, replayed from CUDA graphs (see the module docstring).

    stage, cache, state: the loaded stage, its KV pool (with a scratch block: `inputs.pad_block`)
    and its state pool (None without DeltaNet layers; with a scratch slot: `inputs.pad_slot`).
    max_batch: the most sequences of a decode step (max_num_seqs). columns: block-table
    columns of the longest context. capture: record CUDA graphs (CUDA only), else run the
    padded path eagerly.
    """

    def __init__(self, stage: Stage, cache: KVCache, state: StateCache | None, inputs: StepInputs, max_batch: int,
                 columns: int, dtype: torch.dtype, capture: bool):
        if capture and inputs.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {inputs.device}")
        self.stage, self.cache, self.state, self.inputs = stage, cache, state, inputs
        self.sizes = graph_sizes(max_batch)
        self.static = inputs.static(max_batch, columns)
        self.hidden = None  # [max_batch, H]: the previous stage's hidden states
        if not stage.is_first:
            self.hidden = torch.zeros(max_batch, stage.config.hidden_size, dtype=dtype, device=inputs.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # each graph's output tensor
        self.capture_seconds, self.pool_bytes = 0.0, 0
        self.steps = 0  # decode steps run padded (replayed, when captured)
        if capture:
            self._capture()

    def size_for(self, plan: StepPlan) -> int | None:
        """The padded size `plan` runs at, or None when it is not a pure-decode step that fits."""
        if not self.inputs.fits(plan, self.static):
            return None
        b = len(plan.chunks)
        return next(s for s in self.sizes if s >= b)

    def run(self, plan: StepPlan, x: torch.Tensor | None, size: int) -> torch.Tensor:
        """Run the decode step `plan` padded to `size` (from `size_for`): hidden states [B, H] of its
        sequences, or on the last stage their logits [B, V]. x: the previous stage's hidden [B, H]."""
        self.inputs.padded(plan, size, self.static)
        self.steps += 1
        b = len(plan.chunks)
        if self.hidden is not None:
            self.hidden[:b].copy_(x)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
            out = self.outputs[size]
        else:
            out = self._forward(size)
        # The next replay overwrites a graph's output: a non-last stage's output goes to an
        # asynchronous send, so it leaves as a copy (the last stage samples before its next step).
        return out[:b] if self.stage.is_last else out[:b].clone()

    def _forward(self, size: int) -> torch.Tensor:
        x = self.static.fields["ids"][:size] if self.hidden is None else self.hidden[:size]
        return self.stage(x, self.static.batch(size), self.cache, self.state, None)

    def _capture(self) -> None:
        """Record one graph per size, largest first, sharing one memory pool."""
        device = self.inputs.device
        torch.cuda.synchronize(device)
        t0, reserved = time.perf_counter(), torch.cuda.memory_reserved(device)
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        for size in reversed(self.sizes):
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
                for _ in range(WARMUP):
                    self._forward(size)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - t0
        self.pool_bytes = torch.cuda.memory_reserved(device) - reserved
        log.info("layers %d-%d: captured %d CUDA graphs (batch %s) in %.2f s, %.0f MiB", self.stage.lo,
                 self.stage.hi - 1, len(self.graphs), ", ".join(map(str, self.sizes)), self.capture_seconds,
                 self.pool_bytes / 2**20)
