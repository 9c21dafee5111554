"""Hybrid Gated DeltaNet families (Qwen3-Next, Qwen3.5, Qwen3.5-MoE) and qwen2_moe against transformers.

Tiny random checkpoints written by transformers (tests/models.py: Qwen3NextForCausalLM,
Qwen3_5ForConditionalGeneration with a tiny vision tower and mtp.* tensors,
Qwen3_5ForCausalLM, Qwen3_5MoeForConditionalGeneration with fused experts,
Qwen3_5MoeForCausalLM, Qwen2MoeForCausalLM), float32, sharded. Hybrid models have 8 layers: 3 linear + 1 full,
twice. For each: greedy decoding of 16 tokens equals transformers' (one by one there)
and the chosen tokens' logprobs agree within 1e-4, for one prompt alone and for a batch
of prompts of different lengths in one continuous batch; on 1 stage, and on 2 and 3
stages with cuts inside a 3-linear + 1-full group, a stage holding no full-attention
layer, and a stage holding no DeltaNet layer. Chunked prefill (chunks of 1, 2, 3 tokens
and odd sizes, so prefill chunks and decode tokens share micro-batches and chunks are
shorter than the conv window) and preemption under a tiny pool keep the tokens; every
block and state slot comes back.
"""

from __future__ import annotations

import pytest
import torch

from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams

N = 16
PROMPTS = [[5, 17, 40, 33, 100, 7], [9], list(range(30, 100, 2)), [300, 3, 3, 3, 3, 3, 250, 11, 12, 13]]
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0)
ATOL = 1e-4

VARIANTS = {
    "qwen3_next": dict(family="qwen3_next"),
    "qwen3_next-fused-experts": dict(family="qwen3_next", expert_layout="fused"),
    "qwen3_5-multimodal": dict(family="qwen3_5"),
    "qwen3_5-multimodal-tied": dict(family="qwen3_5", tie_word_embeddings=True),
    "qwen3_5_text": dict(family="qwen3_5_text"),
    "qwen3_5_moe-multimodal-fused": dict(family="qwen3_5_moe"),
    "qwen3_5_moe-per-expert": dict(family="qwen3_5_moe", expert_layout="per_expert"),
    "qwen3_5_moe_text": dict(family="qwen3_5_moe_text"),
    "qwen2_moe": dict(family="qwen2_moe"),
    "qwen2_moe-fused-experts-tied": dict(family="qwen2_moe", expert_layout="fused", tie_word_embeddings=True),
}


class Oracle:
    """A checkpoint and transformers' greedy continuations of PROMPTS (computed once)."""

    def __init__(self, path, seed_prompts=PROMPTS):
        self.path = path
        model = reference_model(path)
        self.expected = {tuple(p): reference_greedy(model, p, N) for p in seed_prompts}

    def check(self, outs, prompts=PROMPTS) -> float:
        """Tokens equal, logprobs within ATOL; returns the largest logprob difference."""
        worst = 0.0
        for prompt, out in zip(prompts, outs, strict=True):
            tokens, logprobs = self.expected[tuple(prompt)]
            assert out.token_ids == tokens, prompt
            ours = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
            worst = max(worst, (ours - torch.tensor(logprobs)).abs().max().item())
        assert worst <= ATOL
        return worst


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """Built on first use, kept for the module (the pipeline tests reuse them)."""
    cache = {}

    def get(name: str) -> Oracle:
        if name not in cache:
            kwargs = dict(VARIANTS[name])
            path = make_checkpoint(tmp_path_factory.mktemp(name), kwargs.pop("family"), **kwargs)
            cache[name] = Oracle(path)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_stage_matches_transformers(oracles, name):
    oracle = oracles(name)
    with LLM(str(oracle.path), devices=["cpu"]) as llm:
        batch = llm.generate(PROMPTS, GREEDY)
        alone = llm.generate(PROMPTS[2], GREEDY)
        if llm.config.hybrid:
            assert llm.stats().state_slots_total > 0 and llm.stats().state_slots_used == 0
    oracle.check(batch)
    oracle.check(alone, PROMPTS[2:3])


