"""pprt.plan for the hybrid families: KV for full-attention layers only, recurrent state per sequence
per stage (QWEN.md section 7's numbers), state slots bounding max_num_seqs, stages with no KV or
no state, the state's read/write traffic in the cut's bandwidth model, and the CLI."""

from __future__ import annotations

import json

import pytest

from hybrid_configs import (HYBRID_CONFIGS, QWEN3_NEXT_80B_A3B, QWEN15_MOE_A27B, QWEN35_27B, QWEN35_35B_A3B,
                            QWEN35_122B_A10B, QWEN35_397B_A17B)
from pprt.config import ModelConfig
from pprt.entrypoints.plan_cli import main
from pprt.plan import DeviceBudget, GiB, MiB, kv_bytes_per_token, plan, state_bytes_per_sequence

GB = 10**9


def devices(*gib: float) -> list[DeviceBudget]:
    return [DeviceBudget(f"cuda:{i}", int(x * GiB)) for i, x in enumerate(gib)]


def config(raw: dict) -> ModelConfig:
    return ModelConfig.from_dict(raw)


@pytest.mark.parametrize("raw, kv_kib, ssm_mib", [
    (QWEN35_27B, 64, 144), (QWEN35_35B_A3B, 20, 60), (QWEN35_397B_A17B, 30, 180),
], ids=["27b", "35b-a3b", "397b"])
def test_kv_and_state_sizes_match_qwen_table(raw, kv_kib, ssm_mib):
    c = config(raw)
    L = c.num_layers
    assert kv_bytes_per_token(c, (0, L), "bf16") == kv_kib * 1024  # full-attention layers only
    lin = c.linear
    ssm = c.layers_of(0, L)[1] * lin.num_value_heads * lin.key_head_dim * lin.value_head_dim * 4
    conv = c.layers_of(0, L)[1] * lin.conv_dim * (lin.conv_kernel - 1) * 2
    assert ssm == ssm_mib * MiB
    assert state_bytes_per_sequence(c, (0, L), 2) == ssm + conv
    if raw is QWEN35_27B:
        assert abs(conv / MiB - 2.8) < 0.1


@pytest.mark.parametrize("name", list(HYBRID_CONFIGS))
def test_every_real_hybrid_model_gets_an_answer_on_two_96gb_cards(name):
    c = config(HYBRID_CONFIGS[name])
    for quant in ("none", "int4"):
        result = plan(c, devices(96, 96), quant=quant, max_context=32768)
        assert result.message and len(result.stages) == 2
        if result.fits:
            assert result.num_slots >= 1 and result.num_blocks >= 2048  # one 32k sequence
            for st in result.stages:
                kv = result.num_blocks * result.block_size * st.kv_bytes_per_token
                assert st.weight_bytes + st.reserve_bytes + kv + result.num_slots * st.state_bytes_per_seq \
                    <= st.budget_bytes
    weights = sum(s.weight_bytes for s in plan(c, devices(999, 999), max_context=32768).stages)
    print(f"{name}: bf16 weights {weights / GiB:.1f} GiB")


def test_verdicts_on_two_96gb_cards():
    assert plan(config(QWEN35_27B), devices(96, 96)).fits  # bf16, the full 262k context
    assert plan(config(QWEN35_35B_A3B), devices(96, 96)).fits
    assert plan(config(QWEN3_NEXT_80B_A3B), devices(96, 96)).fits  # ~149 GiB of bf16 weights
    big = config(QWEN35_122B_A10B)
    assert not plan(big, devices(96, 96)).fits  # ~227 GiB of bf16 weights
    assert plan(big, devices(96, 96), quant="int4").fits
    assert not plan(config(QWEN35_397B_A17B), devices(96, 96), quant="int4").fits


