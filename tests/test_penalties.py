"""presence_penalty and frequency_penalty end to end: LLM.generate against a torch loop over transformers' logits.

The reference is the OpenAI rule (pprt/models/sampler.py) applied by hand to
the logits transformers computes for the same checkpoint, after HF's
repetition penalty: logit[v] -= frequency * count[v] + presence * (count[v] > 0),
counts over the generated tokens only. Greedy, fp32, on 1 and 2 stages (the
parameters travel to the last stage's process), mixed in one batch with
requests that set other penalties.
"""

from __future__ import annotations

import queue

import pytest
import torch

from models import make_checkpoint
from pprt import LLM, SamplingParams

N = 14


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("penalties") / "m", "qwen3", seed=2)


def reference(hf, prompt: list[int], presence: float, frequency: float, repetition: float) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(N):
        x = _last_logits(hf, ids)  # [V]
        for v in set(ids):  # HF repetition penalty: prompt and generated
            x[v] = x[v] / repetition if x[v] > 0 else x[v] * repetition
        for v in set(out):
            x[v] -= frequency * out.count(v) + presence
        token = int(x.argmax())
        out.append(token)
        ids.append(token)
    return out


def _last_logits(hf, ids: list[int]) -> torch.Tensor:
    """One thread: a model this small runs 50x slower on two threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0, -1].float()
    finally:
        torch.set_num_threads(threads)


CASES = [  # (prompt, presence, frequency, repetition)
    ([5, 9, 14, 9], 1.5, 0.0, 1.0),
    ([77, 3], 0.0, 1.2, 1.0),
    ([200, 201, 202], 0.8, 0.6, 1.3),
    ([11, 12], -0.5, -0.4, 1.0),  # negative: repeats are favoured
    ([40, 41, 42, 43], 0.0, 0.0, 1.0),
]


@pytest.fixture(scope="module")
def hf(model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(hf):
    return [reference(hf, p, pr, fr, rp) for p, pr, fr, rp in CASES]


def test_the_cases_are_changed_by_their_penalties(hf, expected):
    unpenalized = [reference(hf, p, 0.0, 0.0, 1.0) for p, *_ in CASES]
    assert sum(e != u for e, u in zip(expected, unpenalized)) >= 3


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1-stage", "2-stages"])
def test_penalties_match_the_rule_on_transformers_logits(model, expected, devices):
    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, presence_penalty=pr,
                             frequency_penalty=fr, repetition_penalty=rp) for _, pr, fr, rp in CASES]
    with LLM(str(model), devices=devices, dtype="float32", max_context=64) as llm:
        alone = [llm.generate([p], s)[0].token_ids for (p, *_), s in zip(CASES, params)]
        finished: queue.SimpleQueue = queue.SimpleQueue()
        ids = [llm.submit(p, s, lambda out: out.finished and finished.put(out)) for (p, *_), s in zip(CASES, params)]
        done = {out.request_id: out.completion.token_ids for out in (finished.get(timeout=120) for _ in ids)}
        together = [done[i] for i in ids]  # submitted at once: one running batch
    assert alone == expected
    assert together == expected


def test_penalized_requests_are_not_drafted_under_speculative_decoding(model, expected):
    """Drafts are verified without the penalties' per-token counts: a penalized request must get none,
    and so writes the same tokens with speculation on (n-gram drafts) as without."""
    from pprt.engine.drafts import can_draft

    for _, pr, fr, rp in CASES:
        params = SamplingParams(presence_penalty=pr, frequency_penalty=fr, repetition_penalty=rp).resolve()
        assert can_draft(params) == (pr == fr == 0.0 and rp == 1.0)
    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, presence_penalty=pr,
                             frequency_penalty=fr, repetition_penalty=rp) for _, pr, fr, rp in CASES]
    speculative = {"method": "ngram", "num_speculative_tokens": 3}
    with LLM(str(model), devices=["cpu"], dtype="float32", max_context=64, speculative=speculative) as llm:
        assert [llm.generate([p], s)[0].token_ids for (p, *_), s in zip(CASES, params)] == expected
