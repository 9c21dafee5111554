"""GET /metrics: each served model's `LLM.stats()` and the server's latency histograms, as Prometheus text.

`ServerMetrics` owns one `prometheus_client` registry (no global one, so
several servers in one process do not mix). At every scrape a collector
reads each model's `Stats` (pprt.engine.stats) and maps it:

    pprt_requests_running / _waiting            gauge    requests_running / requests_waiting
    pprt_kv_blocks_used / _total                gauge    kv_blocks_used / kv_blocks_total
    pprt_kv_cache_usage_ratio                   gauge    kv_blocks_used / kv_blocks_total
    pprt_state_slots_used / _total              gauge    state_slots_used / state_slots_total (hybrid models)
    pprt_prefix_cache_blocks                    gauge    prefix_cache_blocks
    pprt_requests_finished_total                counter  requests_finished
    pprt_prompt_tokens_total                    counter  prompt_tokens
    pprt_generation_tokens_total                counter  generated_tokens
    pprt_computed_tokens_total                  counter  computed_tokens
    pprt_preemptions_total                      counter  preemptions
    pprt_draft_tokens_total / _accepted_...     counter  draft_tokens / accepted_tokens (speculative decoding)
    pprt_prefix_cache_queried_tokens_total      counter  prefix_lookup_tokens
    pprt_prefix_cache_hit_tokens_total          counter  prefix_cached_tokens
    pprt_stage_busy_seconds_total{stage}        counter  stages[i].busy_seconds
    pprt_model_up                               gauge    1 while the model serves, 0 once it failed

all labelled `model` (the served name). The server observes two histograms
itself, per request: pprt_time_to_first_token_seconds (request received to
first token) and pprt_inter_token_latency_seconds (between two outputs,
divided by the tokens the later one carries).

Knows nothing about HTTP or the engine loop: `stats` callables are given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ...engine.stats import Stats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

StatsSource = Callable[[], Stats | None]  # None: the model is down


class ServerMetrics:
    """The registry of one server (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._sources: dict[str, StatsSource] = {}
        self.time_to_first_token = Histogram(
            "pprt_time_to_first_token_seconds", "Seconds from a request's arrival to its first generated token",
            ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram(
            "pprt_inter_token_latency_seconds", "Seconds between two generated tokens of a request",
            ["model"], buckets=ITL_BUCKETS, registry=self.registry)
        self.registry.register(_StatsCollector(self._sources))

    def add_model(self, name: str, stats: StatsSource) -> None:
        """Scrape `stats()` (a blocking call; None when the model is down) for model `name`."""
        self._sources[name] = stats

    def render(self) -> bytes:
        """The text exposition (blocking: it calls every model's stats)."""
        return generate_latest(self.registry)


_GAUGES = (
    ("pprt_requests_running", "Requests holding KV blocks", lambda s: s.requests_running),
    ("pprt_requests_waiting", "Requests queued or preempted", lambda s: s.requests_waiting),
    ("pprt_kv_blocks_used", "KV cache blocks in use", lambda s: s.kv_blocks_used),
    ("pprt_kv_blocks_total", "KV cache blocks in the pool", lambda s: s.kv_blocks_total),
    ("pprt_kv_cache_usage_ratio", "Fraction of the KV cache blocks in use",
     lambda s: s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0),
    ("pprt_state_slots_used", "Recurrent-state slots in use (hybrid models)", lambda s: s.state_slots_used),
    ("pprt_state_slots_total", "Recurrent-state slots per stage (hybrid models; 0 otherwise)",
     lambda s: s.state_slots_total),
    ("pprt_prefix_cache_blocks", "KV blocks holding a cached prefix block (in use or evictable)",
     lambda s: s.prefix_cache_blocks),
)
_COUNTERS = (
    ("pprt_requests_finished", "Requests ended (stop, length or cancelled)", lambda s: s.requests_finished),
    ("pprt_prompt_tokens", "Prompt tokens received", lambda s: s.prompt_tokens),
    ("pprt_generation_tokens", "Tokens generated", lambda s: s.generated_tokens),
    ("pprt_computed_tokens", "Tokens run through the stages (prefill, decode, recomputation)",
     lambda s: s.computed_tokens),
    ("pprt_preemptions", "Sequences preempted for want of KV blocks", lambda s: s.preemptions),
    ("pprt_draft_tokens", "Speculative draft tokens sent to be verified", lambda s: s.draft_tokens),
    ("pprt_accepted_draft_tokens", "Speculative draft tokens accepted", lambda s: s.accepted_tokens),
    ("pprt_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
     lambda s: s.prefix_lookup_tokens),
    ("pprt_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache instead of computed",
     lambda s: s.prefix_cached_tokens),
)


class _StatsCollector(Collector):
    def __init__(self, sources: dict[str, StatsSource]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        snapshots = {}
        for name, source in self._sources.items():
            try:
                snapshots[name] = source()
            except Exception:  # a model that fails while scraped is down, not a failed scrape
                snapshots[name] = None
        up = GaugeMetricFamily("pprt_model_up", "1 while the model serves requests, 0 once it failed", labels=["model"])
        for name, s in snapshots.items():
            up.add_metric([name], 0.0 if s is None else 1.0)
        yield up
        live = {name: s for name, s in snapshots.items() if s is not None}
        for metric, doc, read in _GAUGES:
            family = GaugeMetricFamily(metric, doc, labels=["model"])
            for name, s in live.items():
                family.add_metric([name], float(read(s)))
            yield family
        for metric, doc, read in _COUNTERS:
            family = CounterMetricFamily(metric, doc, labels=["model"])
            for name, s in live.items():
                family.add_metric([name], float(read(s)))
            yield family
        busy = CounterMetricFamily("pprt_stage_busy_seconds", "Seconds each pipeline stage spent computing steps",
                                   labels=["model", "stage", "device"])
        for name, s in live.items():
            for st in s.stages:
                busy.add_metric([name, str(st.stage), st.device], st.busy_seconds)
        yield busy
