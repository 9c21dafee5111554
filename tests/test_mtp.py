"""Speculative decoding with the checkpoint's own MTP head (`mtp.*`), on the last stage of the pipeline.

1. The head's draft logits equal the published formula (tests/mtp_reference.py, plain torch:
   transformers ignores mtp.*), after a prefill cut in two chunks and after a verify step
   that accepted two of three drafts, for a dense multimodal Qwen3.5, a Qwen3.5-MoE with
   fused experts and a Qwen3-Next with per-expert tensors.
2. Greedy output with MTP drafting equals transformers' (and so the output without
   drafting), on 1, 2 and 3 stages, with preemption in a tiny KV pool; on the way, every
   draft the head proposed equals the formula's for the tokens it followed (also after
   prefix-cache hits). A random head accepts little, so some runs also replace the head's
   drafts by transformers' continuation with one token spoiled: every acceptance count
   0..k happens, and the head's KV after accepted drafts is checked the same way.
3. Seeded sampling: a request's tokens do not depend on its batch neighbours; over many
   unseeded runs the token frequencies with MTP drafting equal those without (a
   checkpoint whose head and model both tend to repeat the last token: drafts accepted
   and rejected), within 4.5 standard errors.
4. A checkpoint without an MTP head is refused by name; the planner counts the head, its
   KV and the embedding copy.
"""

from __future__ import annotations

import pytest
import torch

from models import make_checkpoint, reference_greedy, reference_model
from mtp_reference import load_head, reference_drafts
from pprt import LLM, SamplingParams
from pprt.distributed.step import NewSequence, PoolSizes, SeqChunk, StepPlan
from pprt.distributed.worker import Worker, WorkerSpec
from pprt.errors import CheckpointError
from pprt.weights.checkpoint import ModelSource, load_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

K = 3
N = 16
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
MTP = {"method": "mtp", "num_speculative_tokens": K}
PROMPTS = [[5, 17, 40, 33, 5, 17, 40, 33, 5, 17], [9, 8], [30, 31, 32, 33, 34, 35, 30, 31, 32, 33, 34],
           [5, 17, 40, 33, 5, 17, 40, 33, 9]]  # the last shares two 4-token blocks with the first
FAMILIES = {"qwen3_5": {}, "qwen3_5_moe": {}, "qwen3_next": {"mtp": True}, "qwen3_5_text": {"mtp": True}}


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """Per family: a checkpoint with an MTP head, its transformers model and head tensors, and
    transformers' greedy continuations of PROMPTS (built once)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = make_checkpoint(tmp_path_factory.mktemp(family), family, **FAMILIES[family])
            model = reference_model(path)
            expected = {tuple(p): reference_greedy(model, p, N)[0] for p in PROMPTS}
            cache[family] = path, model, load_head(path, model), expected
        return cache[family]

    return get


# ---- 1. the head against the formula, one stage driven step by step -------------------------------

class _Logits:
    """Records what the stage's head returns (the model's rows, then each draft step's)."""

    def __init__(self, stage):
        self.calls, self._head = [], stage.logits

    def __call__(self, x):
        self.calls.append(self._head(x))
        return self.calls[-1]


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_draft_logits_equal_the_published_formula(oracles, family):
    path, model, head, expected = oracles(family)
    config = load_config(ModelSource(path))
    worker = Worker(WorkerSpec(str(path), config, (0, config.num_layers), "cpu", torch.float32, block_size=4,
                               max_context=64, mtp=True))
    worker.allocate_cache(PoolSizes(blocks=8, slots=2 if config.hybrid else 0))
    recorder = worker.stage.logits = _Logits(worker.stage)
    slot = dict(state_slot=0) if config.hybrid else {}
    prompt = PROMPTS[2][:7]
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True).resolve()
    # a prefill cut in two: the first chunk carries the token after it
    first = SeqChunk(0, prompt[:4], 0, blocks_from=0, new_blocks=[0, 1, 2, 3], sample=False, next_token=prompt[4],
                     **slot)
    worker.execute(StepPlan(0, [first], [NewSequence(0, params, prompt)]))
    assert recorder.calls == [] or all(c.shape[0] == 0 for c in recorder.calls)
    last = SeqChunk(0, prompt[4:], 4, blocks_from=4, new_blocks=[], sample=True, propose=K, **slot)
    recorder.calls.clear()
    result = worker.execute(StepPlan(1, [last]))
    tokens = prompt + result.token_ids
    drafts, logits = reference_drafts(model, head, tokens, K)
    assert len(recorder.calls) == 1 + K and all(c.shape[0] == 1 for c in recorder.calls)
    torch.testing.assert_close(torch.cat(recorder.calls[1:]), logits, rtol=1e-4, atol=1e-4)
    assert result.drafts == [drafts]
    # verify: transformers' next three tokens with the third spoiled, so two are accepted
    sent = reference_greedy(model, tokens, K)[0]
    sent[2] = (sent[2] + 1) % 320
    spec = dict(state_slot=0, snapshot_slot=1) if config.hybrid else {}
    verify = SeqChunk(0, tokens[-1:] + sent, len(prompt), blocks_from=4, new_blocks=[], sample=True,
                      num_drafts=K, propose=K, **spec)
    recorder.calls.clear()
    result = worker.execute(StepPlan(2, [verify]))
    assert result.accepted == [sent[:2]]
    tokens += sent[:2] + result.token_ids
    drafts, logits = reference_drafts(model, head, tokens, K)
    assert recorder.calls[0].shape[0] == K + 1 and len(recorder.calls) == 1 + K
    torch.testing.assert_close(torch.cat(recorder.calls[1:]), logits, rtol=1e-4, atol=1e-4)
    assert result.drafts == [drafts]
