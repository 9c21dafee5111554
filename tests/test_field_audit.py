"""Every config.json field of qwen2 / qwen3 / qwen3_moe is read, refused, or warned about.

The field lists are checked against the installed transformers: every field of its config
classes and every config attribute its modeling code reads must be accounted for, so a new
field there is a failing test here rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import logging
import re

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt.config import ConfigError, ModelConfig, default_context, extend_context
from pprt.entrypoints.plan_cli import main as plan_main
from pprt.field_audit import HARMLESS, INERT, READ, WARNED
from test_plan import QWEN3_30B_A3B, QWEN3_32B, QWEN3_235B_A22B, QWEN25_05B, QWEN25_72B

transformers = pytest.importorskip("transformers")

CLASSES = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig"}
MODELING = {"qwen2": "qwen2.modeling_qwen2", "qwen3": "qwen3.modeling_qwen3",
            "qwen3_moe": "qwen3_moe.modeling_qwen3_moe"}
# Qwen2.5-14B-Instruct-1M's config.json (its dual chunk attention block and window)
QWEN25_14B_1M = {
    **QWEN25_72B, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
    "num_hidden_layers": 48, "max_window_layers": 48, "max_position_embeddings": 1010000, "rope_theta": 10000000.0,
    "sliding_window": 131072, "dual_chunk_attention_config": {
        "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144},
}


def known(model_type: str) -> set[str]:
    return READ[model_type] | HARMLESS[model_type] | WARNED | INERT


@pytest.mark.parametrize("model_type", CLASSES)
def test_every_field_of_transformers_config_class_is_accounted_for(model_type):
    cls = getattr(transformers, CLASSES[model_type])
    fields = {f.name for f in dataclasses.fields(cls)} | set(cls().to_dict())
    assert fields - known(model_type) == set()


@pytest.mark.parametrize("model_type", CLASSES)
def test_every_config_attribute_transformers_model_reads_is_read_by_pprt(model_type):
    import importlib

    source = inspect.getsource(importlib.import_module(f"transformers.models.{MODELING[model_type]}"))
    read = set(re.findall(r"\bconfig\.([a-z][a-z_]*)", source))
    read |= set(re.findall(r"getattr\((?:self\.)?config, \"([a-z_]+)\"", source))
    # the rope settings arrive as rope_parameters; layer_types / sliding_window as the sliding check
    training_only = {"initializer_range", "attention_dropout", "output_router_logits", "router_aux_loss_coef",
                     "pad_token_id"}
    assert read - READ[model_type] - training_only - {"get_text_config"} == set()


@pytest.mark.parametrize("cfg", [QWEN25_72B, QWEN25_05B, QWEN3_32B, QWEN3_30B_A3B, QWEN3_235B_A22B],
                         ids=["qwen2.5-72b", "qwen2.5-0.5b", "qwen3-32b", "qwen3-30b-a3b", "qwen3-235b"])
def test_real_configs_load_without_a_warning(cfg, caplog):
    with caplog.at_level(logging.WARNING, logger="pprt"):
        ModelConfig.from_dict(dict(cfg))
    assert not [r for r in caplog.records if r.name.startswith("pprt")]


def test_an_unknown_field_is_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="pprt"):
        ModelConfig.from_dict({**QWEN3_32B, "use_mrope": False, "fancy_attention": True})
    assert "fields fancy_attention, use_mrope are not read by pprt, nor by transformers' qwen3 model" in caplog.text


# ---- sliding windows: refused exactly where transformers would slide ------------------------------


def _hf_sliding_layers(cfg: dict) -> list[int] | None:
    """Layers transformers runs with a sliding window (None: it cannot build the model)."""
    config = getattr(transformers, CLASSES[cfg["model_type"]]).from_dict(dict(cfg))
    if cfg["model_type"] == "qwen3_moe":
        return list(range(cfg["num_hidden_layers"])) if config.sliding_window is not None else []
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    return None if sliding and config.sliding_window is None else sliding


@pytest.mark.parametrize("model_type, use, window, max_window, types", itertools.product(
    CLASSES, [None, False, True], [None, 64], [None, 1, 4], [None, "full", "one-sliding"]))
def test_sliding_window_refused_exactly_where_transformers_slides(model_type, use, window, max_window, types):
    cfg = {**(QWEN3_30B_A3B if model_type == "qwen3_moe" else QWEN3_32B), "model_type": model_type,
           "num_hidden_layers": 4}
    cfg.pop("max_window_layers", None)
    cfg.pop("sliding_window", None)
    for key, value in (("use_sliding_window", use), ("sliding_window", window), ("max_window_layers", max_window)):
        if value is not None:
            cfg[key] = value
    if types is not None and model_type != "qwen3_moe":
        cfg["layer_types"] = ["full_attention"] * 4 if types == "full" else ["full_attention"] * 3 + [
            "sliding_attention"]
    sliding = _hf_sliding_layers(cfg)
    if sliding == []:
        ModelConfig.from_dict(cfg)
    else:
        with pytest.raises(ConfigError, match="sliding"):
            ModelConfig.from_dict(cfg)


# ---- sizes transformers would guess -------------------------------------------------------------


@pytest.mark.parametrize("cfg, missing, guess", [
    (QWEN25_72B, "num_key_value_heads", 32), (QWEN3_32B, "head_dim", 128),
    (QWEN3_32B, "intermediate_size", 22016), (QWEN3_30B_A3B, "num_key_value_heads", 4),
    (QWEN3_30B_A3B, "moe_intermediate_size", 768), (QWEN3_30B_A3B, "num_experts", 128),
])
def test_a_missing_size_is_refused_rather_than_guessed(cfg, missing, guess):
    config = getattr(transformers, CLASSES[cfg["model_type"]]).from_dict({k: v for k, v in cfg.items()
                                                                          if k != missing})
    assert getattr(config, missing) == guess  # what transformers would silently run with
    with pytest.raises(ConfigError, match=f"no '{missing}' \\(transformers would assume {guess}"):
        ModelConfig.from_dict({k: v for k, v in cfg.items() if k != missing})


# ---- dual chunk attention: warned, default context capped ----------------------------------------


def test_dual_chunk_attention_is_warned_and_the_default_context_capped(caplog, capsys):
    """Qwen2.5-1M: plain attention is exact within one chunk (262144 - 8192 tokens), not to 1,010,000."""
    with caplog.at_level(logging.WARNING, logger="pprt"):
        config = ModelConfig.from_dict(dict(QWEN25_14B_1M))
    assert "dual_chunk_attention_config is not implemented" in caplog.text
    assert config.trained_window == 262144 and default_context(config) == 253952
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pprt"):
        longer = extend_context(config, 500000)
    assert longer.rope.type == "default" and "dual_chunk_attention_config" in caplog.text


def test_the_plan_cli_no_longer_promises_a_million_tokens(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_14B_1M))
    plan_main(["--model", str(tmp_path), "--gpus", "400", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["context_limit"] == 253952 and out["max_context"] == 253952
    plan_main(["--model", str(tmp_path), "--gpus", "400", "--json", "--max-context", "1010000"])
    assert "dual_chunk_attention_config" in json.loads(capsys.readouterr().out)["message"]


def test_a_dual_chunk_model_serves_the_capped_context_by_default(tmp_path, caplog):
    path = make_checkpoint(tmp_path, "qwen2", tokenizer=False, max_position_embeddings=4096)
    cfg = json.loads((path / "config.json").read_text())
    cfg["dual_chunk_attention_config"] = {"chunk_size": 128, "local_size": 16, "original_max_position_embeddings": 256}
    (path / "config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="pprt"):
        with LLM(str(path), devices=["cpu"]) as llm:
            assert llm.max_context == 112
            assert len(llm.generate([5, 6, 7], SamplingParams(max_tokens=3, temperature=0))[0].token_ids) == 3
    assert "dual_chunk_attention_config" in caplog.text
