"""A served model that fails (at load, or a stage dies later) answers 503 while the others serve;
a full queue answers 503 with Retry-After; the command line refuses what it cannot serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

from models import make_checkpoint  # noqa: E402
from serve_helpers import REPO, _env, children, running_server  # noqa: E402

from pprt.entrypoints.demo_model import demo_model_available, demo_model_path  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not demo_model_available():
        pytest.skip("the demo model has not been trained (tools/train_demo.py)")
    root = tmp_path_factory.mktemp("serve-failures")
    tiny = make_checkpoint(root / "tiny", "qwen3", seed=3, eos_token_id=2)
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with running_server("--model", str(demo_model_path()), "--served-model-name", "demo", "--devices", "cpu",
                        "--model", str(tiny), "--served-model-name", "tiny", "--devices", "cpu,cpu",
                        "--model", str(broken), "--served-model-name", "broken", "--max-waiting", "2",
                        "--stage-processes",
                        log=root / "server.log") as (url, proc):
        yield url, proc


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read()) if "json" in r.headers.get("content-type", "") else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_model_that_failed_to_load_answers_503_while_the_others_serve(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="broken", prompt="x", max_tokens=2)
    assert e.value.status_code == 503 and "failed to load" in str(e.value) and "llama" in str(e.value)
    assert client.completions.create(model="demo", prompt="def f(", max_tokens=3, temperature=0).choices[0].text
    status, health = _get(url + "/health")
    assert status == 503 and health["models"]["demo"] == "ok" and "failed to load" in health["models"]["broken"]
    assert {m.id for m in client.models.list().data} == {"demo", "tiny", "broken"}


def test_more_waiting_requests_than_max_waiting_get_503_with_retry_after(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="demo", prompt="x", max_tokens=2, n=3)  # 3 would wait; 2 may
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    assert "--max-waiting 2" in str(e.value)
    assert len(client.completions.create(model="demo", prompt="x", max_tokens=2, n=2).choices) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the stage processes in /proc")
def test_a_model_whose_stage_dies_answers_503_while_the_others_serve(server):
    url, proc = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert client.completions.create(model="tiny", prompt="fox", max_tokens=2, temperature=0).choices
    # with --stage-processes each model's stages are processes of their own, also the one-device demo's:
    # in load order, demo's stage, then tiny's two
    stages = sorted(children(proc.pid), key=started)
    assert len(stages) == 3, stages
    demo_stage = stages[0]
    os.kill(stages[2], signal.SIGKILL)
    deadline = time.monotonic() + 60
    codes = []
    while len(codes) < 2:  # the request that finds the dead stage, and one after it
        try:
            client.completions.create(model="tiny", prompt="fox", max_tokens=2, temperature=0)
        except openai.APIStatusError as e:
            codes.append(e.status_code)
        assert time.monotonic() < deadline, "the dead stage was never noticed"
    assert codes == [503, 503]
    assert client.completions.create(model="demo", prompt="def f(", max_tokens=3, temperature=0).choices[0].text
    status, health = _get(url + "/health")
    assert status == 503 and health["models"]["tiny"] != "ok" and health["models"]["demo"] == "ok"
    assert children(proc.pid) == [demo_stage]  # tiny's other stage was ended with it; demo's serves on


def started(pid: int) -> int:
    """A process's start time (clock ticks after boot, /proc/PID/stat field 22)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pprt.serve", "--port", "0", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


def test_no_model_loads_exits_1(tmp_path):
    r = _cli("--model", str(tmp_path / "nothing-here"))
    assert r.returncode == 1 and "no model could be loaded" in r.stderr and "nothing-here" in r.stderr


@pytest.mark.parametrize("args, text", [
    (["--model", "a", "--devices", "cpu", "--devices", "cpu"], "--devices is given twice"),
    (["--model", "a", "--model", "a"], "two models are served as 'a'"),
    (["--model", "a", "--split", "x,1"], "--split"),
    (["--model", "a", "--tool-call-parser", "yaml"], "--tool-call-parser"),
    (["--port", "70000"], "--port"),
    (["--max-waiting", "0"], "--max-waiting"),
    (["--model", "a", "--speculative-ngram", "0"], "--speculative-ngram"),
    (["--model", "a", "--speculative-mtp", "17"], "--speculative-mtp must be in 1..16"),
    (["--model", "a", "--speculative-mtp", "2", "--speculative-ngram", "2"], "two ways to draft"),
    (["--model", "a", "--devices", "cpu,,cpu"], "--devices"),
])
def test_bad_arguments_exit_2_naming_the_flag(args, text, capsys):
    from pprt.entrypoints.serve.cli import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(args)
    assert e.value.code == 2 and text in capsys.readouterr().err


def test_the_command_line_exits_2_on_a_bad_argument():
    r = _cli("--model", "a", "--devices", "cpu", "--devices", "cpu")
    assert r.returncode == 2 and "--devices is given twice" in r.stderr, r.stderr


def test_two_models_each_get_their_own_devices_and_options():
    from pprt.entrypoints.serve.cli import parse_args

    args, specs = parse_args(["--model", "A", "--devices", "cuda:0", "--served-model-name", "reasoner",
                              "--max-context", "4096", "--model", "B", "--devices", "cuda:1,cuda:2",
                              "--split", "10,12", "--tool-call-parser", "xml", "--speculative-ngram", "3",
                              "--api-key", "k", "--model", "C", "--speculative-mtp", "2"])
    assert args.host == "127.0.0.1" and args.api_key == "k"  # loopback unless told otherwise
    assert args.stage_processes is None  # decided per model
    assert parse_args(["--no-stage-processes"])[0].stage_processes is False
    assert [(s.model, s.served_name, s.devices, s.tool_call_parser, s.options) for s in specs] == [
        ("A", "reasoner", ["cuda:0"], None, {"max_context": 4096}),
        ("B", "B", ["cuda:1", "cuda:2"], "xml",
         {"split": [10, 12], "speculative": {"method": "ngram", "num_speculative_tokens": 3}}),
        ("C", "C", None, None, {"speculative": {"method": "mtp", "num_speculative_tokens": 2}})]


@pytest.mark.parametrize("count, devices, flag, expected", [
    (2, ["cuda:0"], None, True), (2, ["cpu"], None, False), (1, ["cuda:0"], None, False),
    (2, ["cuda:0", "cuda:1"], None, True), (1, ["cpu"], True, True), (2, ["cuda:1"], False, False),
])
def test_which_models_get_stage_processes(count, devices, flag, expected):
    """Several models: a GPU model's stages are processes of their own; one model, or a CPU one, stays in."""
    from pprt.entrypoints.serve.models import ModelSpec, load_models

    built = []

    def build(model, **kw):
        built.append(kw["stage_processes"])
        raise RuntimeError("not loaded in this test")

    load_models([ModelSpec(f"m{i}", devices=devices) for i in range(count)], 4, flag, build=build)
    assert built == [expected] * count
