"""Rotary settings: every spelling transformers accepts gives transformers' frequencies, what
pprt does not understand is refused, and long contexts get YaRN over the trained window.

The oracle is transformers itself: its config class reads the same dict and its rotary
module computes inv_freq and the attention scale the model uses.
"""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pprt.config import ConfigError, ModelConfig, default_context, extend_context
from pprt.models.layers import rope_inv_freq
from pprt.plan import DeviceBudget, plan
from test_plan import QWEN3_30B_A3B, QWEN3_32B, QWEN25_72B

transformers = pytest.importorskip("transformers")

BASE = dict(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def hf_rope(cfg: dict) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scale of transformers' Qwen3 rotary module for config.json `cfg`."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    config = transformers.Qwen3Config.from_dict(dict(cfg))
    rotary = Qwen3RotaryEmbedding(config)
    return rotary.inv_freq.float(), float(rotary.attention_scaling)


def ours(cfg: dict) -> tuple[torch.Tensor, float]:
    config = ModelConfig.from_dict(dict(cfg))
    return rope_inv_freq(config.rope, config.head_dim)


def assert_same_rope(cfg: dict) -> None:
    got_f, got_s = ours(cfg)
    want_f, want_s = hf_rope(cfg)
    assert torch.allclose(got_f, want_f, rtol=1e-6, atol=0), cfg
    assert got_s == pytest.approx(want_s, rel=1e-9), cfg


def test_top_level_theta_with_yarn_in_rope_parameters_is_yarn():
    """The recipe spelling: rope_theta at the top, YaRN in rope_parameters without a theta."""
    cfg = dict(BASE, rope_theta=1e6, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 1024})
    rope = ModelConfig.from_dict(cfg).rope
    assert (rope.type, rope.theta, rope.factor, rope.original_max_position) == ("yarn", 1e6, 4.0, 1024)
    assert_same_rope(cfg)


YARN_VARIANTS = [
    {"factor": 4.0, "original_max_position_embeddings": 1024},
    {"factor": 2.5},  # original: max_position_embeddings
    {"factor": None, "original_max_position_embeddings": 512},  # factor: max_position / original
    {"factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2, "truncate": False},
    {"factor": 4.0, "attention_factor": 1.25},
    {"factor": 8.0, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"factor": 8.0, "mscale": 1.0},  # mscale alone does nothing
    {"factor": 0.5, "original_max_position_embeddings": 1024},  # < 1: no attention scaling
]


@pytest.mark.parametrize("where, kind_key, theta_at", list(itertools.product(
    ["rope_scaling", "rope_parameters", "both"], ["type", "rope_type"], ["top", "inside", "both", "none"])))
def test_every_spelling_mix_gives_transformers_frequencies(where, kind_key, theta_at):
    for variant in YARN_VARIANTS + [None]:
        spec = {kind_key: "default"} if variant is None else {kind_key: "yarn", **variant}
        cfg = dict(BASE)
        if theta_at in ("top", "both"):
            cfg["rope_theta"] = 5e5
        if theta_at in ("inside", "both"):
            spec["rope_theta"] = 2e4
        if where in ("rope_scaling", "both"):
            cfg["rope_scaling"] = spec
        if where in ("rope_parameters", "both"):  # rope_scaling wins when both are set
            cfg["rope_parameters"] = spec if where == "rope_parameters" else {"rope_type": "default",
                                                                             "rope_theta": 7e3}
        assert_same_rope(cfg)


def test_a_top_level_original_max_position_embeddings_wins():
    cfg = dict(BASE, original_max_position_embeddings=512,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})
    assert ModelConfig.from_dict(cfg).rope.original_max_position == 512
    assert_same_rope(cfg)


