"""LoRA adapters against transformers + peft on tiny random checkpoints.

Adapters are made by the peft library with random A and B (init_lora_weights=False,
so B is not zero and every adapted layer changes the output), saved with
save_pretrained. Greedy tokens must equal transformers + peft and the chosen tokens'
logprobs agree within 1e-4, on 1 and 2 stages; one batch mixing two adapters and
the base model gives each request what it gets alone; merge=True matches too.
"""

from __future__ import annotations

import pytest
import torch

from lora_helpers import make_adapter
from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams

PROMPTS = [[5, 17, 40, 33, 100, 7], [9, 200, 31], list(range(30, 70, 2))]
N = 8


def greedy(params_lora=None, **kw):
    return SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0, lora=params_lora, **kw)


def assert_matches(out, ref, prompt):
    tokens, logprobs = reference_greedy(ref, prompt, N)
    assert out.token_ids == tokens
    ours = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
    assert torch.allclose(ours, torch.tensor(logprobs), atol=1e-4, rtol=0), (ours, logprobs)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    path = make_checkpoint(root / "base", "qwen3")
    # two adapters: attention + MLP of layers 1-2 at rank 8 (alpha 16), and a regex over q/v/down of
    # layers 0 and 2 at rank 16 with rsLoRA
    a = make_adapter(path, root / "a", 1, r=8, lora_alpha=16, layers_to_transform=[1, 2],
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    b = make_adapter(path, root / "b", 2, r=16, lora_alpha=8, use_rslora=True,
                     target_modules=r"model\.layers\.[02]\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)")
    return path, {"a": (root / "a", a), "b": (root / "b", b)}, reference_model(path)


def test_mixed_batch_matches_peft_and_solo(qwen3):
    path, adapters, base = qwen3
    with LLM(str(path), devices=["cpu"], lora={n: str(p) for n, (p, _) in adapters.items()}) as llm:
        assert llm.loras == ["a", "b"]
        # one batch: adapter a, none, adapter b (each prompt once per adapter choice)
        choices = ["a", None, "b"]
        mixed = llm.generate(PROMPTS, [greedy(c) for c in choices])
        for prompt, choice, out in zip(PROMPTS, choices, mixed):
            assert_matches(out, base if choice is None else adapters[choice][1], prompt)
            solo = llm.generate([prompt], greedy(choice))[0]
            assert solo.token_ids == out.token_ids
        # q/k/v and gate/up stay merged: the adapters add to their parts' rows of the merged layers
        attn = llm.executor.worker.stage.get_submodule("model.layers.1.self_attn")
        assert attn.qkv_proj is not None and attn.q_proj is None
        sites = {site.name for site in llm.executor.worker.loras.sites.values()}
        assert {"model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj"} <= sites
        assert not any(s.endswith((".q_proj", ".k_proj", ".v_proj", ".gate_proj", ".up_proj")) for s in sites)
        # the adapters change the output at all (else the test above proves nothing)
        plain = llm.generate(PROMPTS[:1], greedy())[0]
        assert llm.generate(PROMPTS[:1], greedy("a"))[0].token_ids != plain.token_ids
        with pytest.raises(ValueError, match="no LoRA adapter named 'c'"):
            llm.generate(PROMPTS[:1], greedy("c"))
        with pytest.raises(ValueError, match="3 SamplingParams for 1 prompts"):
            llm.generate(PROMPTS[:1], [greedy()] * 3)


def test_load_unload_at_runtime_and_two_stages(qwen3):
    path, adapters, base = qwen3
    with LLM(str(path), devices=["cpu", "cpu"], split=[2, 1], max_loras=1) as llm:
        assert llm.loras == []
        llm.load_lora("b", str(adapters["b"][0]))
        with pytest.raises(ValueError, match="all 1 LoRA slots are in use"):
            llm.load_lora("a", str(adapters["a"][0]))
        outs = llm.generate(PROMPTS[:2], [greedy("b"), greedy()])
        assert_matches(outs[0], adapters["b"][1], PROMPTS[0])
        assert_matches(outs[1], base, PROMPTS[1])
        llm.unload_lora("b")
        llm.load_lora("a", str(adapters["a"][0]))  # reuses the slot: stages replace b's tensors
        outs = llm.generate(PROMPTS[:2], [greedy("a"), greedy()])
        assert_matches(outs[0], adapters["a"][1], PROMPTS[0])
        assert_matches(outs[1], base, PROMPTS[1])
        with pytest.raises(ValueError, match="no LoRA adapter named 'b'"):
            llm.unload_lora("b")


def test_merge_folds_the_adapter(qwen3):
    path, adapters, _ = qwen3
    with LLM(str(path), devices=["cpu"], lora={"a": str(adapters["a"][0])}, merge=True) as llm:
        assert llm.executor.specs[0].max_loras == 0  # no per-token LoRA work
        for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, greedy())):
            assert_matches(out, adapters["a"][1], prompt)
    with pytest.raises(ValueError, match="exactly one adapter"):
        LLM(str(path), devices=["cpu"], lora={n: str(p) for n, (p, _) in adapters.items()}, merge=True)


