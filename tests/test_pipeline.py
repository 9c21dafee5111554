"""Pipelines of spawned CPU stages (gloo) against one stage, failures, and cleanup."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from unittest import mock

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt import StageFailed

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0)
PROMPTS = [[5, 17, 40, 33, 100, 7], [9], [(11 * i) % 300 + 2 for i in range(100)], [250, 3, 3, 3, 3, 3, 3]]


def single_stage(path, prompts, **kw):
    with LLM(str(path), devices=["cpu"], **kw) as llm:
        return llm.generate(prompts, GREEDY)


def assert_same(outs, expected):
    for a, b in zip(outs, expected):
        assert a.token_ids == b.token_ids
        for la, lb, t in zip(a.logprobs, b.logprobs, a.token_ids):
            assert abs(la[t] - lb[t]) < 1e-4


@pytest.mark.parametrize("family, devices, split, transport", [
    ("qwen3_moe", ["cpu", "cpu"], [1, 3], "auto"),
    ("qwen2", ["cpu", "cpu", "cpu"], [1, 1, 1], "gloo"),
    ("qwen3", ["cpu", "cpu"], None, "host"),
], ids=["moe-2stages-uneven", "qwen2-3stages", "qwen3-host-transport-auto-split"])
def test_pipeline_matches_single_stage(tmp_path, family, devices, split, transport):
    path = make_checkpoint(tmp_path, family, tie_word_embeddings=family == "qwen2")
    expected = single_stage(path, PROMPTS)
    with LLM(str(path), devices=devices, split=split, transport=transport, chunk_size=32) as llm:
        assert llm.executor.depth == len(devices)
        outs = llm.generate(PROMPTS, GREEDY)
        stats = llm.stats().stages
    assert_same(outs, expected)
    assert all(s.steps > 0 for s in stats)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def test_requests_join_running_ones_and_a_killed_stage_is_an_error(qwen3):
    expected = single_stage(qwen3, PROMPTS[:2])
    llm = LLM(str(qwen3), devices=["cpu", "cpu"], chunk_size=32)
    procs = list(llm.executor.procs)
    try:
        stream = llm.stream(PROMPTS[0], GREEDY)
        first = [next(stream), next(stream)]
        assert [s.stage for s in llm.stats().stages] == [0, 1]  # replies interleave with step results
        joined = llm.generate(PROMPTS[1], GREEDY)[0]  # runs while the stream's request is active
        # A seed no stage's generator takes is refused in the driver: the pipeline and the
        # stream's request live on (it used to kill the last stage, and every request with it).
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\)"):
            llm.generate(PROMPTS[1], SamplingParams(max_tokens=3, seed=2**64))
        changed = SamplingParams(max_tokens=3)
        changed.seed = 2**64  # set after construction: checked again when the request is made
        with pytest.raises(ValueError, match="seed"):
            llm.generate(PROMPTS[1], changed)
        rest = list(stream)
        assert joined.token_ids == expected[1].token_ids
        assert "".join(first + rest) == llm.tokenizer.decode(expected[0].token_ids)

        stream = llm.stream(PROMPTS[2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        next(stream)
        victim = llm.executor.procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(StageFailed, match=r"stage 1 .* died \(killed by signal 9, SIGKILL\)"):
            list(stream)
        assert time.monotonic() - t0 < 10
        assert llm.executor is None  # the failure closed the pipeline
    finally:
        llm.close()
    assert all(p.poll() is not None for p in procs)


def test_load_error_names_the_stage_and_leaves_no_process(tmp_path):
    path = make_checkpoint(tmp_path, "qwen3")
    import json

    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    (path / shard).unlink()
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    with mock.patch("subprocess.Popen", recording_popen):
        with pytest.raises(StageFailed, match=rf"stage 1 .*{shard}"):
            LLM(str(path), devices=["cpu", "cpu"], split=[2, 1])
    assert len(started) == 2 and all(p.poll() is not None for p in started)


DRIVER = textwrap.dedent("""
    import os, sys, time
    from pprt import LLM, SamplingParams
    if __name__ == "__main__":
        llm = LLM(sys.argv[1], devices=["cpu", "cpu"])
        print(" ".join(str(p.pid) for p in llm.executor.procs), flush=True)
        if sys.argv[2] == "close":
            sys.stdin.readline()  # the test has seen the stages alive
            llm.close()
            print("closed", flush=True)
        elif sys.argv[2] == "exit":
            sys.exit(0)  # no close(): the interpreter's exit must end the stages
        elif sys.argv[2] == "ctrl-c":
            for piece in llm.stream([1, 2, 3], SamplingParams(max_tokens=10**6, temperature=0, ignore_eos=True)):
                print("generating", flush=True)  # the test sends SIGINT to the process group
        else:
            time.sleep(600)  # killed by the test
""")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("how", ["ctrl-c", "kill", *(pytest.param(h, marks=pytest.mark.slow) for h in ("close", "exit"))])
def test_no_stage_outlives_the_driver(qwen3, tmp_path, how):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    # Its own process group, as a terminal would make: Ctrl-C signals the whole group.
    driver = subprocess.Popen([sys.executable, str(script), str(qwen3), how], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    pids = [int(p) for p in driver.stdout.readline().split()]
    assert len(pids) == 2 and all(alive(p) for p in pids)
    if how == "close":
        driver.stdin.write("close\n")
        driver.stdin.flush()
        assert driver.stdout.readline().strip() == "closed"
    elif how == "ctrl-c":
        assert driver.stdout.readline().strip() == "generating"
        os.killpg(driver.pid, signal.SIGINT)
    elif how == "kill":
        driver.kill()
    driver.wait(30)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_each_stage_holds_about_its_own_share(tmp_path):
    """On a ~400 MB model split in two, each stage process grows by its half, not the whole model."""
    path = make_checkpoint(tmp_path, "qwen2", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=2, max_shard_size="50MB", tokenizer=False)
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert total > 300e6
    with LLM(str(path), devices=["cpu", "cpu"], kv_cache_memory=2**20) as llm:
        weights, grown = llm.executor.weight_bytes, llm.executor.load_rss_bytes
    assert abs(weights[0] - weights[1]) < 0.1 * total
    for w, g in zip(weights, grown):  # peak RSS growth while loading, from the operating system
        assert 0.95 * w < g < 1.15 * w + 64e6, (w, g)
        assert g < 0.65 * total


def test_an_llm_built_in_a_thread_outlives_that_thread(qwen3):
    import threading

    box = {}
    builder = threading.Thread(target=lambda: box.setdefault("llm", LLM(str(qwen3), devices=["cpu", "cpu"])))
    builder.start()
    builder.join()
    with box["llm"] as llm:
        time.sleep(1.0)  # the stages watch their parent process, not the thread that started them
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0))[0].token_ids
