"""Per-module quantization: GPTQ `dynamic` rules, `modules_to_not_convert`, file and config together.

A GPTQ file whose `dynamic` rules leave self_attn unquantized (as the official Qwen3.5
GPTQ files do) and give down_proj its own group size is written by the test-side packer;
pprt loads attention in float, down_proj with its group, and matches transformers on the
dequantized weights. Rules match with or without Qwen3.5's `language_model.` prefix; a
rule asking for other bits is refused naming the module; a module stored in float loads as
float whatever the global method says; a quantized tensor the config does not expect is
refused naming it. The planner counts each module as loaded.
"""

import json
import logging
import zlib

import pytest
import torch
from torch import nn

from ckpt_files import is_quantized_linear, read_tensors, write_sharded
from int4_packers import awq_quantize, gptq_quantize
from models import make_checkpoint, reference_greedy, reference_model
from pprt import LLM, SamplingParams
from pprt.errors import CheckpointError, ConfigError
from pprt.plan import DeviceBudget, plan
from pprt.quantization import Kind, QuantConfig
from pprt.weights.int4 import Int4Linear
from pprt.weights.merge import linear_modules

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
GPTQ = dict(quant_method="gptq", bits=4, group_size=128, sym=True, desc_act=False)
PROMPT = [5, 17, 40, 33, 100, 7]


@pytest.fixture(scope="module")
def float_qwen2(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("f"), "qwen2", tokenizer=False, max_shard_size="200KB", **DIMS)


def write_quantized(src, out, qcfg: dict, group_of, kind: str = "gptq") -> dict[str, str]:
    """Quantize the linears `group_of(prefix)` gives a group for (None: keep float, fp16); also
    write the dequantized float checkpoint at out/deq. Returns prefix -> 'int4' / 'float'."""
    config = json.loads((src / "config.json").read_text())
    stored, deq, kinds = {}, {}, {}
    for name, t in read_tensors(src).items():
        prefix = name.removesuffix(".weight")
        group = group_of(prefix) if is_quantized_linear(name, t) else None
        if group is None:
            stored[name] = t.half()
            deq[name] = t.half().float()
            if is_quantized_linear(name, t):
                kinds[prefix] = "float"
            continue
        if kind == "gptq":
            q, w = gptq_quantize(t, group, qcfg.get("sym", True), seed=zlib.crc32(prefix.encode()))
            q.pop("g_idx")
        else:
            q, w = awq_quantize(t, group)
        stored.update({f"{prefix}.{k}": v for k, v in q.items()})
        deq[name], kinds[prefix] = w, f"int4-g{group}"
    write_sharded(out / "q", stored, dict(config, torch_dtype="float16", quantization_config=qcfg))
    write_sharded(out / "deq", deq, config)
    return kinds


