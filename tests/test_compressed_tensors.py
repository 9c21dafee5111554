"""compressed-tensors checkpoints written by that library's own compressors load and match.

tests/ct_writer.py runs the `compressed-tensors` library's compressors (pack-quantized
int4, float-quantized fp8) on tiny float checkpoints' weights and its `decompress` on
the result. 1: pprt's import of the stored tensors equals the library's dequantized
weight exactly. 2: whole checkpoints (config_groups with "Linear" and "re:" targets,
an ignore list, an activation scheme pprt ignores) give transformers' greedy tokens on
the library-dequantized weights, logprobs within LOGPROB_ATOL.
"""

import json
import logging

import pytest
import torch
from torch import nn

pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

from ckpt_files import is_quantized_linear, read_tensors, write_sharded  # noqa: E402
from ct_writer import ct_compress, ct_config  # noqa: E402
from models import make_checkpoint, reference_greedy, reference_model  # noqa: E402
from pprt import LLM, SamplingParams  # noqa: E402
from pprt.plan import DeviceBudget, plan  # noqa: E402
from pprt.quantization import Kind  # noqa: E402
from pprt.weights.compressed import fp8_from_float_quantized, int4_from_packed  # noqa: E402
from pprt.weights.fp8 import Fp8Linear  # noqa: E402
from pprt.weights.fp8 import dequantize as fp8_dequantize  # noqa: E402
from pprt.weights.int4 import Int4Linear  # noqa: E402
from pprt.weights.int4 import dequantize as int4_dequantize  # noqa: E402
from pprt.weights.merge import linear_modules

LOGPROB_ATOL = 1e-3  # same weights on both sides; measured ~1e-5
PACK, FLOAT = "pack-quantized", "float-quantized"
W4 = dict(num_bits=4, type="int")
W8 = dict(num_bits=8, type="float", symmetric=True)
SCHEMES = {
    "int4-g128-sym": (QuantizationArgs(**W4, symmetric=True, strategy="group", group_size=128), PACK),
    "int4-g32-asym": (QuantizationArgs(**W4, symmetric=False, strategy="group", group_size=32), PACK),
    "int4-channel": (QuantizationArgs(**W4, symmetric=True, strategy="channel"), PACK),
    "fp8-channel": (QuantizationArgs(**W8, strategy="channel"), FLOAT),
    "fp8-tensor": (QuantizationArgs(**W8, strategy="tensor"), FLOAT),
    "fp8-block": (QuantizationArgs(**W8, strategy="block", block_structure=[128, 128]), FLOAT),
}
IGNORE = ["lm_head", "re:.*mlp.gate$"]  # llm-compressor's usual list for Qwen MoE
DYNAMIC_FP8_ACTS = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)


def import_and_dequantize(stored: dict, name: str, n: int, k: int) -> torch.Tensor:
    args, fmt = SCHEMES[name]
    if fmt == PACK:
        group = args.group_size if getattr(args.strategy, "value", args.strategy) == "group" else 0
        w = int4_from_packed(stored["weight_packed"], stored["weight_scale"], stored.get("weight_zero_point"),
                             k, group, torch.float32)
        return int4_dequantize(w)
    block = {"channel": (1, k), "tensor": (n, k), "block": (128, 128)}[getattr(args.strategy, "value", args.strategy)]
    return fp8_dequantize(fp8_from_float_quantized(stored["weight"], stored["weight_scale"], block))


@pytest.mark.parametrize("name", list(SCHEMES))
def test_import_equals_the_library_decompression(name):
    args, fmt = SCHEMES[name]
    n, k = (136, 256) if fmt == PACK else (136, 200)  # fp8: partial blocks
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.05
    stored, deq = ct_compress(weight, args, fmt)
    ours = import_and_dequantize(stored, name, n, k)
    assert torch.equal(ours, deq), name
    assert 0 < (deq - weight).norm() / weight.norm() < 0.15  # really quantized


# family, {group: (targets, scheme)}, model dims (fp8 cases: sizes off the 128 grid)
INT4_DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
ODD_DIMS = dict(hidden_size=160, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2)
MOE = dict(num_key_value_heads=1, head_dim=32, moe_intermediate_size=128)
CASES = {
    "qwen2-int4-g128-sym-bias": ("qwen2", {"g0": (["Linear"], "int4-g128-sym")}, INT4_DIMS),
    "qwen3_moe-int4-g32-asym-experts": ("qwen3_moe", {"g0": (["Linear"], "int4-g32-asym")}, dict(INT4_DIMS, **MOE)),
    "qwen3-int4-channel": ("qwen3", {"g0": (["Linear"], "int4-channel")}, dict(INT4_DIMS, head_dim=32)),
    "qwen3-fp8-channel-w8a8": ("qwen3", {"g0": (["Linear"], "fp8-channel")}, dict(ODD_DIMS, head_dim=48)),
    "qwen3_moe-fp8-block": ("qwen3_moe", {"g0": (["Linear"], "fp8-block")}, dict(ODD_DIMS, **MOE, )),
    # attention int4 (regex target, more specific than "Linear"), the rest fp8 per tensor
    "qwen3-mixed-regex": ("qwen3", {"attn": (["re:.*self_attn\\..*_proj$"], "int4-g32-asym"),
                                    "rest": (["Linear"], "fp8-tensor")}, dict(INT4_DIMS, head_dim=32)),
}