def test_merge_refuses_int4_base(qwen3):
    path, adapters, _ = qwen3
    with pytest.raises(ValueError, match="merge=True needs float base weights"):
        LLM(str(path), devices=["cpu"], quant="int4", lora={"a": str(adapters["a"][0])}, merge=True)


@pytest.mark.parametrize("family", ["qwen3_next", pytest.param("qwen3_5", marks=pytest.mark.slow)])
def test_hybrid_deltanet_projections(tmp_path, family):
    """Adapters on the Gated DeltaNet projections (Qwen3-Next's fused in_proj_qkvz / in_proj_ba; Qwen3.5's
    split ones under the multimodal `language_model.` prefix) and on full attention."""
    path = make_checkpoint(tmp_path / "base", family)
    targets = (["in_proj_qkvz", "in_proj_ba"] if family == "qwen3_next" else
               ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"]) + ["out_proj", "q_proj", "o_proj"]
    ref = make_adapter(path, tmp_path / "a", 3, r=8, lora_alpha=16, target_modules=targets)
    with LLM(str(path), devices=["cpu"], lora={"a": str(tmp_path / "a")}) as llm:
        outs = llm.generate(PROMPTS[:2], greedy("a"))
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out, ref, prompt)


@pytest.mark.parametrize("quant", ["int4", pytest.param("fp8", marks=pytest.mark.slow)])
def test_quantized_base_with_adapter_matches_dequantized_base_plus_adapter(tmp_path, quant):
    """quant="int4" (RTN) or "fp8" (block-wise e4m3) at load keeps the adapter in the activation dtype:
    pprt must equal transformers + peft on the dequantized weights with the same adapter."""
    import json

    from peft import PeftModel

    from ckpt_files import read_tensors, write_sharded
    from pprt.weights import fp8, int4
    from pprt.weights.merge import linear_modules

    kind, weight_of = {"int4": (int4.Int4Linear, lambda m: int4.dequantize(m.weight)),
                       "fp8": (fp8.Fp8Linear, lambda m: fp8.dequantize(m.fp8_weight))}[quant]
    path = make_checkpoint(tmp_path / "base", "qwen3", tokenizer=False, hidden_size=128, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    make_adapter(path, tmp_path / "a", 4, r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"])
    with LLM(str(path), devices=["cpu"], dtype="float32", quant=quant, lora={"a": str(tmp_path / "a")}) as llm:
        outs = llm.generate(PROMPTS[:2], [greedy("a"), greedy()])
        stage = llm.executor.worker.stage
        deq = {f"{p}.weight": weight_of(m) for p, m in linear_modules(stage).items() if isinstance(m, kind)}
        hooked = llm.executor.worker.loras._hooks
    assert deq and all(isinstance(stage.get_submodule(m), kind) for m in hooked)
    assert "model.layers.0.self_attn.qkv_proj" in hooked  # q and v adapted inside the merged, quantized qkv
    write_sharded(tmp_path / "deq", {**read_tensors(path), **deq}, json.loads((path / "config.json").read_text()))
    base = reference_model(tmp_path / "deq")
    assert_matches(outs[1], base, PROMPTS[1])
    assert_matches(outs[0], PeftModel.from_pretrained(base, tmp_path / "a").eval(), PROMPTS[0])


@pytest.mark.slow
def test_moe_attention_and_shared_expert(tmp_path):
    """qwen2_moe: adapters on attention, the dense layer's MLP and the shared expert (all tokens);
    transformers' fused routed experts are not nn.Linear, so peft leaves them alone as pprt does."""
    path = make_checkpoint(tmp_path / "base", "qwen2_moe", tokenizer=False)
    ref = make_adapter(path, tmp_path / "a", 5, r=8, lora_alpha=16,
                       target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    with LLM(str(path), devices=["cpu"], lora={"a": str(tmp_path / "a")}) as llm:
        outs = llm.generate(PROMPTS[:2], greedy("a"))
        assert any("shared_expert" in m for m in llm.executor.worker.loras._hooks)
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out, ref, prompt)


def test_cli_lora_flag_runs_the_adapter(qwen3, capsys):
    """`python -m pprt.generate --lora PATH` (and with --merge-lora) gives the library's tokens with that adapter."""
    import json

    from pprt.entrypoints import generate as cli

    path, adapters, _ = qwen3
    text, a = "hello world", str(adapters["a"][0])
    with LLM(str(path), devices=["cpu"], lora={"a": a}) as llm:
        expected = llm.generate(text, SamplingParams(max_tokens=N, temperature=0, lora="a"))[0]
        plain = llm.generate(text, SamplingParams(max_tokens=N, temperature=0))[0]
    assert expected.token_ids != plain.token_ids
    args = ["--model", str(path), "--devices", "cpu", "--prompt", text, "--json", "--temperature", "0",
            "--max-new-tokens", str(N)]
    for extra in (["--lora", a], ["--lora", a, "--merge-lora"]):
        assert cli.main(args + extra) == 0
        assert json.loads(capsys.readouterr().out)["token_ids"] == expected.token_ids
    with pytest.raises(SystemExit):
        cli.main(args + ["--merge-lora"])
    assert "--merge-lora needs --lora" in capsys.readouterr().err


def test_speculative_drafts_run_with_each_requests_adapter(qwen3):
    """n-gram drafts are verified through the adapter of their request: greedy tokens do not change."""
    path, adapters, _ = qwen3
    prompts = [p * 3 for p in PROMPTS]  # repeated text gives the proposer drafts
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, lora=name) for name in ("a", None, "b")]
    lora = {n: str(p) for n, (p, _) in adapters.items()}
    with LLM(str(path), devices=["cpu"], lora=lora) as llm:
        plain = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(str(path), devices=["cpu"], lora=lora, speculative={"method": "ngram", "num_speculative_tokens": 3}) as llm:
        drafted = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.stats().draft_tokens > 0
    assert drafted == plain