# (variant, split): 8 hybrid layers are L L L F L L L F
PIPELINES = {
    # stage 0 = L L (no full attention: 0 KV bytes per block); stage 1 = L F L (a cut inside a group)
    "qwen3_next-3stages-no-kv-stage": ("qwen3_next", [2, 3, 3]),
    # stage 0 = L L L F L (cut inside the second group), stage 1 = L L F
    "qwen3_5-multimodal-2stages": ("qwen3_5-multimodal", [5, 3]),
    # stage 2 = F alone (no DeltaNet layer: no state pool); stage 0 = L (no KV)
    "qwen3_5_moe-3stages-no-state-stage": ("qwen3_5_moe-multimodal-fused", [1, 6, 1]),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_matches_transformers(oracles, name):
    variant, split = PIPELINES[name]
    oracle = oracles(variant)
    devices = ["cpu"] * len(split)
    # chunk_size 7: the long prompt's chunks follow each other through the stages, and share
    # micro-batches with the other sequences' decode tokens
    with LLM(str(oracle.path), devices=devices, split=split, chunk_size=7) as llm:
        assert [tuple(s.layers) for s in llm.executor.specs] == [
            (sum(split[:i]), sum(split[:i + 1])) for i in range(len(split))]
        batch = llm.generate(PROMPTS, GREEDY)
        alone = llm.generate(PROMPTS[2], GREEDY)  # 5 chunks of one prompt in the pipeline at once
        stats = llm.stats()
    oracle.check(batch)
    oracle.check(alone, PROMPTS[2:3])
    kv = [s.kv_cache_bytes for s in stats.stages]
    state = [s.state_cache_bytes for s in stats.stages]
    for s in stats.stages:
        attention, linear = llm.config.layers_of(*s.layers)
        assert (s.kv_cache_bytes == 0) == (attention == 0), (name, kv)
        assert (s.state_cache_bytes == 0) == (linear == 0), (name, state)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 11])
def test_chunked_prefill_matches_one_chunk(oracles, chunk_size):
    """Chunks of 1-3 tokens are shorter than the conv window (4); with several prompts, prefill
    chunks of one share steps with decode tokens of another."""
    oracle = oracles("qwen3_5_text")
    prompts = PROMPTS if chunk_size > 2 else PROMPTS[:2] + PROMPTS[3:]  # keep the 1-token runs short
    with LLM(str(oracle.path), devices=["cpu"], chunk_size=chunk_size) as llm:
        outs = llm.generate(prompts, GREEDY)
    oracle.check(outs, prompts)


def test_preemption_and_slot_reuse_keep_outputs_and_return_everything(oracles):
    """A pool too small for all sequences at once preempts (state dropped, recomputed from 0);
    max_num_seqs 2 < 4 prompts makes later sequences reuse finished ones' state slots."""
    oracle = oracles("qwen3_next")
    # 6 blocks of 16 tokens: the 35-token prompt takes 3 then 4, the 6- and 10-token ones 1 then 2;
    # the first sequences to grow preempt the most recently admitted one
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    kv_bytes = _kv_bytes_per_block(oracle.path) * 6
    with LLM(str(oracle.path), devices=["cpu"], kv_cache_memory=kv_bytes, max_num_seqs=3) as llm:
        assert llm.blocks.num_blocks == 6 and llm.slots.num_slots == 3
        outs = llm.generate(prompts, GREEDY)
        stats = llm.stats()
        assert stats.preemptions > 0
        assert llm.blocks.num_free == llm.blocks.num_blocks
        assert llm.slots.num_free == llm.slots.num_slots and not llm.slots.owner
        assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0
    oracle.check(outs, prompts)
    with LLM(str(oracle.path), devices=["cpu"], max_num_seqs=1) as llm:  # one slot, reused 4 times
        assert llm.slots.num_slots == 1
        oracle.check(llm.generate(PROMPTS, GREEDY))


def test_cancel_gives_the_state_slot_back_through_the_engine_loop(oracles):
    """A request cancelled while its steps are in flight in a 2-stage pipeline returns its blocks and
    its only state slot once they come back; the next requests get that slot (zeroed at position 0)
    and match transformers. One slot: a slot not given back would leave them waiting forever."""
    import queue

    oracle = oracles("qwen3_5_text")
    with LLM(str(oracle.path), devices=["cpu", "cpu"], split=[3, 5], max_num_seqs=1) as llm:
        assert llm.slots.num_slots == 1
        outputs: queue.Queue = queue.Queue()
        rid = llm.submit(PROMPTS[2], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True), outputs.put)
        first = outputs.get(timeout=120)
        assert first.error is None and first.completion is None and llm.slots.num_free == 0
        llm.cancel(rid)
        while (out := outputs.get(timeout=120)).completion is None:
            assert out.error is None
        assert out.completion.finish_reason == "cancelled" and len(out.completion.token_ids) < 500
        later: queue.Queue = queue.Queue()
        for prompt in PROMPTS[:2]:
            llm.submit(prompt, GREEDY, later.put)
        done = {}
        while len(done) < 2:
            out = later.get(timeout=120)  # a lost slot: queue.Empty here, not a hang
            assert out.error is None
            if out.completion is not None:
                done[out.request_id] = out.completion
        stats = llm.stats()
        assert llm.slots.num_free == 1 and not llm.slots.owner and llm.blocks.num_free == llm.blocks.num_blocks
        assert stats.state_slots_used == 0 and stats.kv_blocks_used == 0 and not llm.scheduler.has_work
    oracle.check([done[k] for k in sorted(done)], PROMPTS[:2])


