"""Every family runs with merged projections and the fused MoE, and still generates what transformers does.

After loading, each attention layer holds q/k/v as one `qkv_proj`, each MLP
(dense, shared expert) gate/up as one `gate_up_proj`, and each MoE layer its
experts stacked for the fused kernels (no per-expert modules left). The CPU
path (reference kernels) is checked against transformers for every family in
test_model.py and test_hybrid.py; here the GPU path runs: PPRT_KERNELS=triton
(interpreted on CPU) sends the routing, the expert alignment and both grouped
GEMMs of every MoE layer through the Triton kernels. Greedy tokens must equal
transformers', logprobs within 1e-4.
"""

from __future__ import annotations

import pytest
import torch

import pprt_kernels.fused_moe as fm
from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.models.attention import Attention
from pprt.models.layers import MLP
from pprt.models.moe import MoE

N = 4
PROMPTS = [[5, 17, 40, 33, 100, 7], [300, 3, 3, 250]]
SLOW = pytest.mark.slow  # dense families: their merged projections are checked on every test_model run
FAMILIES = [pytest.param("qwen2", marks=SLOW), pytest.param("qwen3", marks=SLOW), "qwen3_moe", "qwen2_moe",
            "qwen3_5_moe_text", pytest.param("qwen3_next", marks=SLOW)]


def check_structure(stage) -> dict[str, int]:
    kinds = {"attention": 0, "mlp": 0, "moe": 0}
    for module in stage.modules():
        if isinstance(module, Attention):
            assert module.qkv_proj is not None and module.q_proj is None
            kinds["attention"] += 1
        elif isinstance(module, MLP) and not isinstance(getattr(module, "gate_proj", None), torch.nn.Module):
            if module.gate_up_proj is not None:
                kinds["mlp"] += 1
        elif isinstance(module, MoE):
            assert len(module.experts) == 0 and module.stacked.gate_up is not None
            kinds["moe"] += 1
    return kinds


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_paths_match_transformers(family, tmp_path, monkeypatch, one_torch_thread):
    path = make_checkpoint(tmp_path / family, family, tokenizer=False)
    ref = reference_model(path)
    expected = [reference_greedy(ref, p, N) for p in PROMPTS]
    calls = []
    triton = fm.fused_moe_triton
    monkeypatch.setattr(fm, "fused_moe_triton", lambda *a, **k: calls.append(1) or triton(*a, **k))
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    with LLM(str(path), devices=["cpu"], max_context=64) as llm:
        kinds = check_structure(llm.executor.worker.stage)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0))
        config = llm.config
    attention_layers = sum(1 for i in range(config.num_layers) if not config.is_linear(i))
    assert kinds["attention"] == attention_layers
    sparse = sum(1 for i in range(config.num_layers) if config.is_sparse(i))
    assert kinds["moe"] == sparse and kinds["mlp"] == config.num_layers - sparse + (
        sparse if config.shared_expert_intermediate_size else 0)
    assert len(calls) == sparse * N  # every MoE layer of every step through the Triton kernels
    for out, (tokens, logprobs) in zip(outs, expected):
        assert out.token_ids == tokens
        ours = [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
        assert ours == pytest.approx(logprobs, abs=1e-4)
