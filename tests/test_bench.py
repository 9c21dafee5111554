"""The benchmark harness and bench/generate.py at tiny sizes on CPU (so they do not rot).

Timings on a shared CPU mean nothing; what is checked is that the harness
rotates inputs, measures its ceilings, writes and reads well-formed JSON rows,
that the random checkpoint holds exactly what the roofline counts, and that an
end-to-end run of both engines, 1 and 2 stages, model dtype and Int4, writes
one complete, self-consistent row per measurement.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from bench import generate as gen
from bench import harness

ENV_KEYS = {"device", "torch", "triton", "commit", "date"}
ROOT = Path(__file__).resolve().parent.parent


def test_time_fn_rotates_through_inputs():
    inputs = [(torch.zeros(3),), (torch.zeros(5),), (torch.zeros(7),)]
    seen = []
    t = harness.time_fn(lambda x: seen.append(x.numel()), "cpu", warmup=2, repeats=4, inputs=inputs)
    assert seen == [3, 5, 7, 3, 5, 7]  # warm-up and timed calls continue one rotation
    assert t >= 0
    with pytest.raises(ValueError, match="inputs"):
        harness.time_fn(lambda x: x, "cpu", inputs=[])
    with pytest.raises(ValueError, match="repeats"):
        harness.wall_time(lambda: None, repeats=0)


def test_rotating_inputs_exceed_the_target_bytes():
    make = lambda: (torch.empty(1000, dtype=torch.uint8), 7)  # noqa: E731  non-tensors count nothing
    assert len(harness.rotating_inputs(make, "cpu", min_bytes=3500)) == 4
    assert len(harness.rotating_inputs(make, "cpu", min_bytes=0)) == 2  # always at least two
    assert len(harness.rotating_inputs(make, "cpu", min_bytes=10**9, max_copies=5)) == 5
    default = harness.rotating_inputs(lambda: (torch.empty(1 << 22, dtype=torch.uint8),), "cpu")
    assert len(default) * (1 << 22) >= 2 * harness.CPU_CACHE_BYTES


def test_results_append_and_read_latest_run(tmp_path):
    first, second = dict(device="d", date="2026-01-01T00:00:00+00:00"), dict(device="d", date="2026-01-02T00:00:00+00:00")
    harness.append_results("x", [dict(a=1), dict(a=2)], first, tmp_path)
    path = harness.append_results("x", [dict(a=3)], second, tmp_path)
    assert [r["a"] for r in harness.read_results(path, latest=False)] == [1, 2, 3]
    latest = harness.read_results(path)
    assert latest == [dict(second, a=3)]


def test_ceilings_tiny_writes_rows(tmp_path, capsys):
    rows = harness.main(["--tiny", "--results-dir", str(tmp_path)])
    written = [json.loads(line) for line in (tmp_path / "ceilings.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in written] == ["copy", "matmul"] == [r["kind"] for r in rows]
    assert all(ENV_KEYS <= r.keys() for r in written)
    assert written[0]["GBps"] > 0 and written[1]["TFLOPs"] > 0
    assert "matmul" in capsys.readouterr().out


def test_plot_bandwidth_or_a_clear_error(tmp_path):
    rows = [dict(M=m, GBps=100.0 * m, shape=s) for m in (1, 3, 16) for s in ("a", "b")]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install matplotlib"):
            harness.plot_bandwidth(rows, tmp_path / "p.png", "M", group_by=["shape"], ceiling_GBps=900.0)
        return
    path = harness.plot_bandwidth(rows, tmp_path / "p.png", "M", group_by=["shape"], ceiling_GBps=900.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no row"):
        harness.plot_bandwidth(rows, tmp_path / "q.png", "context")


def test_random_checkpoint_holds_what_the_roofline_counts(tmp_path):
    path = gen.write_random_checkpoint(gen.TINY, tmp_path / "m", torch.float32, shard_bytes=300_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1  # written shard by shard
    sizes, norms = {}, []
    for shard in shards:
        with safe_open(str(path / shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        sizes.update({k: t.nbytes for k, t in tensors.items()})
        norms += [t for k, t in tensors.items() if k.endswith("norm.weight")]
    assert set(sizes) == set(index)
    assert "lm_head.weight" in sizes and "model.layers.2.mlp.down_proj.weight" in sizes
    assert len(norms) == 2 * 3 + 1 and all(torch.all(t == 1) for t in norms)  # RMSNorm weights are ones
    config = gen.ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    # A decode step reads every tensor but the embedding (a row lookup), plus the KV of the batch.
    weights = sum(v for k, v in sizes.items() if k != "model.embed_tokens.weight")
    assert gen.decode_bytes(config, "fp32", 4, batch=1, context=0) == weights
    kv_per_token = 2 * 3 * 2 * 32 * 4  # K and V, layers, kv heads, head_dim, fp32
    grow = gen.decode_bytes(config, "fp32", 4, 3, 10.5) - gen.decode_bytes(config, "fp32", 4, 1, 10.5)
    assert grow == pytest.approx(2 * 10.5 * kv_per_token)
    head = 509 * 128 * 4  # stays fp32 under Int4
    assert gen.decode_bytes(config, "int4", 4, 1, 0) < 0.3 * (weights - head) + head


def test_generate_tiny_end_to_end(tmp_path):
    rows = gen.main(["--tiny", "--results-dir", str(tmp_path)])
    written = [json.loads(line) for line in (tmp_path / "generate.jsonl").read_text().splitlines()]
    assert len(written) == len(rows)
    assert all(ENV_KEYS | {"engine", "weights", "stages", "kind", "copy_GBps", "model"} <= r.keys() for r in written)

    def of(engine, weights, stages):
        return [r for r in written if (r["engine"], r["weights"], r["stages"]) == (engine, weights, stages)]

    for engine, weights, stages in [("pprt", "fp32", 1), ("pprt", "fp32", 2), ("pprt", "int4", 1),
                                    ("pprt", "int4", 2), ("transformers", "fp32", 1)]:
        setup = of(engine, weights, stages)
        assert [r["kind"] for r in setup] == ["load", "prefill", "prefill", "decode", "decode"], setup
        load, p1, p2, d1, d3 = setup
        assert load["load_s"] > 0 and load["peak_mem_gb"] and all(v > 0 for v in load["peak_mem_gb"].values())
        if stages == 2:  # each stage process reports its own peak RSS
            assert {"stage0 rss", "stage1 rss"} <= load["peak_mem_gb"].keys()
        assert (p1["prompt_len"], p2["prompt_len"]) == (24, 70)
        for p in (p1, p2):
            assert p["ttft_s"] > 0 and p["tok_s"] == pytest.approx(p["prompt_len"] / p["ttft_s"])
        assert (d1["batch"], d3["batch"]) == (1, 3)
        for d in (d1, d3):
            assert d["tok_s"] > 0 and d["frac_roofline"] == pytest.approx(d["tok_s"] / d["roofline_tok_s"])
            assert d["roofline_tok_s"] == pytest.approx(d["batch"] * d["copy_GBps"] * 1e9 / d["bytes_per_step"])
        if engine == "pprt" and weights == "fp32":  # the comparison column
            hf = {r["kind"] + str(r.get("prompt_len") or r.get("batch")): r["tok_s"]
                  for r in of("transformers", "fp32", 1) if r.get("tok_s")}
            for r in (p1, p2, d1, d3):
                key = r["kind"] + str(r.get("prompt_len") or r.get("batch"))
                assert r["hf_tok_s"] == hf[key] and r["vs_hf"] == pytest.approx(r["tok_s"] / hf[key])
        if stages == 2:
            assert len(d1["stage_busy"]) == 2 and all(0 < b <= 1.5 for b in d1["stage_busy"])
    # Int4 reads fewer bytes per step than fp32; transformers has no Int4 route on CPU.
    assert of("pprt", "int4", 1)[3]["bytes_per_step"] < 0.5 * of("pprt", "fp32", 1)[3]["bytes_per_step"]
    (hf_int4,) = of("transformers", "int4", 1)
    assert hf_int4["kind"] == "error" and "bitsandbytes" in hf_int4["error"]


@pytest.mark.parametrize("config", ["tiny", "tiny-qwen3.5"], ids=["attention", "hybrid"])
def test_prefix_cache_tiny_end_to_end(tmp_path, config):
    from bench import prefix_cache

    rows = prefix_cache.main(["--tiny", "--config", config, "--stages", "1", "--results-dir", str(tmp_path)])
    written = [json.loads(line) for line in (tmp_path / "prefix_cache.jsonl").read_text().splitlines()]
    assert len(written) == len(rows) == 2 and all(ENV_KEYS | {"prefix", "model"} <= r.keys() for r in written)
    assert all(config in r["model"] for r in written)
    off, on = written
    assert (off["caching"], on["caching"]) == (False, True)
    # turn 2: 256 + 8 + 8 reply + 8 tokens; the first turn's KV covers all but its last reply token
    assert off["turn2_tokens"] == on["turn2_tokens"] == 280
    assert off["computed_tokens"] == 280 and off["cached_tokens"] == 0
    # whole 16-token blocks of 271 (a hybrid resumes from the snapshot taken as turn 1 ended)
    assert on["cached_tokens"] == 256 and on["computed_tokens"] == 24
    assert on["token_ratio"] == pytest.approx(280 / 24) and on["speedup"] == pytest.approx(off["ttft_s"] / on["ttft_s"])


def test_gpu_suite_parses():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_suite.sh")], check=True)


def test_gpu_suite_fits_five_minutes_and_covers_this_rounds_kernels():
    """A 15-minute lease must hold the machine's start, the suite and a rerun: under 300 s by default,
    every part time-boxed, and the fused MoE, W8A16 and DeltaNet kernels among them."""
    import re

    text = (ROOT / "bench" / "gpu_suite.sh").read_text()
    budget = int(re.search(r"SUITE_BUDGET_S:-\$\(\((\d+) \* SCALE\)\)", text)[1])
    assert budget < 300
    parts = re.findall(r"^\s*part (\S+) (\d+) ", text, re.M)
    assert {"moe-bench", "fp8-bench", "delta-bench", "gpu-tests", "generate"} <= {name for name, _ in parts}
    for module in ("bench.fused_moe", "bench.fp8_matmul", "bench.gated_delta"):
        assert f"-m {module}" in text
    assert "--graphs on,off" in text  # decode with and without CUDA graphs


def test_host_step_bench_tiny(tmp_path):
    """bench.host_step --tiny: step inputs, schedule and sampler rows; the sampler reads the device once."""
    from bench import host_step

    rows = host_step.main(["--tiny", "--results-dir", str(tmp_path)])
    assert {r["part"] for r in rows} == {"tables", "schedule", "sampler"}
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["syncs"] == 1 for r in rows if r["part"] == "sampler")
    assert len(harness.read_results(tmp_path / "host_step.jsonl")) == len(rows)


def test_fused_moe_bench_counts_launches_and_syncs(tmp_path):
    """bench.fused_moe --tiny: every path counted; the Triton path launches the same few kernels at any
    token count and never syncs; the reference reads its counts on the host; GPU columns not measured on CPU."""
    from bench import fused_moe

    rows = fused_moe.main(["--tiny", "--results-dir", str(tmp_path)])
    assert {r["path"] for r in rows} >= {"ref", "triton", "grouped_mm"}
    triton = [r for r in rows if r["path"] == "triton"]
    assert {r["tokens"] for r in triton} == set(fused_moe.TINY_TOKENS)
    assert all(r["syncs"] == 0 for r in rows if r["path"] != "ref")
    assert len({r["launches"] for r in triton}) == 1 and triton[0]["launches"] <= 8
    assert all(r["syncs"] > 0 and r["launches"] > triton[0]["launches"] for r in rows if r["path"] == "ref")
    if not torch.cuda.is_available():
        assert all(r["ms"] == fused_moe.NOT_MEASURED for r in rows)
    saved = harness.read_results(tmp_path / "fused_moe.jsonl")
    assert len(saved) == len(rows) and ENV_KEYS <= set(saved[0])


def test_generate_tiny_hybrid_row(tmp_path):
    """The Qwen3.5-27B-shaped row at tiny size: pprt on 1 and 2 stages (a cut inside a 3-linear +
    1-full group) and transformers, with the recurrent state in the decode roofline."""
    cfg = dict(gen.TINY_QWEN35)
    config = gen.ModelConfig.from_dict(cfg)
    assert config.hybrid and config.linear.num_value_heads == 3 * config.linear.num_key_heads
    big = gen.ModelConfig.from_dict(gen.QWEN35_27B)
    assert [big.is_linear(i) for i in range(8)] == [config.is_linear(i) for i in range(8)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared CPU: more threads only spin
    try:
        rows = gen.main(["--tiny", "--config", "tiny-qwen3.5", "--weights", "fp32", "--results-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    written = [json.loads(line) for line in (tmp_path / "generate.jsonl").read_text().splitlines()]
    assert len(written) == len(rows) and not [r for r in written if r["kind"] in ("error", "skipped")]
    for engine, stages in [("pprt", 1), ("pprt", 2), ("transformers", 1)]:
        setup = [r for r in written if (r["engine"], r["stages"]) == (engine, stages)]
        assert [r["kind"] for r in setup] == ["load", "prefill", "prefill", "decode", "decode"], setup
        assert all(r["tok_s"] > 0 for r in setup[1:])
    d1, d3 = [r for r in written if r["engine"] == "pprt" and r["stages"] == 1 and r["kind"] == "decode"]
    state = 2 * gen.state_bytes_per_sequence(config, (0, 8), 4)  # read and written per step
    kv = 2 * 2 * 2 * 64 * 4  # full-attention layers (2 of 8), K and V, kv heads, head_dim, fp32
    assert state > 0
    assert d3["bytes_per_step"] - d1["bytes_per_step"] == pytest.approx(2 * (d1["decode_prompt"] + 8.5) * kv + 2 * state)
    assert "qwen3.5" in written[0]["model"]


def test_speculative_bench_on_an_mtp_checkpoint(tmp_path):
    """bench.speculative on a tiny Qwen3.5 checkpoint with an MTP head: every method's greedy tokens
    equal the baseline's, the MTP head drafts (it proposes every step; prompt lookup on a random
    model's output may find nothing), and the rows land in the results."""
    from bench import speculative
    from models import make_checkpoint

    path = make_checkpoint(tmp_path / "m", "qwen3_5_text", mtp=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared CPU
    try:
        rows = speculative.main(["--model", str(path), "--devices", "cpu", "--methods", "mtp:2,ngram:2",
                                 "--max-tokens", "12", "--repeats", "1", "--results-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [r["method"] for r in rows] == ["off", "mtp:2", "ngram:2"]  # the baseline comes first
    assert all(r["same_tokens"] for r in rows)
    assert rows[0]["draft_tokens"] == 0 and rows[1]["draft_tokens"] > 0
    assert [r["ceiling"] for r in rows] == [1.0, 3.0, 3.0] and rows[0]["speedup"] == 1.0
    written = [json.loads(line) for line in (tmp_path / "speculative.jsonl").read_text().splitlines()]
    assert [r["method"] for r in written] == ["off", "mtp:2", "ngram:2"]
    with pytest.raises(ValueError, match="mtp:K"):
        speculative.parse_method("mtp")
