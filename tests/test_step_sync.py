"""A step reaches every stage or none, and no stage computes on another step's activations.

Before: a Ctrl-C between the writes of one step's plan (stage 0 had it, stage 1
not) left the stages a step apart, and later steps of the same shape returned
wrong tokens without an error (6 of 120 two-stage trials of interrupt-then-reuse).
The interrupt is injected here at the exact moment: right after stage 0's write.
"""

import pickle
import signal
import threading

import pytest
import torch

from models import make_checkpoint
from pprt import LLM, SamplingParams, StageFailed
from pprt.distributed.pipeline import PipelineExecutor
from pprt.distributed.step import NewSequence, PoolSizes, SeqChunk, StepPlan
from pprt.distributed.worker import WorkerSpec
from pprt.weights.checkpoint import ModelSource, load_config

A, B = [5, 17, 40, 33], [9, 8, 200, 4]  # same length: a step apart, the stages would not notice by shape
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sync") / "m", "qwen3", tokenizer=False)


@pytest.fixture(scope="module")
def first_token(model):
    """Greedy first token of A and of B, from one in-process stage."""
    with LLM(str(model), devices=["cpu"]) as llm:
        return {tuple(p): llm.generate(p, SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0] for p in (A, B)}


@pytest.fixture
def pipeline(model):
    """Two stage programs driven directly from this (the main) thread, as the engine loop would."""
    config = load_config(ModelSource(str(model)))
    specs = [WorkerSpec(str(model), config, (0, 2), "cpu", torch.float32),
             WorkerSpec(str(model), config, (2, 3), "cpu", torch.float32)]
    executor = PipelineExecutor(specs, "gloo", PoolSizes(8))
    yield executor
    executor.close()


def prefill(step: int, seq_id: int, tokens: list[int]) -> StepPlan:
    """A new sequence's whole prompt in one chunk (block `seq_id`), sampling its first token greedily."""
    params = SamplingParams(max_tokens=1, temperature=0).resolve()
    return StepPlan(step, [SeqChunk(seq_id, tokens, 0, blocks_from=0, new_blocks=[seq_id], sample=True)],
                    added=[NewSequence(seq_id, params, tokens)])


def ctrl_c_in_main_thread() -> None:
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def test_ctrl_c_between_the_writes_of_a_step_waits_until_every_stage_has_it(pipeline, first_token):
    conn = pipeline.stages[0].conn
    real_send = conn.send_bytes

    def send_then_ctrl_c(data):
        real_send(data)
        ctrl_c_in_main_thread()  # its handler would run before the write to stage 1

    conn.send_bytes = send_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        pipeline.submit(prefill(0, 0, A))
    conn.send_bytes = real_send
    pipeline.submit(prefill(1, 1, B))
    results = [pipeline.result(), pipeline.result()]
    assert [(r.step, r.token_ids) for r in results] == [(0, [first_token[tuple(A)]]), (1, [first_token[tuple(B)]])]


def test_activations_of_another_step_are_a_loud_error(pipeline):
    # What a lost write did: stage 1 alone has step 5, then step 6 (same shape) goes to both.
    pipeline.stages[1].conn.send_bytes(pickle.dumps(prefill(5, 0, A)))
    pipeline.submit(prefill(6, 1, B))
    with pytest.raises(StageFailed, match=r"stage 1 .* executes step 5 but stage 0 sent the activations of step 6") \
            as e:
        pipeline.result()
    assert e.value.stage == 1


def test_ctrl_c_at_any_write_leaves_a_two_stage_llm_correct(model):
    prompts = [A, B, [7, 7, 100, 250], [1, 2, 3, 4]]
    with LLM(str(model), devices=["cpu"]) as one:
        expected = [c.token_ids for c in one.generate(prompts, GREEDY)]
    with LLM(str(model), devices=["cpu", "cpu"]) as llm:
        conn = llm.executor.stages[0].conn
        real_send = conn.send_bytes
        for n in (1, 2, 3, 5, 8, 13):  # the n-th write to stage 0 is followed by Ctrl-C in the caller's thread
            writes = [0]

            def send_then_ctrl_c(data):
                real_send(data)
                writes[0] += 1
                if writes[0] == n:
                    ctrl_c_in_main_thread()

            conn.send_bytes = send_then_ctrl_c
            with pytest.raises(KeyboardInterrupt):
                llm.generate(prompts, GREEDY)
            conn.send_bytes = real_send
            assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == expected, n
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and stats.requests_running == stats.requests_waiting == 0
