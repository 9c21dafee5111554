"""A tied model (tie_word_embeddings) whose checkpoint also stores an lm_head.weight.

pprt follows transformers 5: a stored head that differs from the embedding is the head
the model runs with (untied, with a warning); an equal one changes nothing.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.config import ModelConfig
from pprt.weights.checkpoint import CheckpointReader, ModelSource
from pprt.weights.loader import resolve_tied_head

PROMPT = [5, 17, 40, 33, 100, 7]


def _add_head(path, head: torch.Tensor) -> None:
    """Store `head` as lm_head.weight in a shard of its own, listed in the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    save_file({"lm_head.weight": head.contiguous()}, path / "head.safetensors", metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def _embedding(path) -> torch.Tensor:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return load_file(path / index["weight_map"]["model.embed_tokens.weight"])["model.embed_tokens.weight"]


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("heads"), "qwen2", tie_word_embeddings=True, tokenizer=False)
    _add_head(path, torch.randn_like(_embedding(path)) * 0.08)
    return path


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1-stage", "2-stages"])
def test_a_different_stored_head_is_used_as_transformers_does(two_heads, devices, caplog):
    ref = reference_model(two_heads)
    assert ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr()  # transformers untied it
    want, want_lp = reference_greedy(ref, PROMPT, 8)
    with caplog.at_level(logging.WARNING, logger="pprt"):
        with LLM(str(two_heads), devices=devices) as llm:
            out = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0))[0]
            assert not llm.config.tie_word_embeddings
    assert out.token_ids == want
    got_lp = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
    assert torch.allclose(torch.tensor(got_lp), torch.tensor(want_lp), atol=1e-4, rtol=0)
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("pprt") and "lm_head.weight" in r.getMessage()]
    assert len(warned) == 1 and "tie_word_embeddings" in warned[0] and "untied" in warned[0]


def test_an_equal_stored_head_keeps_the_model_tied(tmp_path, caplog):
    path = make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True, tokenizer=False)
    _add_head(path, _embedding(path))
    config = json.loads((path / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="pprt"):
        resolved = resolve_tied_head(ModelConfig.from_dict(config), CheckpointReader(ModelSource(str(path))),
                                     rows_per_read=7)  # several reads, one ragged
    assert resolved.tie_word_embeddings and not [r for r in caplog.records if r.name.startswith("pprt")]


def test_a_difference_in_the_last_row_is_found(tmp_path):
    """Only the last row differs: the chunked comparison still finds it."""
    path = make_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True, tokenizer=False)
    head = _embedding(path).clone()
    head[-1, 0] += 1.0
    _add_head(path, head)
    config = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    assert not resolve_tied_head(config, CheckpointReader(ModelSource(str(path))), rows_per_read=64).tie_word_embeddings
