"""CUDA graphs of decode steps: the padded static-buffer path equals eager, and a graph replay equals eager.

On CPU the graphs' path runs without capture (`cuda_graphs="padded"`): decode
steps are padded to the next captured size on the fixed input tensors, padded
rows write to a scratch KV block, and the outputs of the real rows are kept.
Greedy tokens must equal the eager path's and transformers', logprobs within
1e-4, on 1 and 2 stages, with batches that pad (3 -> 4, 5 -> 8), sequences
that step into new blocks and sequences that finish while others go on. On a
GPU, captured graphs must give the eager tokens.
"""

from __future__ import annotations

import queue

import pytest
import torch

import pprt.distributed.executor as executor_module
from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.distributed.graphs import graph_sizes
from pprt.distributed.step import PoolSizes, SeqChunk, StepPlan
from pprt.distributed.worker import Worker, WorkerSpec
from pprt.weights.checkpoint import ModelSource, load_config

PROMPTS = [[5, 17, 40, 33, 100, 7], [9], list(range(30, 70, 2)), [300, 3, 3, 3, 250], [8, 8, 1], [77] * 9]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("graphs") / "m", "qwen3")
    return path, reference_model(path)


def padded_specs(monkeypatch):
    """LLMs built while this is active run the graphs' padded path on CPU."""
    monkeypatch.setattr(executor_module, "WorkerSpec", lambda *a, **k: WorkerSpec(*a, **{**k, "cuda_graphs": "padded"}))


def run_together(llm: LLM, prompts, params) -> list:
    """Completions of requests submitted together (each with its own SamplingParams)."""
    outputs: queue.Queue = queue.Queue()
    ids = [llm.submit(p, s, outputs.put) for p, s in zip(prompts, params)]
    done = {}
    while len(done) < len(ids):
        out = outputs.get(timeout=120)
        if out.finished:
            if out.error is not None:
                raise out.error
            done[out.request_id] = out.completion
    return [done[i] for i in ids]


def test_graph_sizes():
    assert graph_sizes(1) == [1]
    assert graph_sizes(6) == [1, 2, 4, 6]
    assert graph_sizes(256) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    with pytest.raises(ValueError, match="max_batch"):
        graph_sizes(0)


@pytest.mark.parametrize("devices,batch", [(["cpu"], 3), (["cpu"], 5), (["cpu", "cpu"], 3),
                                          pytest.param(["cpu", "cpu"], 5, marks=pytest.mark.slow)],
                         ids=["1-stage-3", "1-stage-5", "2-stages-3", "2-stages-5"])
def test_padded_decode_equals_eager_and_transformers(qwen3, devices, batch, monkeypatch):
    path, ref = qwen3
    prompts = PROMPTS[:batch]
    # different lengths: sequences finish while the others go on, the batch shrinks through sizes
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0, ignore_eos=True, logprobs=0) for i in range(batch)]
    with LLM(str(path), devices=devices, block_size=4, max_num_seqs=8, max_context=128) as llm:
        eager = run_together(llm, prompts, params)
    padded_specs(monkeypatch)
    with LLM(str(path), devices=devices, block_size=4, max_num_seqs=8, max_context=128) as llm:
        padded = run_together(llm, prompts, params)
        if len(devices) == 1:
            assert llm.executor.worker.graphs.steps > 0  # decode steps took the padded path
    for prompt, p, e, g in zip(prompts, params, eager, padded):
        assert g.token_ids == e.token_ids
        tokens, logprobs = reference_greedy(ref, prompt, p.max_tokens)
        assert g.token_ids == tokens
        got = [lp[t] for lp, t in zip(g.logprobs, g.token_ids)]
        assert got == pytest.approx(logprobs, abs=1e-4)


