"""pprt against transformers on tiny random checkpoints of every family.

Greedy decoding must give the same tokens, and the chosen tokens' logprobs
must agree within 1e-4, for a batch of prompts of different lengths (one
continuous batch in pprt; one by one in transformers).
"""

import json

import pytest
import torch

from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.weights.checkpoint import ModelSource, load_config

VARIANTS = {
    "qwen2": dict(family="qwen2"),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True),
    "qwen3-headdim24": dict(family="qwen3"),
    "qwen3-bias-tied": dict(family="qwen3", attention_bias=True, tie_word_embeddings=True),
    "qwen3_moe-sparse2-mlponly": dict(family="qwen3_moe"),
    # experts stored fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]), as some exports do
    "qwen3_moe-topk-unnormalized-fused": dict(family="qwen3_moe", norm_topk_prob=False, decoder_sparse_step=1,
                                              mlp_only_layers=[0], expert_layout="fused"),
    "qwen2-yarn": dict(family="qwen2", yarn={"factor": 4.0, "original_max_position_embeddings": 32}),
}

PROMPTS = [[5, 17, 40, 33, 100, 7], [9], list(range(30, 100, 2)), [300, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 250]]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    kwargs = dict(VARIANTS[request.param])
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), kwargs.pop("family"), **kwargs)
    return path, reference_model(path)


def test_greedy_matches_transformers(variant):
    path, ref = variant
    with LLM(str(path), devices=["cpu"]) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=0))
    for prompt, out in zip(PROMPTS, outs):
        tokens, logprobs = reference_greedy(ref, prompt, 16)
        assert out.token_ids == tokens
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"
        ours = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
        assert torch.allclose(ours, torch.tensor(logprobs), atol=1e-4, rtol=0)


def test_yarn_config_is_read_from_old_spelling(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2", yarn={"factor": 4.0, "original_max_position_embeddings": 32},
                           tokenizer=False)
    cfg = json.loads((path / "config.json").read_text())
    assert "rope_parameters" not in cfg and cfg["rope_scaling"]["type"] == "yarn"
    rope = load_config(ModelSource(path)).rope
    assert (rope.type, rope.factor, rope.original_max_position) == ("yarn", 4.0, 32)


def test_chunked_prefill_matches_one_chunk(tmp_path):
    """A prompt cut into many chunks attends to its cached prefix exactly as one pass does."""
    path = make_checkpoint(tmp_path, "qwen3")
    prompt = [(7 * i) % 300 + 3 for i in range(150)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    with LLM(str(path), devices=["cpu"]) as llm:
        whole = llm.generate(prompt, params)[0]
    with LLM(str(path), devices=["cpu"], chunk_size=37) as llm:
        chunked = llm.generate(prompt, params)[0]
    assert chunked.token_ids == whole.token_ids
    for a, b, t in zip(chunked.logprobs, whole.logprobs, whole.token_ids):
        assert abs(a[t] - b[t]) < 1e-4
