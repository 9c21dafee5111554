"""LoRA on the MoE families: routed experts, shared experts, attention, DeltaNet, on merged projections.

For each MoE family (qwen2_moe, qwen3_moe, qwen3_next, qwen3_5_moe) two random adapters
are made by the peft library on the tiny checkpoint: "a" adapts attention (and the
DeltaNet projections, Qwen3-Next's interleaved in_proj_qkvz included), the dense and
shared-expert MLPs and both fused expert parameters (`target_parameters`
mlp.experts.gate_up_proj and mlp.experts.down_proj: transformers 5 holds experts fused);
"b" (rsLoRA, another rank) adapts o_proj and the experts' down_proj only. pprt must give
each request of one batch that mixes a, b and no adapter the greedy tokens of transformers
+ peft with that adapter (logprobs within 1e-4) and the output it gets alone, while q/k/v
and gate/up stay merged into one layer each (asserted on the loaded modules). The same
experts written as per-expert modules (the layout PEFT wrote for transformers 4) give the
same tokens; two stages, merge=True (folded into the stacked float experts), the
Triton path (PPRT_KERNELS=triton, interpreted) and Int4 / FP8 experts (quantized at load,
against the dequantized base + peft) too.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft", reason="the test extra (peft) is not installed")

from lora_helpers import make_adapter, per_expert_adapter, random_per_expert_adapter  # noqa: E402
from models import FAMILIES, make_checkpoint, reference_greedy, reference_model  # noqa: E402
from pprt import LLM, SamplingParams  # noqa: E402
from pprt.models.attention import Attention  # noqa: E402
from pprt.models.layers import MLP  # noqa: E402
from pprt.models.moe import MoE  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py
PROMPTS = [[5, 17, 40, 33, 100, 7], [9, 200, 31], list(range(30, 70, 3))]
N = 6
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MLPS = ["gate_proj", "up_proj", "down_proj"]
# family -> target_modules of adapter "a" (beside the fused experts)
TARGETS = {
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", *MLPS],
    "qwen2_moe": ["q_proj", "v_proj", "o_proj", "shared_expert_gate", *MLPS],
    "qwen3_next": ["in_proj_qkvz", "in_proj_ba", "out_proj", "q_proj", "k_proj", "o_proj", *MLPS],
    "qwen3_5_moe": ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "v_proj", "o_proj", *MLPS],
}
# PEFT (0.21) on transformers 5 reads the names gate_proj / up_proj / down_proj of a qwen3_moe or
# qwen3_next model as transformers 4's experts and turns them into target_parameters (gate_up_proj at
# rank 2r, alpha 2 alpha: peft/utils/transformers_weight_conversion.py): their dense and shared-expert
# MLPs are not adapted. qwen2_moe and qwen3_5_moe keep the names: there they adapt those MLPs.
SHARED_MLP = ("qwen2_moe", "qwen3_5_moe")
SLOW = pytest.mark.slow


def only(*fast: str, families=tuple(TARGETS)) -> list:
    """The families as `family` parameters, those not in `fast` marked slow."""
    return [f if f in fast else pytest.param(f, marks=SLOW) for f in families]


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """(family, base path, {name: (adapter dir, peft model)}, base transformers model)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"lora_{name}")
    path = make_checkpoint(root / "base", name, tokenizer=False)
    a = make_adapter(path, root / "a", 1, r=8, lora_alpha=16, target_modules=TARGETS[name],
                     target_parameters=EXPERTS)
    b = make_adapter(path, root / "b", 2, r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj"],
                     target_parameters=["mlp.experts.down_proj"])
    return name, path, {"a": (root / "a", a), "b": (root / "b", b)}, reference_model(path)


def greedy(lora=None) -> SamplingParams:
    return SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0, lora=lora)


def assert_matches(out, ref, prompt) -> None:
    tokens, logprobs = reference_greedy(ref, prompt, N)
    assert out.token_ids == tokens
    ours = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
    assert torch.allclose(ours, torch.tensor(logprobs), atol=1e-4, rtol=0), (ours, logprobs)


def assert_merged_and_adapted(llm, mlp: bool) -> None:
    """q/k/v and gate/up are one layer each; adapters sit on the merged layers and the stacked experts
    (`mlp`: on the shared expert's merged gate_up_proj too). Adapters reach the stages with the first step."""
    worker = llm.executor.worker
    stage, bank = worker.stage, worker.loras
    for name, module in stage.named_modules():
        if isinstance(module, Attention):
            assert module.qkv_proj is not None and module.q_proj is None, name
        elif isinstance(module, MLP):
            assert module.gate_up_proj is not None and module.gate_proj is None, name
        elif isinstance(module, MoE):
            assert len(module.experts) == 0 and module.expert_lora is not None, name
            for proj in ("gate_up_proj", "down_proj"):
                a, b = bank.stack(f"{name}.experts.{proj}")
                assert a.shape[:2] == (bank.max_loras, module.num_experts) and a.abs().sum() > 0
    sites = {site.name for site in bank.sites.values()}
    assert any(s.endswith("self_attn.qkv_proj") for s in sites)
    assert any(s.endswith("shared_expert.gate_up_proj") for s in sites) == mlp  # the shared expert's merged MLP
    assert not any(s.endswith((".q_proj", ".gate_proj", ".up_proj")) for s in sites), sites  # no part alone


