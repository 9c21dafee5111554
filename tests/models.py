"""Tiny random Qwen checkpoints written by transformers, as real ones are laid out.

`make_checkpoint(path, family, **overrides)` builds a transformers model from a
small config, saves it sharded in float32 with `save_pretrained`, rewrites
config.json into the spelling real checkpoints of that family use, and adds a
tiny tokenizer. `reference_model(path)` loads it back with transformers: the oracle.

Spellings: qwen2 / qwen3 / qwen3_moe / qwen2_moe / qwen3_next files use the OLD
one (top-level `rope_theta` + `rope_scaling`, `torch_dtype`, `num_experts`;
Qwen3-Next also a top-level `partial_rotary_factor` and `full_attention_interval`
instead of `layer_types`). Qwen3.5 releases are multimodal
(`Qwen3_5ForConditionalGeneration`, with a tiny vision tower here): text fields
in `text_config` with `layer_types`, `rope_parameters` (mrope fields and
`partial_rotary_factor` inside), `attn_output_gate`, `mamba_ssm_dtype`,
`mtp_num_hidden_layers`; weights under `model.language_model.*`, `model.visual.*`,
plus the multi-token-prediction head `mtp.*` at the top (written here: transformers
has no MTP module), which pprt reads only when MTP drafting is on. Text-only
exports (`qwen3_5_text`, `qwen3_5_moe_text`) are flat; `mtp=True` gives them an
MTP head too (`mtp_num_hidden_layers`), and qwen3_next one without a count in
config.json, as the official Qwen3-Next files have it.

The MTP head (`_add_mtp_tensors`, the layout of shared/QWEN.md "MTP head" and of
vLLM's qwen3_next_mtp / qwen3_5_mtp loaders): `mtp.fc.weight` [H, 2H],
`mtp.pre_fc_norm_embedding.weight`, `mtp.pre_fc_norm_hidden.weight`,
`mtp.norm.weight` [H] (zero-centred), and `mtp.layers.0.*`: every tensor of the
model's first full-attention layer, renamed, with new random values (gated
attention, q/k norms; MoE with the shared expert where the model is; per-expert
tensors, fused like the model's for qwen3_5_moe).

Experts: `expert_layout="fused"` rewrites per-expert tensors into the fused layout
(`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]) real
Qwen3.5-MoE files use (the default for qwen3_5_moe; transformers writes per expert).
Hybrid families' norm weights, dt_bias and the gated norm are perturbed away from
their init (0 or 1), so a wrong (1 + w) or gate shows in the outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tiny_tokenizer import build_tokenizer

VOCAB = 320
LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_conv_kernel_dim=4)
HYBRID = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, **LINEAR)  # layers: 3 linear + 1 full, twice
SPARSE = dict(moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=4,
              temporal_patch_size=1, num_position_embeddings=16)
HYBRID_FAMILIES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
MULTIMODAL = ("qwen3_5", "qwen3_5_moe")

FAMILIES = {
    # qwen2: q/k/v bias, head_dim = H / n
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2),
    # qwen3: q/k norm, head_dim (24) != H / n (16)
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=24),
    # qwen3_moe: sparse every 2nd layer, layer 3 forced dense, renormalized top-k
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=32, moe_intermediate_size=32, num_experts=8,
                      num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
    # qwen2_moe: q/k/v bias, plain norms, full rotary, routed + gated shared expert, top-k not renormalised;
    # layer 2 dense
    "qwen2_moe": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, mlp_only_layers=[2], **SPARSE),
    # qwen3_next: hybrid, every layer MoE (but layer 5 dense), norm_topk_prob
    "qwen3_next": dict(HYBRID, mlp_only_layers=[5], norm_topk_prob=True, **SPARSE),
    # qwen3_5: hybrid dense, multimodal wrapper (qwen3_5_text: the same, flat export)
    "qwen3_5": dict(HYBRID),
    "qwen3_5_text": dict(HYBRID),
    # qwen3_5_moe: hybrid, every layer MoE, top-k always renormalised
    "qwen3_5_moe": {k: v for k, v in dict(HYBRID, **SPARSE).items() if k != "intermediate_size"},
    "qwen3_5_moe_text": {k: v for k, v in dict(HYBRID, **SPARSE).items() if k != "intermediate_size"},
}


def _model_classes(family: str):
    import transformers as tf

    return {
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM),
        "qwen3_5": (tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration),
        "qwen3_5_text": (tf.Qwen3_5TextConfig, tf.Qwen3_5ForCausalLM),
        "qwen3_5_moe": (tf.Qwen3_5MoeConfig, tf.Qwen3_5MoeForConditionalGeneration),
        "qwen3_5_moe_text": (tf.Qwen3_5MoeTextConfig, tf.Qwen3_5MoeForCausalLM),
    }[family]


def make_checkpoint(path: Path, family: str, *, yarn: dict | None = None, seed: int = 0,
                    max_shard_size: str = "60KB", tokenizer: bool = True, eos_token_id: int | list | None = None,
                    expert_layout: str | None = None, tie_word_embeddings: bool = False, mtp: bool | None = None,
                    **overrides) -> Path:
    """Write a random `family` checkpoint to `path` and return it.

    yarn: e.g. {"factor": 4.0, "original_max_position_embeddings": 64}. expert_layout: None (as
    real files of the family: fused for qwen3_5_moe(_text), per expert otherwise), "fused" or "per_expert".
    mtp: write an MTP head (None: as releases of the family, i.e. for the multimodal Qwen3.5 ones;
    True: any hybrid family; False: none, and config.json declares none).
    """
    mtp = family in MULTIMODAL if mtp is None else mtp
    if mtp and family not in HYBRID_FAMILIES:
        raise ValueError(f"{family} checkpoints have no MTP head")
    config_cls, model_cls = _model_classes(family)
    kwargs = dict(FAMILIES[family], vocab_size=VOCAB, rope_theta=10000.0, max_position_embeddings=4096,
                  initializer_range=0.08, eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings)
    kwargs.update(overrides)
    theta = kwargs.pop("rope_theta")
    rope = {"rope_type": "default", "rope_theta": theta}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": theta, **yarn}
    torch.manual_seed(seed)
    if family in MULTIMODAL:  # the text model in text_config; tie_word_embeddings read at the top
        kwargs.pop("tie_word_embeddings")
        config = config_cls(text_config=dict(kwargs, rope_parameters=dict(rope, partial_rotary_factor=0.25)),
                            vision_config=VISION, tie_word_embeddings=tie_word_embeddings)
    else:
        if family in HYBRID_FAMILIES:
            rope = dict(rope, partial_rotary_factor=0.25)
        config = config_cls(**kwargs, rope_parameters=rope)
    model = model_cls(config).float().eval()
    if family in HYBRID_FAMILIES:
        _perturb(model, seed)
    path = Path(path)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    if family in MULTIMODAL:
        _to_qwen35_release(path / "config.json", mtp)
    else:
        _to_old_spelling(path / "config.json", theta, yarn, family)
    if mtp:
        _add_mtp_tensors(path, family, kwargs["hidden_size"], seed)
    if (expert_layout or ("fused" if family.startswith("qwen3_5_moe") else "per_expert")) == "fused":
        fuse_experts(path)
    if tokenizer:
        build_tokenizer(path, vocab_size=VOCAB)
    return path


def _perturb(model, seed: int) -> None:
    """Move norm weights (init 0 or 1), dt_bias (1) and the gated norm (1) off their init values."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" not in name and ("norm" in name or name.endswith("dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _to_old_spelling(config_path: Path, theta: float, yarn: dict | None, family: str = "qwen2") -> None:
    cfg = json.loads(config_path.read_text())
    params = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = theta
    # Old files say "type" (Qwen2.5 docs) rather than "rope_type".
    cfg["rope_scaling"] = {"type": "yarn", **yarn} if yarn else None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if family == "qwen3_next":  # as Qwen3-Next-80B-A3B's config.json
        cfg["partial_rotary_factor"] = params.get("partial_rotary_factor", 0.25)
        interval = 4
        assert cfg.pop("layer_types") == ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                          for i in range(cfg["num_hidden_layers"])]
        cfg["full_attention_interval"] = interval
    if family == "qwen2_moe":  # as Qwen1.5-MoE-A2.7B's config.json: no qkv_bias, no layer_types
        cfg.pop("layer_types", None)
        assert cfg.pop("qkv_bias") is True
    config_path.write_text(json.dumps(cfg, indent=2))


def _to_qwen35_release(config_path: Path, mtp: bool = True) -> None:
    """The text_config fields of a Qwen3.5 release that transformers does not write."""
    cfg = json.loads(config_path.read_text())
    text = cfg["text_config"]
    text["rope_parameters"].update(mrope_interleaved=True, mrope_section=[11, 11, 10])
    text.update(attn_output_gate=True, mamba_ssm_dtype="float32", mtp_num_hidden_layers=int(mtp),
                mtp_use_dedicated_embeddings=False, full_attention_interval=4)
    config_path.write_text(json.dumps(cfg, indent=2))


_FULL_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.3\.(.+)$")  # the first full-attention layer


def _add_mtp_tensors(path: Path, family: str, hidden: int, seed: int) -> None:
    """A random MTP head (see the module docstring) in the last shard, listed in the index; a
    text-only Qwen3.5 config.json gets its MTP layer count."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shapes = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in load_file(path / shard).items():
            m = _FULL_LAYER.match(name)
            if m:
                shapes[f"mtp.layers.0.{m[1]}"] = t.shape
    assert any(".self_attn.q_proj." in n for n in shapes), "layer 3 must be full attention"
    shapes.update({"mtp.fc.weight": (hidden, 2 * hidden), "mtp.norm.weight": (hidden,),
                   "mtp.pre_fc_norm_embedding.weight": (hidden,), "mtp.pre_fc_norm_hidden.weight": (hidden,)})
    gen = torch.Generator().manual_seed(seed + 2)
    mtp = {}
    for name, shape in sorted(shapes.items()):
        scale = 0.3 if "norm" in name else 0.08  # zero-centred norms off 0; linears as initializer_range
        mtp[name] = scale * torch.randn(shape, generator=gen)
    shard = sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(path / shard)
    tensors.update(mtp)
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(mtp, shard))
    index_path.write_text(json.dumps(index, indent=2))
    if family not in MULTIMODAL and family != "qwen3_next":  # (Qwen3-Next's config.json declares none)
        cfg = json.loads((path / "config.json").read_text())
        cfg["mtp_num_hidden_layers"] = 1
        (path / "config.json").write_text(json.dumps(cfg, indent=2))


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_experts(path: Path) -> None:
    """Rewrite per-expert tensors into `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj`
    [E, H, I] in each shard, as Qwen3.5-MoE releases store them (no `.weight` suffix)."""
    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    experts: dict[str, dict] = {}
    for name, shard in index["weight_map"].items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = shard
    shards = {shard: load_file(path / shard) for shard in set(index["weight_map"].values())}
    for prefix, parts in experts.items():
        home = parts[(0, "gate_proj")]
        got = {}
        for (e, proj), shard in parts.items():
            name = f"{prefix}.{e}.{proj}.weight"
            got[(e, proj)] = shards[shard].pop(name)
            del index["weight_map"][name]
        E = 1 + max(e for e, _ in got)
        shards[home][f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([got[(e, "gate_proj")], got[(e, "up_proj")]]) for e in range(E)])
        shards[home][f"{prefix}.down_proj"] = torch.stack([got[(e, "down_proj")] for e in range(E)])
        index["weight_map"].update({f"{prefix}.gate_up_proj": home, f"{prefix}.down_proj": home})
    for shard, tensors in shards.items():
        save_file(tensors, path / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index, indent=2))


def reference_model(path: Path):
    import transformers

    arch = json.loads((Path(path) / "config.json").read_text())["architectures"][0]
    cls = transformers.AutoModelForImageTextToText if "ConditionalGeneration" in arch else \
        transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation of `prompt` by the transformers model, and each chosen token's logprob.

    The all-ones attention mask is explicit: without one, generate() infers it from
    pad_token_id and masks every prompt token equal to it (id 0 is "!" in Qwen's vocabulary).
    """
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    tokens = out[0, len(prompt):].tolist()
    return tokens, reference_logprobs(model, prompt, tokens)


@torch.inference_mode()
def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """Logprob of each of `tokens` given prompt + the tokens before it (one forward pass)."""
    ids = torch.tensor([prompt + tokens])
    logp = torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids)).logits[0].float(), dim=-1)  # [L, V]
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


def spoiled_continuation(expected: dict, tokens: list[int], k: int) -> list[int]:
    """Drafts from an oracle: transformers' next k greedy tokens after `tokens` (expected: prompt
    tuple -> its greedy continuation) with one spoiled (which one cycles with the length), so that
    every acceptance count 0..k happens; [] past the known continuation."""
    for prompt, cont in expected.items():
        full = list(prompt) + cont
        if full[:len(tokens)] == tokens:
            drafts = full[len(tokens):len(tokens) + k]
            bad = len(tokens) % (k + 1)
            if bad < len(drafts):
                drafts[bad] = (drafts[bad] + 1) % 320
            return drafts
    return []


def assert_same_outputs(outs, expected, tol: float) -> None:
    """Completions `outs` have `expected`'s tokens, and each chosen token's logprob within `tol`."""
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    for o, e in zip(outs, expected):
        for t, lo, le in zip(o.token_ids, o.logprobs, e.logprobs):
            assert abs(lo[t] - le[t]) < tol
