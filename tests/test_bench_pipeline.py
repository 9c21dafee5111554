"""bench/pipeline.py --tiny: runs end to end and writes well-formed JSON rows."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ lives beside tests/

from bench import pipeline  # noqa: E402


def test_tiny_run_writes_wellformed_rows(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:  # in this process: one torch import fewer than a subprocess
        pipeline.main(["--tiny", "--results-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    path = tmp_path / "pipeline.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:  # every row carries the environment and the machine's load
        for key in ("device", "torch", "commit", "date", "setup", "kind"):
            assert key in row, (key, row)
        assert row["setup"] == "tiny"

    phases = [r for r in rows if r["kind"] == "phase"]
    assert {(r["phase"], r["stages"]) for r in phases} == {
        (p, s) for p in ("prefill", "decode", "small1", "control") for s in (1, 2)}
    for r in phases:
        assert r["wall_s"] > 0 and r["steps"] >= 1 and r["tokens"] >= 1, r
        assert math.isclose(r["tok_s"], r["tokens"] / r["wall_s"], rel_tol=1e-9), r
        assert r["loadavg"] >= 0
        assert r["spread"] >= 1.0
        for k in range(r["stages"]):  # fractions of the phase's wall time, timed inside the stage
            assert 0.0 < r[f"busy_{k}"] <= 1.05, r
            assert 0.0 <= r[f"wait_{k}"] <= 1.05, r
        assert r["drv_cpu_ms"] >= 0 and r["submit_ms"] >= 0, r

    by = {(r["phase"], r["stages"]): r for r in phases}
    # 2-stage rows carry the figures against their 1-stage twin, consistent with the raw throughputs.
    for p in ("prefill", "decode"):
        two, one = by[(p, 2)], by[(p, 1)]
        assert math.isclose(two["efficiency"], two["tok_s"] / (2 * one["tok_s"]), rel_tol=1e-9)
        assert math.isclose(two["pipe_eff"], two["efficiency"] / two["expected"], rel_tol=1e-9)
        assert math.isclose(two["expected"], two["two_cores"] * two["rows_eff"], rel_tol=1e-9)
        assert isinstance(two["met"], bool) and "busy>=0.9" in two["goal"]
        assert two["in_flight"] == 2 and "overhead_ms" not in two
        assert math.isclose(two["fill_bound"], two["steps"] / (two["steps"] + 1), rel_tol=1e-9)
    assert "eff>=0.8" in by[("prefill", 2)]["goal"]
    small = by[("small1", 2)]
    assert math.isclose(small["ratio"], small["tok_s"] / by[("small1", 1)]["tok_s"], rel_tol=1e-9)
    assert small["in_flight"] == 1 and "xfer_ms" in small and "overhead_ms" in small
    assert small["met"] == (small["ratio"] >= 0.9)

    conf = [r for r in rows if r["kind"] == "confounder"]
    assert {4, 8, 16}.issubset({r["rows"] for r in conf})  # tiny decode on 2 / 1 stages; prefill chunk
    for r in conf:
        assert r["gflops_1core"] > 0 and r["two_cores"] > 0 and r["gloo_us"] > 0, r
    control = by[("control", 2)]
    assert control["in_flight"] == 1 and control["overhead_ms"] > 0  # control and transport cost something
    assert math.isclose(control["cpu_eff"], by[("control", 1)]["cpu_ms_tok"] / control["cpu_ms_tok"], rel_tol=1e-9)
    assert "efficiency" in out and "gflops_1core" in out  # the printed tables