def scheme_of(name: str, groups: dict) -> str:
    """Which group's scheme a module gets (the regex target wins over "Linear")."""
    for targets, scheme in groups.values():
        if any(t.startswith("re:") and __import__("re").match(t[3:], name) for t in targets):
            return scheme
    return groups.get("rest", groups.get("g0"))[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_checkpoint_matches_transformers(case, tmp_path, caplog):
    family, groups, dims = CASES[case]
    src = make_checkpoint(tmp_path / "float", family, tokenizer=False, max_shard_size="300KB", **dims)
    config = json.loads((src / "config.json").read_text())
    stored_all, deq, kinds = {}, {}, {}
    for name, t in read_tensors(src).items():
        prefix = name.removesuffix(".weight")
        if not is_quantized_linear(name, t):
            stored_all[name] = deq[name] = t
            continue
        scheme = scheme_of(prefix, groups)
        stored, deq[name] = ct_compress(t, *SCHEMES[scheme])
        stored_all.update({f"{prefix}.{k}": v for k, v in stored.items()})
        kinds[prefix] = Int4Linear if SCHEMES[scheme][1] == PACK else Fp8Linear
    acts = DYNAMIC_FP8_ACTS if "w8a8" in case else None
    qcfg = ct_config({g: (targets, *SCHEMES[s]) for g, (targets, s) in groups.items()}, IGNORE, acts)
    write_sharded(tmp_path / "ct", stored_all, dict(config, quantization_config=qcfg))
    write_sharded(tmp_path / "deq", deq, config)
    prompts = [[5, 17, 40, 33, 100, 7], list(range(30, 100, 3))]
    with caplog.at_level(logging.INFO, logger="pprt"), \
            LLM(str(tmp_path / "ct"), devices=["cpu"], dtype="float32", kv_cache_memory=1 << 20) as llm:
        stage = llm.executor.worker.stage
        for prefix, m in linear_modules(stage).items():  # merged and stacked ones too
            assert type(m) is kinds.get(prefix, nn.Linear), prefix
        loaded = llm.executor.weight_bytes[0]
        planned = plan(llm.config, [DeviceBudget("cpu", 1 << 30)], dtype_bytes=4, max_context=256)
        outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0))
    assert planned.stages[0].weight_bytes == loaded
    if acts is not None:  # the activation scheme is ignored, and said so
        assert any("input_activations" in r.getMessage() and "weight-only" in r.getMessage() for r in caplog.records)
    ref = reference_model(tmp_path / "deq")
    worst = 0.0
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = reference_greedy(ref, prompt, 10)
        assert out.token_ids == tokens, case
        got = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
        worst = max(worst, (got - torch.tensor(logprobs)).abs().max().item())
    print(f"{case}: max |dlogprob| vs transformers on the library's dequantized weights = {worst:.2e}")
    assert worst <= LOGPROB_ATOL


def test_config_groups_targets_and_ignore_decide_per_module():
    from pprt.quantization import QuantConfig

    qcfg = QuantConfig.from_dict(ct_config({"attn": (["re:.*self_attn\\..*"], *SCHEMES["int4-g32-asym"]),
                                            "mlp": (["Linear"], *SCHEMES["fp8-block"])}, IGNORE))
    assert qcfg.module("model.layers.0.self_attn.q_proj").kind is Kind.INT4
    assert qcfg.module("model.layers.0.self_attn.q_proj").group_size == 32
    assert qcfg.module("model.layers.0.mlp.experts.3.down_proj").kind is Kind.FP8
    assert qcfg.module("model.layers.0.mlp.gate").kind is Kind.FLOAT and qcfg.module("lm_head").kind is Kind.FLOAT
    # Qwen3.5 names: rules written for model.language_model.* apply to pprt's model.layers.*
    q35 = QuantConfig.from_dict(ct_config({"g": (["re:model\\.language_model\\.layers\\.\\d+\\.mlp\\..*"],
                                                 *SCHEMES["int4-channel"])}, ["re:.*linear_attn.in_proj_[ab]$"]))
    assert q35.module("model.layers.2.mlp.up_proj").kind is Kind.INT4
    assert q35.module("model.layers.2.self_attn.q_proj").kind is Kind.FLOAT  # no group targets it


@pytest.mark.parametrize("weights, message", [
    (dict(num_bits=8, type="int", symmetric=True, strategy="channel"), "int8, channel"),
    (dict(num_bits=4, type="int", symmetric=True, strategy="tensor"), "int4 strategy 'tensor'"),
])
def test_unsupported_scheme_fails_naming_the_group(weights, message):
    from pprt.config import QuantConfig
    from pprt.errors import ConfigError

    d = {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    with pytest.raises(ConfigError, match=rf"config_groups\.group_0.*{message}"):
        QuantConfig.from_dict(d)