def load_and_compare(path, deq_path, kinds: dict[str, str], planned_exact: bool = True) -> None:
    with LLM(str(path), devices=["cpu"], dtype="float32", kv_cache_memory=1 << 20) as llm:
        stage = llm.executor.worker.stage
        linears = linear_modules(stage)  # q/k/v and gate/up joined: under their own names
        for prefix, want in kinds.items():
            m = linears[prefix]
            got = "float" if isinstance(m, nn.Linear) else f"int4-g{m.group_size}"
            assert isinstance(m, (nn.Linear, Int4Linear)) and got == want, (prefix, got, want)
        loaded = llm.executor.weight_bytes[0]
        planned = plan(llm.config, [DeviceBudget("cpu", 1 << 30)], dtype_bytes=4, max_context=256)
        out = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0))[0]
    if planned_exact:  # the planner counts the rules as the loader applies them
        assert planned.stages[0].weight_bytes == loaded
    tokens, logprobs = reference_greedy(reference_model(deq_path), PROMPT, 10)
    assert out.token_ids == tokens
    got = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
    assert torch.allclose(got, torch.tensor(logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn_rule", [r"-:.*self_attn.*", r"-:model\.language_model\.layers\.\d+\.self_attn\..*"],
                         ids=["plain", "language_model-prefix"])
def test_gptq_dynamic_rules_leave_attention_float_and_change_group(attn_rule, float_qwen2, tmp_path):
    qcfg = dict(GPTQ, dynamic={attn_rule: {}, r"+:.*down_proj": {"group_size": 64}})
    kinds = write_quantized(float_qwen2, tmp_path, qcfg,
                            lambda p: None if ".self_attn." in p else 64 if p.endswith("down_proj") else 128)
    assert {v for k, v in kinds.items() if ".self_attn." in k} == {"float"}
    load_and_compare(tmp_path / "q", tmp_path / "deq", kinds)


def test_awq_modules_to_not_convert_and_float_tensors_load_float(float_qwen2, tmp_path, caplog):
    """layer 1's MLP is listed (suffix match, as transformers matches); layer 2's up_proj is not listed
    but stored in float: both load as float. (config.json alone cannot tell the planner about the
    second: it counts that one module as Int4.)"""
    qcfg = dict(quant_method="awq", bits=4, group_size=64, version="gemm", zero_point=True,
                modules_to_not_convert=["layers.1.mlp"])
    kinds = write_quantized(float_qwen2, tmp_path, qcfg,
                            lambda p: None if ".1.mlp." in p or p == "model.layers.2.mlp.up_proj" else 64, kind="awq")
    with caplog.at_level(logging.INFO, logger="pprt"):
        load_and_compare(tmp_path / "q", tmp_path / "deq", kinds, planned_exact=False)
    assert any("1 linear layer(s) that" in r.getMessage() for r in caplog.records)  # not the listed ones
    assert any("stored in float and load in float" in r.getMessage() and "layers.2.mlp.up_proj" in r.getMessage()
               for r in caplog.records)


def test_dynamic_rule_with_other_bits_is_refused_naming_the_module(float_qwen2, tmp_path):
    qcfg = dict(GPTQ, dynamic={r"+:.*\.1\.mlp\.down_proj": {"bits": 8}})
    write_quantized(float_qwen2, tmp_path, qcfg, lambda p: 128)
    with pytest.raises(ConfigError, match=r"quantizes model\.layers\.1\.mlp\.down_proj with bits = 8"):
        LLM(str(tmp_path / "q"), devices=["cpu"])


def test_quantized_tensor_of_an_excluded_module_is_refused_naming_it(float_qwen2, tmp_path):
    qcfg = dict(GPTQ, dynamic={r"-:.*self_attn.*": {}})
    write_quantized(float_qwen2, tmp_path, qcfg, lambda p: 128)  # attention quantized anyway
    with pytest.raises(CheckpointError, match=r"self_attn\.q_proj\.qweight found but quantization_config \(gptq\) "
                                              r"leaves model\.layers\.0\.self_attn\.q_proj unquantized"):
        LLM(str(tmp_path / "q"), devices=["cpu"])


def test_rules_first_match_wins_and_names_are_matched_like_transformers():
    q = QuantConfig.from_dict(dict(GPTQ, dynamic={r"+:.*\.0\..*": {"group_size": 32, "sym": False},
                                                  r"-:.*mlp.*": {}}))
    assert q.module("model.layers.0.mlp.up_proj").group_size == 32  # the first rule wins
    assert not q.module("model.layers.0.mlp.up_proj").sym
    assert q.module("model.layers.1.mlp.up_proj").kind is Kind.FLOAT
    assert q.module("model.layers.1.self_attn.q_proj").group_size == 128
    fp8 = QuantConfig.from_dict({"quant_method": "fp8", "weight_block_size": [128, 128],
                                 "modules_to_not_convert": ["lm_head", "model.layers.1", "mlp.gate"]})
    assert fp8.module("model.layers.1.mlp.up_proj").kind is Kind.FLOAT  # a module boundary prefix
    assert fp8.module("model.layers.11.mlp.up_proj").kind is Kind.FP8  # not layer 1
    assert fp8.module("model.layers.3.mlp.gate").kind is Kind.FLOAT  # a suffix
    assert fp8.module("model.layers.3.mlp.gate_proj").kind is Kind.FP8
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        QuantConfig.from_dict(dict(GPTQ, dynamic={"-:(": {}}))
    with pytest.raises(ConfigError, match="fmt 'e5m2'"):
        QuantConfig.from_dict({"quant_method": "fp8", "fmt": "e5m2"})