def test_prefix_cache_never_serves_one_adapters_kv_to_another(qwen3):
    """With prefix caching on, a prompt of several full blocks run under the base model, adapter a,
    adapter a again, and a reload of the name: KV is reused only within one load of one adapter."""
    path, adapters, base = qwen3
    prompt = list(range(3, 100, 2))  # 49 tokens: 3 full blocks of 16 a later request could reuse
    with LLM(str(path), devices=["cpu"], max_loras=1) as llm:
        def run(choice):
            before = llm.stats().prefix_cached_tokens
            out = llm.generate([prompt], greedy(choice))[0]
            return out, llm.stats().prefix_cached_tokens - before

        out, cached = run(None)
        assert cached == 0
        assert_matches(out, base, prompt)
        llm.load_lora("a", str(adapters["a"][0]))
        out, cached = run("a")  # the base model's blocks hold other KV
        assert cached == 0
        assert_matches(out, adapters["a"][1], prompt)
        out, cached = run("a")  # the same load of the same adapter: reused
        assert cached == 48
        assert_matches(out, adapters["a"][1], prompt)
        llm.unload_lora("a")
        llm.load_lora("a", str(adapters["b"][0]))  # another adapter under the same name
        out, cached = run("a")
        assert cached == 0
        assert_matches(out, adapters["b"][1], prompt)
        out, cached = run(None)  # the base model's own blocks are still cached
        assert cached == 48
        assert_matches(out, base, prompt)


def test_bank_stacks_the_parts_of_a_merged_layer(qwen3):
    """On the merged qkv_proj of layer 2, adapter a (q, k, v at rank 8) and b (q, v at rank 16): one stack
    with each part's rank columns (q 16, k 8, v 16) and its block of rows; the hook adds to each token the
    delta of its own adapter's parts only; emptying slots shrinks and then drops the stack and the hook."""
    from pprt.models.lora import LoraBank
    from pprt.weights.lora import read_adapter

    path, adapters, _ = qwen3
    with LLM(str(path), devices=["cpu"]) as llm:
        stage, config = llm.executor.worker.stage, llm.config
        tensors = {n: read_adapter(n, str(p), config).stage_tensors((0, 3), "cpu", torch.float32)
                   for n, (p, _) in adapters.items()}
        bank = LoraBank(stage, 3, torch.device("cpu"), torch.float32)
        bank.add(0, tensors["a"])
        bank.add(2, tensors["b"])
        site = "model.layers.2.self_attn.qkv_proj"
        H, nq, nkv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        a, b = bank.stack(site)
        assert a.shape == (3, 16 + 8 + 16, H) and b.shape == (3, nq + 2 * nkv, 40)
        assert b[2, nq:nq + nkv].abs().sum() == 0 and b[0, :nq, 16:24].abs().sum() == 0  # off-diagonal blocks

        x = torch.randn(5, H)
        slots = torch.tensor([0, 2, -1, 2, 0], dtype=torch.int32)
        layer = stage.get_submodule(site)
        base = layer(x)
        bank.bind(slots)
        got = layer(x) - base
        bank.bind(None)
        for t, s in enumerate(slots.tolist()):
            parts = tensors["a" if s == 0 else "b"] if s >= 0 else {}
            want = torch.cat([x[t] @ parts[p][0].t() @ parts[p][1].t() if p in parts else torch.zeros(n)
                              for p, n in ((f"model.layers.2.self_attn.{q}", n) for q, n in
                                           (("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)))])
            torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)
        bank.remove(2)
        assert bank.stack(site)[0].shape[1] == 8 + 8 + 8  # a's ranks only
        bank.remove(0)
        assert bank.stack(site) is None and not bank._hooks
        torch.testing.assert_close(layer(x), base)
        with pytest.raises(ValueError, match="do not fit"):
            bank.add(1, {"model.layers.2.self_attn.q_proj": (torch.zeros(4, H + 1), torch.zeros(nq, 4))})
