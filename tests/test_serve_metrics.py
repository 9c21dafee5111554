"""GET /metrics' mapping from LLM.stats() to Prometheus text (pprt.entrypoints.serve.metrics)."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client", reason="the serve extra is not installed")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pprt.engine.stats import StageStats, Stats  # noqa: E402
from pprt.entrypoints.serve.metrics import ServerMetrics  # noqa: E402


def _stats(**kw) -> Stats:
    stage = StageStats(0, "cpu", (0, 3), 1000, 2000, 1.5, 0.0, 7, 10, None)
    fields = dict(requests_running=3, requests_waiting=2, requests_finished=11, prompt_tokens=120, computed_tokens=150,
                  generated_tokens=45, preemptions=1, kv_blocks_total=64, kv_blocks_used=16, kv_block_size=16,
                  state_slots_total=8, state_slots_used=3, prefix_caching=True, prefix_lookup_tokens=200,
                  prefix_cached_tokens=64, prefix_cache_blocks=5, prefix_cache_evictions=0, state_snapshots_total=0,
                  state_snapshots_cached=0, load_seconds=0.5, quantize_seconds=0.0,
                  stages=(stage, StageStats(1, "cpu", (3, 6), 1000, 2000, 2.25, 0.1, 7, 10, None)),
                  draft_tokens=30, accepted_tokens=12, verify_steps=10)
    fields.update(kw)
    return Stats(**fields)


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_stats_map_to_prometheus_samples():
    metrics = ServerMetrics()
    metrics.add_model("reasoner", lambda: _stats())
    metrics.add_model("agent", lambda: _stats(requests_running=0, generated_tokens=9, kv_blocks_used=0))
    metrics.time_to_first_token.labels("reasoner").observe(0.2)
    metrics.inter_token_latency.labels("reasoner").observe(0.03)
    got = _samples(metrics.render().decode())
    m = (("model", "reasoner"),)
    expected = {
        ("pprt_model_up", m): 1.0, ("pprt_requests_running", m): 3.0, ("pprt_requests_waiting", m): 2.0,
        ("pprt_kv_blocks_used", m): 16.0, ("pprt_kv_blocks_total", m): 64.0, ("pprt_kv_cache_usage_ratio", m): 0.25,
        ("pprt_requests_finished_total", m): 11.0, ("pprt_prompt_tokens_total", m): 120.0,
        ("pprt_generation_tokens_total", m): 45.0, ("pprt_computed_tokens_total", m): 150.0,
        ("pprt_preemptions_total", m): 1.0, ("pprt_draft_tokens_total", m): 30.0,
        ("pprt_accepted_draft_tokens_total", m): 12.0, ("pprt_prefix_cache_queried_tokens_total", m): 200.0,
        ("pprt_prefix_cache_hit_tokens_total", m): 64.0, ("pprt_prefix_cache_blocks", m): 5.0, ("pprt_state_slots_used", m): 3.0, ("pprt_state_slots_total", m): 8.0,
        ("pprt_stage_busy_seconds_total", (("device", "cpu"), ("model", "reasoner"), ("stage", "1"))): 2.25,
        ("pprt_time_to_first_token_seconds_count", m): 1.0, ("pprt_time_to_first_token_seconds_sum", m): 0.2,
        ("pprt_inter_token_latency_seconds_count", m): 1.0,
        ("pprt_requests_running", (("model", "agent"),)): 0.0,
        ("pprt_generation_tokens_total", (("model", "agent"),)): 9.0,
    }
    assert {k: got.get(k) for k in expected} == expected
    assert got[("pprt_time_to_first_token_seconds_bucket", (("le", "0.25"), ("model", "reasoner")))] == 1.0
    assert got[("pprt_time_to_first_token_seconds_bucket", (("le", "0.1"), ("model", "reasoner")))] == 0.0


def test_a_failed_model_is_down_and_the_others_still_report():
    metrics = ServerMetrics()

    def broken():
        raise RuntimeError("this LLM is closed: StageFailed: stage 1 died")

    metrics.add_model("a", broken)
    metrics.add_model("b", lambda: None)
    metrics.add_model("c", lambda: _stats())
    got = _samples(metrics.render().decode())
    assert got[("pprt_model_up", (("model", "a"),))] == 0.0
    assert got[("pprt_model_up", (("model", "b"),))] == 0.0
    assert got[("pprt_model_up", (("model", "c"),))] == 1.0
    assert ("pprt_requests_running", (("model", "a"),)) not in got
    assert got[("pprt_requests_running", (("model", "c"),))] == 3.0


def test_two_servers_do_not_share_a_registry():
    a, b = ServerMetrics(), ServerMetrics()
    a.time_to_first_token.labels("m").observe(1.0)
    assert _samples(b.render().decode()).get(("pprt_time_to_first_token_seconds_count", (("model", "m"),))) is None
