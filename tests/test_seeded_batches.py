"""A seeded request gives the same tokens whatever shares its batch, end to end in fp32.

The model's head repeats each of its rows 8 times, so every logit is tied with 7
others and a top_k of 4 or 12 always cuts through a tie: the tie rule decides what is
kept. Each seeded request runs alone and then beside requests with top_k off
(the full-sort path), a greedy one and another seeded one, on 1 and 2 stages.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import VOCAB, make_checkpoint
from pprt import LLM, SamplingParams

GROUP = 8  # head rows repeated this often: logits tie in groups of 8


@pytest.fixture(scope="module")
def tied_logits_model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ties"), "qwen3", seed=5)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    head = tensors["lm_head.weight"]  # [V, H]
    tensors["lm_head.weight"] = head[torch.arange(VOCAB) // GROUP * GROUP].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return path


def _interleaved(llm: LLM, requests) -> list[list[int]]:
    """Run (prompt, params) requests together through stream(): they share the running batch."""
    streams = [llm.stream(prompt, params) for prompt, params in requests]
    done: dict[int, list[int]] = {}
    while len(done) < len(streams):
        for i, s in enumerate(streams):
            if i in done:
                continue
            try:
                next(s)
            except StopIteration as stop:
                done[i] = stop.value.token_ids
    return [done[i] for i in range(len(streams))]


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1-stage", "2-stages"])
def test_seeded_request_is_the_same_whatever_its_batch(tied_logits_model, devices):
    n = 16
    a = ([5, 17, 40, 33, 100, 7], SamplingParams(max_tokens=n, seed=7, top_k=4, temperature=1.5, ignore_eos=True))
    b = ([9, 250, 3], SamplingParams(max_tokens=n, seed=8, top_k=12, top_p=0.97, temperature=1.2, ignore_eos=True))
    top_k_off = ([31, 41, 59], SamplingParams(max_tokens=n, top_k=0, ignore_eos=True))
    greedy = ([26, 53, 58, 97], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    with LLM(str(tied_logits_model), devices=devices, dtype="float32", max_context=64) as llm:
        alone = [_interleaved(llm, [r])[0] for r in (a, b)]
        mixed = _interleaved(llm, [top_k_off, a, greedy, b])
    assert [mixed[1], mixed[3]] == alone
    assert alone[0] != alone[1] and len(set(alone[0])) > n // 3  # really sampled
