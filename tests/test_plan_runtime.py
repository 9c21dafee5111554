"""The runtime takes the planner's cut and KV pool, and refuses before loading when it cannot fit."""

import subprocess

import pytest

from models import make_checkpoint
from pprt import LLM
from pprt.weights.checkpoint import ModelSource, load_config
from pprt.plan import DeviceBudget, plan


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", num_hidden_layers=4, tokenizer=False)


@pytest.fixture
def no_stage_started(monkeypatch):
    """Fails any attempt to start a process (a stage program) during the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_loaded_bytes_equal_the_plan(model):
    config = load_config(ModelSource(model))
    budget = 64 * 2**20
    expected = plan(config, [DeviceBudget("cpu", budget)] * 2, dtype_bytes=4, max_context=1024, overhead_bytes=0)
    with LLM(str(model), devices=["cpu", "cpu"], memory_budget=budget, max_context=1024) as llm:
        assert llm.executor.num_blocks == expected.num_blocks
        weights = llm.executor.weight_bytes
        kv = llm.executor.kv_bytes
    assert [list(s.layers) for s in expected.stages] == [[0, 2], [2, 4]]
    for stage, w, k in zip(expected.stages, weights, kv):
        assert abs(w - stage.weight_bytes) <= 0.05 * stage.weight_bytes
        planned_kv = expected.num_blocks * expected.block_size * stage.kv_bytes_per_token
        assert abs(k - planned_kv) <= 0.05 * planned_kv


def test_refuses_before_loading_when_it_does_not_fit(model, no_stage_started):
    with pytest.raises(MemoryError, match=r"does not fit.*nothing was loaded(.|\n)*cpu"):
        LLM(str(model), devices=["cpu", "cpu"], memory_budget=20_000)


def test_explicit_split_is_checked_against_memory(model):
    config = load_config(ModelSource(model))

    def need(split):  # bytes each stage needs for weights, workspace and one max_context sequence
        p = plan(config, [DeviceBudget("cpu", 10**9)] * 2, dtype_bytes=4, max_context=256, overhead_bytes=0,
                 split=split)
        return [s.weight_bytes + s.reserve_bytes + 256 * s.kv_bytes_per_token for s in p.stages]

    budget = need([2, 2])  # per device: enough for an even cut
    assert need([3, 1])[0] > budget[0]  # not for three layers on the first
    with pytest.raises(MemoryError, match="split"):
        LLM(str(model), devices=["cpu", "cpu"], split=[3, 1], memory_budget=budget, max_context=256)
    with LLM(str(model), devices=["cpu", "cpu"], split=[2, 2], memory_budget=budget, max_context=256) as llm:
        assert llm.generate([[1, 2, 3]])[0].token_ids


def test_kv_dtype_reaches_the_plan_and_bad_sizes_fail_before_loading(model, no_stage_started):
    import torch

    from pprt.distributed.executor import plan_stages

    config = load_config(ModelSource(model))
    per_token = {kv: plan_stages(config, ["cpu"], split=None, dtype=torch.bfloat16, quant=None, kv_dtype=kv,
                                 block_size=16, max_context=256, chunk_size=64,
                                 memory_budget=10**9).stages[0].kv_bytes_per_token
                 for kv in (torch.float32, torch.bfloat16, torch.float8_e4m3fn)}
    assert per_token[torch.float32] == 2 * per_token[torch.bfloat16] > per_token[torch.float8_e4m3fn]
    with pytest.raises(ValueError, match="kv_cache_memory = 1000 bytes"):
        LLM(str(model), devices=["cpu", "cpu"], kv_cache_memory=1000)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(model), devices=["cpu", "cpu"], max_num_seqs=0)


def test_stages_on_one_device_share_its_memory(model):
    import torch

    from pprt.distributed.executor import plan_stages

    config = load_config(ModelSource(model))
    kw = dict(split=None, dtype=torch.float32, quant=None, kv_dtype=torch.float32, block_size=16, max_context=256,
              chunk_size=64, memory_budget=None)
    one = plan_stages(config, ["cpu"], **kw).stages[0].budget_bytes
    two = [s.budget_bytes for s in plan_stages(config, ["cpu", "cpu"], **kw).stages]
    assert all(abs(b - one / 2) < 0.05 * one for b in two)  # MemAvailable moves a little between calls
