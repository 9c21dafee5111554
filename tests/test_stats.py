"""LLM.stats(): one typed snapshot the CLI, the server's metrics and tests read."""

from __future__ import annotations

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams, Stats


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("stats") / "m", "qwen3", tokenizer=False)


@pytest.mark.parametrize("devices", [["cpu"], ["cpu", "cpu"]], ids=["1stage", "2stages"])
def test_stats_count_requests_tokens_blocks_and_stages(model, devices):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with LLM(str(model), devices=devices, max_context=64, block_size=4) as llm:
        before = llm.stats()
        assert isinstance(before, Stats)
        assert before.requests_finished == before.generated_tokens == before.kv_blocks_used == 0
        outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        s = llm.stats()
    generated = sum(len(o.token_ids) for o in outs)
    assert s.requests_finished == 2 and s.requests_running == s.requests_waiting == 0
    assert s.prompt_tokens == 8
    assert s.generated_tokens == generated == 12
    # every prompt token and every generated token but the last of each request was computed once
    assert s.computed_tokens == 8 + generated - 2
    assert s.kv_blocks_used == 0 and s.kv_blocks_total > 0 and s.kv_block_size == 4
    assert [st.stage for st in s.stages] == list(range(len(devices)))
    assert s.stages[0].layers[0] == 0 and s.stages[-1].layers[1] == 3
    assert all(st.weight_bytes > 0 and st.kv_cache_bytes > 0 and st.busy_seconds > 0 for st in s.stages)
    assert all(st.device == "cpu" and st.peak_device_bytes is None for st in s.stages)


def test_stats_after_close_is_a_clear_error(model):
    llm = LLM(str(model), devices=["cpu"], max_context=64)
    llm.close()
    with pytest.raises(RuntimeError, match="closed"):
        llm.stats()