def test_padded_rows_write_only_the_scratch_block(qwen3):
    path, _ = qwen3
    config = load_config(ModelSource(str(path)))
    worker = Worker(WorkerSpec(str(path), config, (0, 2), "cpu", torch.float32, block_size=4, max_context=64,
                               max_num_seqs=8, cuda_graphs="padded"))
    worker.allocate_cache(PoolSizes(16, 0))
    assert worker.cache.pad_block == 16 and worker.cache.k.shape[1] == 17
    worker.execute(StepPlan(0, [SeqChunk(0, [5, 6, 7], 0, 0, [3], True), SeqChunk(1, [8, 9], 0, 0, [9], True)]))
    k, v = worker.cache.k.clone(), worker.cache.v.clone()
    decode = StepPlan(1, [SeqChunk(0, [1], 3, 1, [], True), SeqChunk(1, [2], 2, 1, [], True)])
    assert worker.graphs.size_for(decode) == 2
    worker.graphs.sizes = [1, 4]  # pad 2 -> 4: two padded rows
    assert worker.graphs.size_for(decode) == 4
    worker.execute(decode)
    changed = (worker.cache.k != k).any(-1).any(-1)  # [layers, blocks, block_size]
    changed |= (worker.cache.v != v).any(-1).any(-1)
    touched = {(b, s) for _, b, s in changed.nonzero().tolist()}
    assert touched == {(3, 3), (9, 2), (16, 0)}  # the two real tokens' slots, and the scratch block


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_replay_equals_eager_on_the_gpu(qwen3):
    path, _ = qwen3
    prompts = PROMPTS[:5]
    params = [SamplingParams(max_tokens=8 + 2 * i, temperature=0, ignore_eos=True) for i in range(5)]
    kwargs = dict(devices=["cuda:0"], dtype="float32", block_size=4, max_num_seqs=8, max_context=128)
    with LLM(str(path), enforce_eager=True, **kwargs) as llm:
        assert llm.executor.worker.graphs is None
        eager = [c.token_ids for c in run_together(llm, prompts, params)]
    with LLM(str(path), **kwargs) as llm:
        graphs = llm.executor.worker.graphs
        assert sorted(graphs.graphs) == graph_sizes(8)
        replayed = [c.token_ids for c in run_together(llm, prompts, params)]
        assert graphs.steps > 0
    assert replayed == eager


def test_the_planner_reserves_the_graphs_memory():
    """With CUDA graphs a stage reserves one decode step of max_num_seqs rows in the graphs' pool, the
    block tables of those rows and a scratch block; the reserve grows with max_num_seqs."""
    from pprt.config import ModelConfig
    from pprt.plan import DeviceBudget, plan

    from bench.generate import QWEN3_30B_A3B

    config = ModelConfig.from_dict(dict(QWEN3_30B_A3B, num_hidden_layers=4))
    budget = [DeviceBudget("cuda:0", 80 * 2**30)]
    eager = plan(config, budget, max_context=4096).stages[0].reserve_bytes
    reserves = [plan(config, budget, max_context=4096, cuda_graphs=True, max_num_seqs=b).stages[0].reserve_bytes
                for b in (1, 64, 256)]
    assert eager < reserves[0] < reserves[1] < reserves[2]
    # at 256 rows at least the fp32 logits of 256 rows over the vocabulary
    assert reserves[2] - eager >= 256 * config.vocab_size * 4


@pytest.mark.parametrize("speculative", [None, {"method": "ngram", "num_speculative_tokens": 2}],
                         ids=["plain", "ngram-drafts"])
def test_padded_decode_of_a_hybrid_equals_transformers(tmp_path, monkeypatch, speculative):
    """Padded rows of a hybrid's decode step update a scratch state slot, never a sequence's; with
    speculative decoding, steps with drafts or a state rollback run eagerly between padded ones."""
    path = make_checkpoint(tmp_path / "hybrid", "qwen3_5_text", tokenizer=False)
    ref = reference_model(path)
    prompts = [[5, 17, 40, 5, 17, 40, 5], [9, 9, 9], [300, 3, 250, 3, 250]]  # repeats: n-gram drafts
    params = [SamplingParams(max_tokens=8 + 2 * i, temperature=0, ignore_eos=True) for i in range(3)]
    padded_specs(monkeypatch)
    with LLM(str(path), devices=["cpu"], max_num_seqs=8, max_context=64, speculative=speculative) as llm:
        outs = run_together(llm, prompts, params)
        worker = llm.executor.worker
        assert worker.graphs.steps > 0 and worker.state.pad_slot == worker.state.num_slots
        if speculative:
            assert llm.scheduler.num_verified > 0  # steps with drafts ran too
    for prompt, p, out in zip(prompts, params, outs):
        assert out.token_ids == reference_greedy(ref, prompt, p.max_tokens)[0]