@pytest.mark.parametrize("rope, words", [
    ({"rope_type": "linear", "factor": 2.0}, "rope type 'linear'"),
    ({"type": "dynamic", "factor": 2.0}, "rope type 'dynamic'"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "rope type 'longrope'"),
    ({"type": "mrope", "mrope_section": [2, 3, 3]}, "rope type 'mrope'"),
    ({"rope_type": "yarn", "factor": 4.0, "mystery": 1}, "'mystery' is not a setting of rope type 'yarn'"),
    ({"rope_type": "default", "factor": 4.0}, "'factor' is not a setting of rope type 'default'"),
    ({"type": "yarn", "rope_type": "default", "factor": 4.0}, "'factor' is not a setting of rope type 'default'"),
    ({"rope_type": "yarn"}, "yarn needs 'factor'"),
    ({"rope_type": "yarn", "factor": "4"}, "factor must be a positive number"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "no"}, "truncate must be true or false"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5"),
    ({"rope_type": None}, "rope type None"),
    ({"rope_type": "default", "rope_theta": None}, "rope_theta must be a positive number"),
    ({"full_attention": {"rope_type": "default"}}, "'full_attention' is not a setting"),
    ("yarn", "rope_scaling must be an object"),
])
def test_rope_settings_pprt_does_not_understand_are_refused(rope, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        ModelConfig.from_dict(dict(BASE, rope_scaling=rope))


def test_a_wrong_top_level_theta_is_named_as_itself_beside_rope_scaling():
    """A top-level rope_theta that rope_scaling does not replace is the file's field, not rope_scaling's
    (found by test_config's fuzz: a string theta beside a yarn rope_scaling)."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(dict(BASE, rope_theta="1e-6", rope_scaling=yarn))
    assert str(e.value) == "config.json: rope_theta must be a positive number, got '1e-6'"
    # one inside rope_scaling wins: the top-level one is not read (transformers' rule)
    assert ModelConfig.from_dict(dict(BASE, rope_theta="1e-6", rope_scaling=dict(yarn, rope_theta=5e5))).rope


def test_top_level_partial_rotary_factor_is_refused_unless_one():
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig.from_dict(dict(BASE, partial_rotary_factor=0.25))
    assert_same_rope(dict(BASE, partial_rotary_factor=1.0))


_numbers = st.one_of(st.none(), st.floats(0.5, 64, allow_nan=False), st.integers(1, 64))


@settings(max_examples=150, deadline=None)
@given(theta_top=st.one_of(st.none(), st.sampled_from([1e4, 5e5, 1e6])),
       theta_in=st.one_of(st.none(), st.sampled_from([2e4, 1e7])),
       place=st.sampled_from(["rope_scaling", "rope_parameters"]),
       kind_key=st.sampled_from(["type", "rope_type"]),
       kind=st.sampled_from(["default", "yarn"]),
       factor=st.one_of(st.none(), st.floats(0.25, 64, allow_nan=False)),
       original=st.one_of(st.none(), st.sampled_from([256, 1024, 4096, 32768])),
       top_original=st.one_of(st.none(), st.sampled_from([512, 2048])),
       max_position=st.one_of(st.none(), st.sampled_from([2048, 40960])),
       beta_fast=_numbers, beta_slow=_numbers, attention=st.one_of(st.none(), st.floats(0.5, 2.0)),
       mscales=st.one_of(st.none(), st.tuples(st.floats(0.1, 2), st.floats(0.1, 2))),
       truncate=st.one_of(st.none(), st.booleans()))
def test_random_spellings_match_transformers_or_are_refused(theta_top, theta_in, place, kind_key, kind, factor,
                                                            original, top_original, max_position, beta_fast,
                                                            beta_slow, attention, mscales, truncate):
    """Whatever pprt accepts computes transformers' frequencies and scale; what it refuses, transformers
    refuses too or computes from a setting pprt names as unsupported."""
    spec = {kind_key: kind}
    optional = {"rope_theta": theta_in, "original_max_position_embeddings": original, "beta_fast": beta_fast,
                "beta_slow": beta_slow, "attention_factor": attention, "truncate": truncate}
    if kind == "yarn":
        spec["factor"] = factor if factor is not None or original else 2.0  # null factor needs an original
        if mscales:
            spec["mscale"], spec["mscale_all_dim"] = mscales
        spec.update({k: v for k, v in optional.items() if v is not None})
    elif theta_in is not None:
        spec["rope_theta"] = theta_in
    cfg = {k: v for k, v in BASE.items() if k != "max_position_embeddings"}
    for key, value in (("rope_theta", theta_top), ("original_max_position_embeddings", top_original),
                       ("max_position_embeddings", max_position)):
        if value is not None:
            cfg[key] = value
    cfg[place] = spec
    try:
        got = ours(cfg)
    except ConfigError:
        event("refused")
        with pytest.raises(Exception):
            hf_rope(cfg)
        return
    event(f"accepted {kind}")
    want_f, want_s = hf_rope(cfg)
    assert torch.allclose(got[0], want_f, rtol=1e-6, atol=0)
    assert got[1] == pytest.approx(want_s, rel=1e-9)


# ---- the trained window and YaRN on demand ----------------------------------------------------


def _yarn_of(cfg: dict, factor: float, original: int) -> tuple[torch.Tensor, float]:
    return hf_rope({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": factor,
                                            "original_max_position_embeddings": original}})


@pytest.mark.parametrize("cfg, name, native, default", [
    (QWEN3_32B, "Qwen3-32B", 32768, 40960),
    (QWEN3_30B_A3B, "Qwen3-30B-A3B", 32768, 40960),
    ({**QWEN25_72B, "max_position_embeddings": 40960}, "QwQ-32B (qwen2, 40960)", 32768, 40960),
    (QWEN25_72B, "Qwen2.5-72B-Instruct", 32768, 32768),
    ({**QWEN3_30B_A3B, "max_position_embeddings": 262144, "rope_theta": 1e7}, "Qwen3-30B-A3B-2507", 262144, 262144),
    ({**QWEN3_32B, "max_position_embeddings": 262144}, "Qwen3-Coder / 2507 dense", 262144, 262144),
])
def test_yarn_past_the_window_extends_the_trained_window(cfg, name, native, default, caplog):
    """Qwen3 configs say 40960 but were trained at 32768: 131072 tokens is factor 4 over 32768 (Qwen's
    recipe: scale 1.1386), not 3.2 over 40960 (scale 1.1163, frequencies up to 41% off)."""
    config = ModelConfig.from_dict(dict(cfg))
    assert config.trained_window == native and default_context(config) == default
    assert extend_context(config, default) is config  # the window itself needs no scaling
    target = max(131072, 4 * native)
    with caplog.at_level(logging.WARNING, logger="pprt"):
        long = extend_context(config, target)
    rope = long.rope
    assert (rope.type, rope.original_max_position, rope.factor) == ("yarn", native, target / native)
    assert long.max_position_embeddings == target and default_context(long) == target
    inv_freq, scale = rope_inv_freq(rope, config.head_dim)
    want_f, want_s = _yarn_of({**cfg, "max_position_embeddings": target}, target / native, native)
    assert torch.allclose(inv_freq, want_f, rtol=1e-6, atol=0) and scale == pytest.approx(want_s, rel=1e-9)
    if native == 32768:
        assert scale == pytest.approx(0.1 * math.log(4) + 1)  # 1.1386
    assert f"original {native}" in caplog.text


def test_the_planner_follows_the_same_rule():
    budgets = [DeviceBudget("cuda:0", 400 * 2**30)]
    config = ModelConfig.from_dict(dict(QWEN3_32B))
    assert plan(config, budgets).context_limit == 40960
    note = plan(config, budgets, max_context=131072).message
    assert "enables YaRN (factor 4 over the trained window 32,768)" in note


# ---- a user's own rope scaling ----------------------------------------------------------------


def test_user_rope_scaling_replaces_the_checkpoints():
    config = ModelConfig.from_dict(dict(QWEN3_32B))
    recipe = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    user = config.with_rope_scaling(recipe)
    assert (user.rope.type, user.rope.factor, user.rope.original_max_position, user.rope.theta) == \
        ("yarn", 4.0, 32768, 1e6)
    assert default_context(user) == 131072 and extend_context(user, 131072) is user
    assert torch.allclose(rope_inv_freq(user.rope, 128)[0], _yarn_of(QWEN3_32B, 4.0, 32768)[0], rtol=1e-6)
    off = ModelConfig.from_dict({**QWEN3_32B, "rope_scaling": recipe}).with_rope_scaling({"type": "default"})
    assert off.rope.type == "default" and default_context(off) == 40960
    assert config.with_rope_scaling(None) is config


@pytest.mark.parametrize("spec, words", [
    ({"rope_type": "yarn", "factor": 4.0}, "needs 'original_max_position_embeddings'"),
    ({"rope_type": "ntk", "factor": 4.0}, "rope type 'ntk'"),
    ([4.0], "must be a JSON object"),
])
def test_user_rope_scaling_errors_name_the_problem(spec, words):
    with pytest.raises(ConfigError, match=words):
        ModelConfig.from_dict(dict(QWEN3_32B)).with_rope_scaling(spec)