@pytest.mark.parametrize("family", list(TARGETS), indirect=True)
def test_mixed_batch_equals_peft_and_solo(family):
    name, path, adapters, base = family
    with LLM(str(path), devices=["cpu"], lora={n: str(p) for n, (p, _) in adapters.items()}) as llm:
        choices = ["a", None, "b"]
        mixed = llm.generate(PROMPTS, [greedy(c) for c in choices])
        assert_merged_and_adapted(llm, mlp=name in SHARED_MLP)
        for prompt, choice, out in zip(PROMPTS, choices, mixed):
            assert_matches(out, base if choice is None else adapters[choice][1], prompt)
            assert llm.generate([prompt], greedy(choice))[0].token_ids == out.token_ids  # alone
        # each adapter changes the output (else the comparisons prove nothing)
        plain = llm.generate(PROMPTS[:1], greedy())[0].token_ids
        assert all(llm.generate(PROMPTS[:1], greedy(c))[0].token_ids != plain for c in ("a", "b"))


@pytest.mark.parametrize("family", only("qwen3_moe"), indirect=True)
def test_two_stages(family):
    name, path, adapters, base = family
    with LLM(str(path), devices=["cpu", "cpu"], lora={n: str(p) for n, (p, _) in adapters.items()}) as llm:
        outs = llm.generate(PROMPTS, [greedy("a"), greedy("b"), greedy()])
    for prompt, ref, out in zip(PROMPTS, (adapters["a"][1], adapters["b"][1], base), outs):
        assert_matches(out, ref, prompt)


# Qwen3.5-MoE was released with fused experts: no per-expert adapters exist for it
@pytest.mark.parametrize("family", only("qwen3_moe", families=("qwen3_moe", "qwen2_moe", "qwen3_next")),
                         indirect=True)
def test_per_expert_modules_equal_the_fused_parameters(family, tmp_path):
    """The same adapter as per-expert modules `mlp.experts.{e}.gate_proj|up_proj|down_proj` (transformers 4's
    layout, still what hub adapters of qwen2_moe / qwen3_moe / Qwen3-Next hold)."""
    name, path, adapters, base = family
    cfg = FAMILIES[name]
    per_expert_adapter(adapters["a"][0], tmp_path / "a", cfg["num_experts"], cfg["moe_intermediate_size"])
    with LLM(str(path), devices=["cpu"], lora={"a": str(tmp_path / "a")}) as llm:
        outs = llm.generate(PROMPTS[:2], greedy("a"))
        assert_merged_and_adapted(llm, mlp=name in SHARED_MLP)
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out, adapters["a"][1], prompt)


def test_per_expert_adapter_equals_peft_loading_it(tmp_path):
    """A transformers-4 layout adapter (per-expert modules, gate and up each at rank r) read by pprt equals
    what PEFT itself makes of it on transformers 5 (it converts the file to fused parameters, A's
    concatenated and B's block-diagonal)."""
    from peft import PeftModel

    path = make_checkpoint(tmp_path / "base", "qwen3_moe", tokenizer=False, mlp_only_layers=[],
                           decoder_sparse_step=1)
    random_per_expert_adapter(path, tmp_path / "v4", seed=3, r=4, alpha=8)
    ref = PeftModel.from_pretrained(reference_model(path), tmp_path / "v4").eval()
    assert ref.peft_config["default"].target_parameters == {"gate_up_proj", "down_proj"}  # PEFT converted it
    with LLM(str(path), devices=["cpu"], lora={"v4": str(tmp_path / "v4")}) as llm:
        outs = llm.generate(PROMPTS[:2], greedy("v4"))
        plain = llm.generate(PROMPTS[:1], greedy())[0]
        a, b = llm.executor.worker.loras.stack("model.layers.0.mlp.experts.gate_up_proj")
    assert a.shape[2] == 8 and b.shape[2:] == (2 * 32, 8)  # gate's and up's rank 4, one shrink
    assert outs[0].token_ids != plain.token_ids
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out, ref, prompt)


@pytest.mark.parametrize("family", only("qwen3_moe"), indirect=True)
def test_merge_folds_experts_and_merged_projections(family):
    name, path, adapters, base = family
    with LLM(str(path), devices=["cpu"], lora={"a": str(adapters["a"][0])}, merge=True) as llm:
        assert llm.executor.worker.loras is None
        outs = llm.generate(PROMPTS[:2], greedy("a"))
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out, adapters["a"][1], prompt)