def test_max_num_seqs_is_bounded_by_state_and_said():
    c = config(QWEN35_27B)
    roomy = plan(c, devices(96, 96), max_context=32768, max_num_seqs=64)
    assert roomy.fits and roomy.num_slots == 64 and "bounded" not in roomy.message
    tight = plan(c, devices(34, 34), max_context=32768, max_num_seqs=256)
    assert tight.fits and 1 <= tight.num_slots < 256
    assert f"at most {tight.num_slots} sequence(s) run at once" in tight.message
    assert "recurrent state" in tight.message and "MiB per sequence" in tight.message
    assert tight.num_sequences <= tight.num_slots
    per_seq = max(s.state_bytes_per_seq for s in tight.stages)
    assert abs(per_seq - state_bytes_per_sequence(c, tight.stages[0].layers, 2)) <= per_seq  # the fuller stage
    # one more slot than planned would not fit on the fullest stage beside one sequence's KV
    for st in tight.stages:
        kv_one = 32768 * st.kv_bytes_per_token
        free = st.budget_bytes - st.weight_bytes - st.reserve_bytes - kv_one
        assert tight.num_slots * st.state_bytes_per_seq <= free
    assert any(st.budget_bytes - st.weight_bytes - st.reserve_bytes - 32768 * st.kv_bytes_per_token
               < (tight.num_slots + 1) * st.state_bytes_per_seq for st in tight.stages)
    starved = plan(c, devices(30, 30), max_context=32768)
    assert not starved.fits and "recurrent state" in starved.message


def test_stages_without_kv_or_without_state():
    c = config(QWEN35_27B)  # layers 0-2 DeltaNet, 3 full, ...
    result = plan(c, devices(96, 96, 96), split=[3, 1, 60], max_context=32768)
    no_kv, no_state, both = result.stages
    assert result.fits
    assert no_kv.kv_bytes_per_token == 0 and no_kv.kv_tokens == 0 and no_kv.state_bytes_per_seq > 0
    assert no_state.state_bytes_per_seq == 0 and no_state.kv_bytes_per_token > 0
    assert both.kv_bytes_per_token > 0 and both.state_bytes_per_seq > 0
    assert result.num_blocks > 0 and result.num_slots > 0
    assert result.kv_tokens == min(no_state.kv_tokens, both.kv_tokens) // 16 * 16  # the KV stages decide


def test_state_traffic_is_in_the_bandwidth_model():
    c = config(QWEN35_27B)
    split = plan(c, devices(96, 96), split=[32, 32], max_context=4096).stages
    for st in split:
        weights_and_kv = st.read_bytes - 2 * st.state_bytes_per_seq
        assert weights_and_kv > 0 and st.read_bytes > weights_and_kv