TRITON_RUN = """
import json, sys
import pprt_kernels.causal_conv1d as cc
import pprt_kernels.gated_delta_triton as gdt
from pprt import LLM, SamplingParams

calls = {"conv": 0, "delta": 0}
conv, delta = cc.causal_conv1d_triton, gdt.gated_delta_rule_triton

def counted(name, fn):
    def run(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return run

cc.causal_conv1d_triton, gdt.gated_delta_rule_triton = counted("conv", conv), counted("delta", delta)
path, prompts, n = json.loads(sys.argv[1])
with LLM(path, devices=["cpu"]) as llm:
    outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=0))
print(json.dumps({"calls": calls, "outs": [[o.token_ids, [lp[t] for lp, t in zip(o.logprobs, o.token_ids)]]
                                            for o in outs]}))
"""


def test_generation_through_the_triton_kernels_under_the_interpreter(oracles):
    """PPRT_KERNELS=triton TRITON_INTERPRET=1: every DeltaNet layer's conv and delta rule run the
    Triton kernels (rows below the chunked kernel's threshold) and the tokens equal transformers'."""
    import json
    import os
    import subprocess
    import sys

    oracle = oracles("qwen3_5_text")
    prompts, n = [PROMPTS[0], PROMPTS[1], PROMPTS[3]], 4
    env = dict(os.environ, PPRT_KERNELS="triton", TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_RUN, json.dumps([str(oracle.path), prompts, n])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["calls"] == {"conv": 6 * n, "delta": 6 * n}  # 6 DeltaNet layers, one call per step
    for prompt, (tokens, logprobs) in zip(prompts, got["outs"]):
        want, want_lp = oracle.expected[tuple(prompt)]
        assert tokens == want[:n]
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(want_lp[:n]), atol=ATOL, rtol=0)


def _kv_bytes_per_block(path) -> int:
    from pprt.distributed.worker import WorkerSpec, cache_spec
    from pprt.weights.checkpoint import ModelSource, load_config

    config = load_config(ModelSource(path))
    return cache_spec(WorkerSpec(str(path), config, (0, config.num_layers), "cpu", torch.float32)).bytes_per_block


# ---- mostly slow: every variant through a pipeline, tiny chunks across stages, a tiny pool --------

SLOW_PIPELINES = {f"{name}-2stages": (name, [3, 5] if "qwen2_moe" not in name else [1, 2])
                  for name in VARIANTS if name not in ("qwen3_5-multimodal",)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_PIPELINES))
def test_every_variant_through_two_stages(oracles, name):
    variant, split = SLOW_PIPELINES[name]
    oracle = oracles(variant)
    with LLM(str(oracle.path), devices=["cpu", "cpu"], split=split, chunk_size=5) as llm:
        oracle.check(llm.generate(PROMPTS, GREEDY))


# chunks of 2 by default (shorter than the conv window, sharing steps with decode tokens); 1 and 3 slow
@pytest.mark.parametrize("chunk_size", [pytest.param(1, marks=pytest.mark.slow), 2,
                                        pytest.param(3, marks=pytest.mark.slow)])
def test_tiny_chunks_across_three_stages(oracles, chunk_size):
    oracle = oracles("qwen3_5_text")
    with LLM(str(oracle.path), devices=["cpu"] * 3, split=[2, 3, 3], chunk_size=chunk_size) as llm:
        oracle.check(llm.generate(PROMPTS[:1] + PROMPTS[3:], GREEDY), PROMPTS[:1] + PROMPTS[3:])


@pytest.mark.slow
def test_tiny_pool_in_a_pipeline(oracles):
    """Sequences wait for blocks (in a pipeline they are mostly in flight, so rarely preempted)."""
    oracle = oracles("qwen3_5-multimodal")
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    kv_bytes = _kv_bytes_per_block(oracle.path) * 3  # 6 blocks: each stage holds 1 of the 2 full layers
    with LLM(str(oracle.path), devices=["cpu", "cpu"], split=[4, 4], kv_cache_memory=kv_bytes,
             max_num_seqs=3) as llm:
        outs = llm.generate(prompts, GREEDY)
        stats = llm.stats()
        assert llm.blocks.num_free == llm.blocks.num_blocks and llm.slots.num_free == llm.slots.num_slots
    assert stats.kv_blocks_total == 6 and stats.state_slots_total == 3
    oracle.check(outs, prompts)
