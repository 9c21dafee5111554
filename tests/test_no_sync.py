"""A stage other than the last never makes the host wait for the device within a step.

Before issue 18 a non-last stage synchronized its stream after every step, and
building a step's tensors read data-dependent sizes (`repeat_interleave` without
an output size): the host waited for the device at least once per step. Here
one step of a non-last stage runs under bench.counting's instruments (every
`.item()`, `.tolist()`, `nonzero`, boolean index, device-to-host copy and
data-dependent size counts as a sync, and `torch.cuda.synchronize`, stream and
event waits are counted too), with the Triton kernels (interpreted on CPU), as
a GPU runs it: zero syncs, for decode and prefill, eager and padded (the CUDA
graph path).
"""

from __future__ import annotations

import pytest
import torch

from bench.counting import count_ops
from models import make_checkpoint
from pprt.distributed.step import PoolSizes, SeqChunk, StepPlan
from pprt.distributed.worker import Worker, WorkerSpec
from pprt.weights.checkpoint import ModelSource, load_config

B = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("nosync") / "m", "qwen3", tokenizer=False)


@pytest.fixture
def waits(monkeypatch):
    """Counts calls of torch.cuda's host waits (none may happen on a non-last stage)."""
    calls = []
    for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                        (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "query")):
        monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def first_stage(model, mode: str) -> Worker:
    config = load_config(ModelSource(str(model)))
    worker = Worker(WorkerSpec(str(model), config, (0, 2), "cpu", torch.float32, max_context=256, max_num_seqs=4,
                               cuda_graphs=mode))
    worker.allocate_cache(PoolSizes(32, 0))
    return worker


@pytest.mark.parametrize("mode", ["off", "padded"])
def test_a_non_last_stage_step_waits_for_nothing(model, mode, waits, monkeypatch):
    monkeypatch.setenv("PPRT_KERNELS", "triton")  # the kernels a GPU runs (interpreted here)
    worker = first_stage(model, mode)
    assert not worker.stage.is_last
    prompts = [[5, 17, 40, 33, 9], [8, 2], [100, 7, 7, 1, 64, 3, 12, 90, 4, 4, 30, 31, 32, 33, 34, 35, 36]]
    prefill = StepPlan(0, [SeqChunk(s, p, 0, 0, list(range(2 * s, 2 * s + 2)), True) for s, p in enumerate(prompts)])
    with count_ops() as counts:
        out = worker.execute(prefill)
    assert out.shape == (sum(map(len, prompts)), worker.spec.config.hidden_size)
    assert counts.syncs == 0, counts.sync_ops
    # decode: two sequences go on in their blocks, one gains a block
    decode = StepPlan(1, [SeqChunk(0, [11], 5, 2, [], True), SeqChunk(1, [12], 2, 2, [], True),
                          SeqChunk(2, [13], 17, 2, [6], True)])
    with count_ops() as counts:
        out = worker.execute(decode)
    assert out.shape == (3, worker.spec.config.hidden_size)
    assert counts.syncs == 0, counts.sync_ops
    assert counts.launches > 0  # the instruments saw the step
    assert waits == []
    if mode == "padded":
        assert worker.graphs.size_for(decode) == 4  # the decode step took the graphs' path