def test_cli_prints_state_column_and_slots(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN35_27B))
    args = ["--model", str(tmp_path), "--gpus", "34,34", "--max-context", "32768"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "state MiB/seq" in out and "recurrent-state slots on every stage" in out and "bounded" in out
    assert main(args + ["--max-num-seqs", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_slots"] == 2 and all(s["state_bytes_per_seq"] > 0 for s in data["stages"])


def test_qwen35_122b_fp8_release_on_two_96gb_cards():
    """The official block-wise FP8 layout (routers, shared-expert gates and the tiny b/a projections
    left in bf16): ~115 GiB of weights cut in two, the full 262k context fits."""
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
           "modules_to_not_convert": ["lm_head", "mlp.gate", "shared_expert_gate", "linear_attn.in_proj_b",
                                      "linear_attn.in_proj_a", "model.visual", "mtp"]}
    c = config(dict(QWEN35_122B_A10B, quantization_config=fp8))
    budgets = [DeviceBudget(f"cuda:{i}", 96 * GB) for i in range(2)]
    result = plan(c, budgets)
    assert result.fits and result.quant == "fp8" and result.split == [24, 24]
    assert 110 * GiB < sum(s.weight_bytes for s in result.stages) < 120 * GiB
    assert result.num_slots == 256 and result.num_sequences >= 2
    assert not plan(c, budgets[:1]).fits


OFFICIAL_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                "modules_to_not_convert": ["lm_head", "model.visual", "mtp", "mlp.gate", "shared_expert_gate",
                                           "linear_attn.in_proj_a", "linear_attn.in_proj_b"]}


def fp8_bytes(n: int, k: int) -> int:
    """An FP8 linear [n, k]: one byte per weight, a float32 scale per 128 x 128 block (partial ones count)."""
    return n * k + -(-n // 128) * -(-k // 128) * 4


def qwen35_moe_fp8_weight_bytes(raw: dict) -> int:
    """Every decoder layer, the embedding, the head and the final norm of an official Qwen3.5-MoE FP8
    release, counted here from the geometry (shared/QWEN.md sections 7 and 8), not by pprt.plan."""
    t, bf16 = raw["text_config"], 2
    H, V = t["hidden_size"], t["vocab_size"]
    n, m, h = t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]
    hk, hv, dk, dv = (t[f"linear_{x}"] for x in ("num_key_heads", "num_value_heads", "key_head_dim",
                                                  "value_head_dim"))
    E, I, S = t["num_experts"], t["moe_intermediate_size"], t["shared_expert_intermediate_size"]
    total = (2 * V * H + H) * bf16  # embedding, untied head, final norm
    for kind in t["layer_types"]:
        if kind == "linear_attention":
            qkv = 2 * hk * dk + hv * dv
            total += fp8_bytes(qkv, H) + fp8_bytes(hv * dv, H) + fp8_bytes(H, hv * dv)  # qkv, z, out
            total += (2 * hv * H + qkv * t["linear_conv_kernel_dim"] + 2 * hv + dv) * bf16  # a, b, conv, A, dt, norm
        else:  # gated q [2nh, H], k, v, o; q/k norms
            total += fp8_bytes(2 * n * h, H) + 2 * fp8_bytes(m * h, H) + fp8_bytes(H, n * h) + 2 * h * bf16
        total += E * (2 * fp8_bytes(I, H) + fp8_bytes(H, I))  # routed experts
        total += 2 * fp8_bytes(S, H) + fp8_bytes(H, S)  # shared expert
        total += (E * H + H + 2 * H) * bf16  # router, shared-expert gate, two norms
    return total


@pytest.mark.parametrize("raw", [QWEN35_35B_A3B, QWEN35_122B_A10B], ids=["35b-a3b-fp8", "122b-a10b-fp8"])
def test_planner_counts_official_fp8_moe_releases_from_config_alone(raw, tmp_path, capsys):
    """`python -m pprt.plan --model <config.json of Qwen3.5-*-A*B-FP8>`: the stages' weights are the FP8
    experts with their block scales and every bf16 module, to the byte. Per-expert files (Qwen's
    releases) and fused ones (`gate_up_proj` + `gate_up_proj_scale_inv` over the joined 2I rows) hold
    the same bytes, because I (512, 1024) is a multiple of the block: ceil(2I/128) = 2 ceil(I/128)."""
    t = raw["text_config"]
    assert fp8_bytes(2 * t["moe_intermediate_size"], t["hidden_size"]) == \
        2 * fp8_bytes(t["moe_intermediate_size"], t["hidden_size"])
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, quantization_config=OFFICIAL_FP8)))
    assert main(["--model", str(tmp_path), "--gpus", "96,96", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quant"] == "fp8"
    weights = sum(st["weight_bytes"] for st in result["stages"])
    assert weights == qwen35_moe_fp8_weight_bytes(raw)
    bf16 = sum(st.weight_bytes for st in plan(config(raw), devices(999, 999)).stages)
    print(f"{t['num_experts']} experts x {t['moe_intermediate_size']}: fp8 {weights / GiB:.1f} GiB, "
          f"bf16 {bf16 / GiB:.1f} GiB")
    assert 0.5 < weights / bf16 < 0.53  # FP8 with scales, the embedding and head in bf16


def test_state_snapshots_are_counted_after_the_running_slots_and_before_the_kv_pool():
    """Prefix caching's state snapshots (one sequence's state each, on every stage) come out of the KV
    pool, never out of the running slots or the max_context sequence the plan guarantees."""
    c = config(QWEN35_27B)
    base = plan(c, devices(96, 96), max_context=32768, max_num_seqs=16)
    snap = plan(c, devices(96, 96), max_context=32768, max_num_seqs=16, state_snapshots=40)
    assert base.num_snapshots == 0 and snap.num_snapshots == 40 and snap.num_slots == base.num_slots == 16
    # paid for by KV blocks: every stage's capacity drops by 40 states' worth of its blocks
    drops = [40 * st.state_bytes_per_seq // (st.kv_bytes_per_token * snap.block_size) for st in snap.stages]
    assert base.num_blocks - snap.num_blocks >= min(drops) - 1 > 0
    for st in snap.stages:
        kv = snap.num_blocks * snap.block_size * st.kv_bytes_per_token
        assert st.weight_bytes + st.reserve_bytes + kv + 56 * st.state_bytes_per_seq <= st.budget_bytes
    assert "40 for prefix-cache state snapshots" in snap.message and snap.to_json()["num_snapshots"] == 40
    # short of memory: as many snapshots as fit beside one max_context sequence's KV, the plan still fits
    tight = plan(c, devices(48, 48), quant="int4", max_context=32768, max_num_seqs=4, state_snapshots=10_000)
    assert tight.fits and 0 < tight.num_snapshots < 10_000 and tight.num_blocks >= 32768 // tight.block_size
    for st in tight.stages:  # the KV pool keeps at least half of what the running slots leave
        kv = tight.num_blocks * tight.block_size * st.kv_bytes_per_token
        if st.kv_bytes_per_token:
            assert kv >= tight.num_snapshots * st.state_bytes_per_seq - tight.block_size * st.kv_bytes_per_token
    with pytest.raises(ValueError, match="state_snapshots"):
        plan(c, devices(96, 96), state_snapshots=-1)
    plain = plan(ModelConfig.from_dict(QWEN15_MOE_A27B), devices(96, 96), state_snapshots=40)
    assert plain.num_snapshots == 0  # no recurrent state: nothing to snapshot


def test_draft_snapshots_share_the_snapshot_budget_and_leave_the_kv_pool_and_prefix_cache():
    """Speculation on a hybrid wants a snapshot slot per running sequence (its drafts' rollback
    point). They come from the snapshot share of memory, never from the running slots or the KV
    the plan holds beside prefix snapshots; with the prefix cache on, the drafts take at most half
    of that share, so prefix caching keeps snapshots."""
    c = config(QWEN35_27B)
    budget = [DeviceBudget("cuda:0", 140 * GiB)]
    for prefix in (256, 0):
        base = plan(c, budget, max_context=32768, max_num_seqs=256, state_snapshots=prefix, cuda_graphs=True)
        spec = plan(c, budget, max_context=32768, max_num_seqs=256, state_snapshots=prefix, cuda_graphs=True,
                    draft_snapshots=True)
        drafts = spec.num_slots - base.num_slots
        assert base.num_slots == 256 and 0 < drafts <= 256
        if prefix:  # the same state memory, split between drafts and the prefix cache
            assert spec.num_blocks == base.num_blocks and spec.num_sequences == base.num_sequences
            assert spec.num_snapshots >= drafts > 0
            assert spec.num_snapshots + drafts == base.num_snapshots
        else:  # the share prefix snapshots would have taken: the KV pool keeps at least half
            assert spec.num_blocks >= base.num_blocks // 2 - 1
    small = plan(c, budget, max_context=32768, max_num_seqs=4, state_snapshots=4, draft_snapshots=True)
    assert small.num_slots == 4 + 4 and small.num_snapshots == 4  # plenty of memory: each gets what it wants