@pytest.mark.parametrize("family", only("qwen3_moe"), indirect=True)
def test_triton_path(family, monkeypatch):
    """PPRT_KERNELS=triton (interpreted on CPU): the LoRA gather kernel on every site and the fused MoE
    kernels with each pair's gate_up delta in their epilogue."""
    name, path, adapters, base = family
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    with LLM(str(path), devices=["cpu"], max_context=64, lora={n: str(p) for n, (p, _) in adapters.items()}) as llm:
        outs = llm.generate(PROMPTS[:2], [greedy("a"), greedy("b")])
    for prompt, ref, out in zip(PROMPTS, (adapters["a"][1], adapters["b"][1]), outs):
        assert_matches(out, ref, prompt)


@pytest.mark.parametrize("family", ["qwen3_moe"], indirect=True)
def test_all_linear_adapts_the_router_and_the_experts(family, tmp_path):
    """PEFT's "all-linear" on transformers 5's qwen3_moe: attention modules, the fused experts and the
    router's weight (`target_parameters` ["gate.weight", "gate_up_proj", "down_proj"])."""
    import json

    name, path, _, _ = family
    ref = make_adapter(path, tmp_path / "all", 7, r=4, lora_alpha=8, target_modules="all-linear")
    config = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert "gate.weight" in config["target_parameters"]  # the router, through PEFT's conversion
    with LLM(str(path), devices=["cpu"], lora={"all": str(tmp_path / "all")}) as llm:
        outs = llm.generate(PROMPTS[:2], greedy("all"))
        assert "model.layers.1.mlp.gate" in {s.name for s in llm.executor.worker.loras.sites.values()}
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out, ref, prompt)


@pytest.mark.parametrize("quant", ["int4", "fp8"])
def test_quantized_experts_with_adapters_match_the_dequantized_base(tmp_path, quant):
    """quant="int4" / "fp8" at load quantizes the stacked experts; their adapters stay in the activation
    dtype: pprt must equal transformers + peft on the dequantized weights with the same adapter."""
    import json

    from peft import PeftModel

    from ckpt_files import read_tensors, write_sharded
    from pprt.weights import fp8, int4
    from pprt.weights.merge import linear_modules

    kind, weight_of = {"int4": (int4.Int4Linear, lambda m: int4.dequantize(m.weight)),
                       "fp8": (fp8.Fp8Linear, lambda m: fp8.dequantize(m.fp8_weight))}[quant]
    path = make_checkpoint(tmp_path / "base", "qwen3_moe", tokenizer=False, hidden_size=128, intermediate_size=256,
                           moe_intermediate_size=128, head_dim=64)
    make_adapter(path, tmp_path / "a", 4, r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                 target_parameters=EXPERTS)
    with LLM(str(path), devices=["cpu"], dtype="float32", quant=quant, lora={"a": str(tmp_path / "a")}) as llm:
        outs = llm.generate(PROMPTS[:2], [greedy("a"), greedy()])
        stage = llm.executor.worker.stage
        assert stage.get_submodule("model.layers.1.mlp").stacked.gate_up.expert_weights().format.value == quant
        deq = {f"{p}.weight": weight_of(m) for p, m in linear_modules(stage).items() if isinstance(m, kind)}
    assert any(".experts." in n for n in deq)
    write_sharded(tmp_path / "deq", {**read_tensors(path), **deq}, json.loads((path / "config.json").read_text()))
    base = reference_model(tmp_path / "deq")
    assert_matches(outs[1], base, PROMPTS[1])
    assert_matches(outs[0], PeftModel.from_pretrained(base, tmp_path / "a").eval(), PROMPTS[0])


@pytest.mark.parametrize("family", ["qwen3_5_moe"], indirect=True)
def test_mtp_drafts_are_verified_through_each_requests_adapter(family):
    """MTP drafting (the checkpoint's own head, which no adapter touches) proposes; the drafts are
    verified through the request's adapter, so greedy tokens are still transformers + peft's (requests
    asking for logprobs are not drafted: these do not)."""
    name, path, adapters, base = family
    mtp = {"method": "mtp", "num_speculative_tokens": 2}
    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, lora=c) for c in ("a", None, "b")]
    with LLM(str(path), devices=["cpu"], lora={n: str(p) for n, (p, _) in adapters.items()},
             speculative=mtp) as llm:
        outs = llm.generate(PROMPTS, params)
        assert llm.stats().draft_tokens > 0
    for prompt, ref, out in zip(PROMPTS, (adapters["a"][1], base, adapters["b"][1]), outs):
        assert out.token_ids == reference_greedy(ref, prompt, N)[0]
