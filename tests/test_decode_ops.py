"""The ops one decode step runs per layer, counted and recorded: fewer than before issue 18.

Each op is a kernel launch on a GPU, several microseconds of host time at
batch 1. Two counts of one decoder layer in a decode step of 4 sequences:

- the torch profiler on the CPU path (reference kernels): the aten ops the layer
  calls (top-level events; views and conversions to the dtype a tensor already
  has do no work and are left out);
- bench.counting on the GPU path (Triton kernels, interpreted here): kernel
  launches (aten and Triton) and host syncs.

Measured on main before this issue (9d988dd) with this test's models and
inputs: a dense Qwen3 layer 70 profiler ops / 48 launches; a qwen3_moe layer
(8 experts, top-2) 129 profiler ops / 105 launches and 2 syncs. Merged q/k/v
and gate/up save 3 matmuls per layer; the fused MoE runs the experts in 4
Triton launches whatever the routing, without a sync (its CPU reference still
visits the chosen experts one by one: the profiler count of that layer depends
on the routing). The norms (RMSNorm, the residual add fused into the second one, q/k norms)
and rotary on q and k are one Triton launch each on the GPU path (30 launches fewer per layer:
45 -> 15 dense, 47 -> 17 MoE); their CPU references are the same torch ops as before.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from bench.counting import count_ops
from models import make_checkpoint
from pprt.distributed.step import NewSequence, PoolSizes, SeqChunk, StepPlan
from pprt.distributed.worker import Worker, WorkerSpec
from pprt.params import SamplingParams
from pprt.weights.checkpoint import ModelSource, load_config

B = 4
# family, layer -> (profiler ops, GPU-path launches, GPU-path syncs): before issue 18, and now
BEFORE = {("qwen3", 0): (70, 48, 0), ("qwen3_moe", 1): (129, 105, 2)}
NOW = {("qwen3", 0): (67, 15, 0), ("qwen3_moe", 1): (120, 17, 0)}
_NO_WORK = {"aten::view", "aten::split", "aten::split_with_sizes", "aten::slice", "aten::select", "aten::unsqueeze",
            "aten::squeeze", "aten::reshape", "aten::t", "aten::transpose", "aten::as_strided", "aten::alias",
            "aten::chunk", "aten::expand", "aten::narrow", "aten::detach", "aten::empty", "aten::empty_like",
            "aten::empty_strided", "aten::lift_fresh", "aten::unbind", "aten::permute", "aten::_unsafe_view"}


def profiled_ops(fn) -> list[str]:
    """The aten ops `fn` calls that do work (top-level profiler events)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    # `to` to the dtype a tensor has returns it: no child op, no work
    return [e.name for e in top if e.name not in _NO_WORK and not (e.name == "aten::to" and not e.cpu_children)]


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def decode_layer(request, tmp_path_factory):
    """(family, layer index, a function running that layer on a decode step of B sequences)."""
    family = request.param
    path = make_checkpoint(tmp_path_factory.mktemp(family) / "m", family, tokenizer=False)
    config = load_config(ModelSource(str(path)))
    worker = Worker(WorkerSpec(str(path), config, (0, config.num_layers), "cpu", torch.float32))
    worker.allocate_cache(PoolSizes(64))
    greedy = SamplingParams(temperature=0).resolve()
    worker.execute(StepPlan(0, [SeqChunk(s, [1, 2, 3, 4, 5], 0, 0, [s], True) for s in range(B)],
                            [NewSequence(s, greedy, [1]) for s in range(B)]))
    batch = worker.inputs.build(StepPlan(1, [SeqChunk(s, [7], 5, 1, [], True) for s in range(B)])).batch
    x = torch.randn(B, config.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = worker.stage.rotary.cos_sin(batch.positions, x.dtype)
    index = 1 if family == "qwen3_moe" else 0  # qwen3_moe: layer 1 is sparse
    layer = list(worker.stage.model.layers.values())[index]
    kv = worker.cache.layer(index)

    @torch.inference_mode()
    def run():
        return layer(x, batch, cos, sin, kv)

    return family, index, run


def test_profiler_ops_per_decode_layer(decode_layer):
    family, index, run = decode_layer
    run()  # warm
    ops = profiled_ops(run)
    assert len(ops) == NOW[(family, index)][0], sorted(ops)
    assert len(ops) < BEFORE[(family, index)][0]


def test_gpu_path_launches_and_syncs_per_decode_layer(decode_layer, monkeypatch):
    family, index, run = decode_layer
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    run()  # warm
    with count_ops() as counts:
        run()
    now = NOW[(family, index)]
    assert (counts.launches, counts.syncs) == now[1:], dict(counts.ops)
    assert counts.launches < BEFORE[(family, index)][1] and counts.syncs <= BEFORE[(family, index)][2]
