"""python -m pprt.generate: the CLI against the library it wraps.

Subprocess runs check what a user sees (stdout, stderr, exit code) for a
prompt, a prompt file, stdin, --json, --chat over stdin, bad arguments and a
missing model; each expected text is what `LLM` itself produces for the same
request on a tiny random checkpoint. In-process runs of `main()` check the
streaming order, the flag-to-SamplingParams mapping and the error paths
cheaply.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import VOCAB, make_checkpoint
import pprt
from pprt import LLM, SamplingParams
from pprt.entrypoints import generate as cli
from pprt.entrypoints.demo_model import demo_model_available, demo_model_path
from tiny_tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox"
N = 6  # new tokens per run: short runs keep the suite fast


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny qwen3 checkpoint whose tokenizer has a Qwen3-style chat template."""
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "chat", "qwen3", seed=3)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    """The same kind of checkpoint with no chat template: a plain completion model."""
    path = make_checkpoint(tmp_path_factory.mktemp("cli") / "plain", "qwen3", seed=4, tokenizer=False)
    return build_tokenizer(path, vocab_size=VOCAB, template=None)


@pytest.fixture(scope="module")
def llm(chat_model):
    with LLM(str(chat_model), devices=["cpu"]) as llm:
        yield llm


def greedy(n: int = N, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "pprt.generate", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", cwd=REPO, env=env, timeout=180)


def greedy_args(model: Path, n: int = N) -> list[str]:
    return ["--model", str(model), "--devices", "cpu", "--temperature", "0", "--max-new-tokens", str(n)]


# ---- subprocess: what a user sees ---------------------------------------------------


def test_prompt_streams_completion_to_stdout_and_statistics_to_stderr(chat_model, llm):
    expected = llm.generate(PROMPT, greedy())[0]
    r = run_cli(*greedy_args(chat_model), "--prompt", PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected.text + "\n"
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    assert f"prompt {n_prompt} tokens" in r.stderr
    assert re.search(r"first token in \d+\.\d+ s \(prefill [\d.]+ tok/s\)", r.stderr), r.stderr
    count = re.search(r"(~?)(\d+) new tokens \(decode [\d.]+ tok/s\)", r.stderr)
    assert count, r.stderr
    if not count.group(1):  # "~": an engine whose stream() does not return its Completion; the count is estimated
        assert int(count.group(2)) == N
    assert "finish: length" in r.stderr
    assert re.search(r"stage 0 cpu layers 0-2: weights [\d.]+ MiB, peak RSS [\d.]+ MiB", r.stderr), r.stderr


def test_json_prints_one_object_with_ids_finish_reason_and_statistics(chat_model, llm):
    expected = llm.generate(PROMPT, greedy())[0]
    r = run_cli(*greedy_args(chat_model), "--prompt", PROMPT, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # the whole of stdout is one JSON object
    assert out["text"] == expected.text
    assert out["token_ids"] == expected.token_ids
    assert out["prompt_token_ids"] == expected.prompt_token_ids
    assert out["finish_reason"] == "length"
    st = out["statistics"]
    assert st["new_tokens"] == N and st["prompt_tokens"] == len(expected.prompt_token_ids)
    assert 0 < st["time_to_first_token_s"] <= st["total_s"]
    assert st["load_s"] > 0 and st["prefill_tokens_per_s"] > 0 and st["decode_tokens_per_s"] > 0
    (mem,) = st["memory"]
    assert mem["device"] == "cpu" and mem["layers"] == [0, 3] and mem["weight_bytes"] > 0


@pytest.mark.parametrize("source", ["prompt-file", "stdin"])
def test_prompt_from_file_and_from_stdin(source, chat_model, llm, tmp_path):
    text = "line one\n  línea dos → ünïcode\n\tdef f():\n"  # newlines, tabs and non-ASCII kept as given
    expected = llm.generate(text, greedy())[0]
    if source == "stdin":
        r = run_cli(*greedy_args(chat_model), "--json", stdin=text)
    else:
        (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
        r = run_cli(*greedy_args(chat_model), "--json", "--prompt-file", str(tmp_path / "prompt.txt"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_token_ids"] == llm.tokenizer.encode(text)
    assert out["token_ids"] == expected.token_ids


def test_chat_over_stdin_is_multi_turn_with_system_and_no_think(chat_model, llm):
    kw = {"enable_thinking": False}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    first = llm.chat(messages, greedy(5), **kw).text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    second = llm.chat(messages, greedy(5), **kw).text
    # a blank line is skipped; each line is one turn; replies carry the history
    r = run_cli(*greedy_args(chat_model, 5), "--chat", "--system", "Be brief.", "--no-think",
                stdin="hello\n\nand then?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == first + "\n" + second + "\n"
    assert r.stderr.count("finish:") == 2  # statistics per turn




def test_bad_argument_exits_2_with_one_line(chat_model):
    r = run_cli("--model", str(chat_model), "--prompt", "x", "--top-p", "1.5")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "--top-p must be in (0, 1]" in line and "1.5" in line


def test_missing_model_exits_1_with_loader_message(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_cli("--model", str(missing), "--prompt", "x")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert "cannot load the model" in line and str(missing) in line
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_default_model_is_the_bundled_demo_in_two_cpu_stages():
    import torch

    r = run_cli("--prompt", "def fibonacci(n):", "--max-new-tokens", "5", "--temperature", "0")
    if not demo_model_available():
        assert r.returncode == 1 and "demo model is missing" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > 1
    if not torch.cuda.is_available():
        assert "stage 1 cpu" in r.stderr  # two pipeline stages on a machine without GPU


# ---- in process: streaming order, flag mapping, error paths ----------------------------


class Recorder(io.StringIO):
    """A stdout that remembers each write and whether it was flushed before the next one."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def write(self, s: str) -> int:
        self.events.append(("write", s))
        return super().write(s)

    def flush(self) -> None:
        self.events.append(("flush", ""))


def test_stream_writes_pieces_in_order_each_flushed(chat_model, llm, monkeypatch):
    expected = llm.generate(PROMPT, greedy(8))[0]
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main([*greedy_args(chat_model, 8), "--prompt", PROMPT, "--quiet"]) == 0
    writes = [s for kind, s in out.events if kind == "write" and s]
    assert writes[-1] == "\n"
    pieces = writes[:-1]
    assert len(pieces) >= 2, "the completion came out in one piece: not streamed"
    assert "".join(pieces) == expected.text
    # every piece is flushed before the next is written
    for (kind, _), (nxt, _) in zip(out.events, out.events[1:]):
        if kind == "write":
            assert nxt == "flush"


def test_sampling_flags_build_the_same_request_as_the_library(chat_model, capsys):
    flags = ["--temperature", "0.9", "--top-p", "0.8", "--top-k", "50", "--min-p", "0.01",
             "--repetition-penalty", "1.3", "--presence-penalty", "0.4", "--frequency-penalty", "-0.2",
             "--seed", "11", "--max-new-tokens", "7"]
    params = SamplingParams(max_tokens=7, temperature=0.9, top_p=0.8, top_k=50, min_p=0.01,
                            repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=-0.2, seed=11)
    with LLM(str(chat_model), devices=["cpu"], seed=11) as llm:
        expected = llm.generate(PROMPT, params)[0]
    assert cli.main(["--model", str(chat_model), "--devices", "cpu", "--prompt", PROMPT, "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected.token_ids


def test_stop_string_cuts_the_output(chat_model, llm, capsys):
    ref = llm.generate(PROMPT, greedy(10))[0].text
    stop = re.search(r"[A-Za-z0-9]+", ref)
    assert stop, f"the greedy text {ref!r} has no ASCII run to stop at"
    assert cli.main([*greedy_args(chat_model, 10), "--prompt", PROMPT, "--json", "--stop", stop.group()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == ref[:stop.start()] and out["finish_reason"] == "stop"


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be an int >= 1"),
    (["--temperature", "-1"], "--temperature must be >= 0 and finite"),
    (["--presence-penalty", "3"], "--presence-penalty must be a number in [-2, 2]"),
    (["--devices", "gpu:0"], "--devices: 'gpu:0' is not a device"),
    (["--devices", "cpu,", "--prompt", "x"], "--devices 'cpu,' has an empty item"),
    (["--devices", "cpu", "--split", "1,2"], "--split has 2 stages but --devices names 1"),
    (["--split", "a,b"], "--split 'a,b' must be comma-separated ints"),
    (["--system", "hi"], "--system and --no-think need --chat"),
    (["--chat", "--json"], "cannot be combined with --chat"),
    (["--prompt", "x", "--prompt-file", "y"], "not allowed with argument"),
    (["--quant", "int8"], "invalid choice: 'int8'"),
    (["--max-context", "0"], "--max-context must be >= 1"),
    (["--transport", "pigeon"], "invalid choice: 'pigeon'"),
    (["--stage-timeout", "0"], "--stage-timeout must be > 0 seconds"),
    (["--rope-scaling", "{yarn"], "--rope-scaling '{yarn' is not JSON"),
    (["--rope-scaling", '{"rope_type": "yarn", "factor": 4}'], "needs 'original_max_position_embeddings'"),
    (["--rope-scaling", '{"rope_type": "linear", "factor": 2}'], "rope type 'linear' is not supported"),
], ids=lambda x: None if isinstance(x, str) else "_".join(x).strip("-"))
def test_argument_errors_exit_2_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "/nonexistent/but/never/loaded", *argv])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


@pytest.mark.parametrize("argv, message", [
    (["--kv-dtype", "fp7"], "kv_dtype 'fp7' is not one of"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    (["--prompt", ""], "the prompt is empty"),
])
def test_errors_found_while_loading_exit_2(argv, message, chat_model, capsys):
    capsys.readouterr()  # drop what building the fixture printed
    argv = ["--model", str(chat_model), "--devices", "cpu", *argv]
    if "--prompt" not in argv and "--prompt-file" not in argv:
        argv += ["--prompt", "x"]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_chat_on_a_model_without_template_exits_2_and_says_so(plain_model, capsys):
    capsys.readouterr()  # drop what building the fixture printed
    assert cli.main(["--model", str(plain_model), "--devices", "cpu", "--chat"], stdin=io.StringIO("hello\n")) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.strip().splitlines()
    assert "has no chat template" in line and "--prompt" in line


def test_broken_checkpoint_exits_1_naming_the_file(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert cli.main(["--model", str(tmp_path), "--devices", "cpu", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "cannot load the model" in err and "config.json" in err and "not valid JSON" in err


def test_demo_model_path_points_into_the_package():
    assert demo_model_path() == Path(pprt.__file__).resolve().parent / "demo"


@pytest.mark.parametrize("quant", ["int4", "fp8"])
def test_quantize_at_load_reports_its_time(quant, tmp_path, capsys):
    model = make_checkpoint(tmp_path, "qwen3", hidden_size=128, intermediate_size=256, head_dim=32)
    assert cli.main(["--model", str(model), "--devices", "cpu", "--prompt", PROMPT, "--quant", quant,
                     "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"load \d+\.\d\d s \(quantizing \d+\.\d\d s\)", err), err
    assert cli.main(["--model", str(model), "--devices", "cpu", "--prompt", PROMPT, "--quant", quant,
                     "--max-new-tokens", "3", "--temperature", "0", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["statistics"]
    assert 0 < stats["quantize_s"] <= stats["load_s"]


def test_transport_flag_reaches_the_pipeline(chat_model, llm, capsys):
    expected = llm.generate(PROMPT, greedy(4))[0].token_ids
    assert cli.main(["--model", str(chat_model), "--devices", "cpu,cpu", "--transport", "host", "--prompt", PROMPT,
                     "--max-new-tokens", "4", "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == expected


@pytest.mark.parametrize("flag", [[], ["--no-prefix-caching"]], ids=["caching", "no-caching"])
def test_chat_turns_report_prompt_tokens_taken_from_the_prefix_cache(flag, chat_model, llm, capsys):
    kw = {"enable_thinking": False}
    messages = [{"role": "system", "content": "You are a terse assistant who answers in one line."},
                {"role": "user", "content": "hello"}]
    first = llm.chat(messages, greedy(5), **kw).text
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    second = llm.chat(messages, greedy(5), **kw).text
    capsys.readouterr()
    assert cli.main([*greedy_args(chat_model, 5), "--chat", "--system", messages[0]["content"], "--no-think", *flag],
                    stdin=io.StringIO("hello\nand then?\n")) == 0
    out, err = capsys.readouterr()
    assert out == first + "\n" + second + "\n"  # the same replies with the cache as without
    turns = [line for line in err.splitlines() if "finish:" in line]
    assert len(turns) == 2 and "cached" not in turns[0]
    cached = re.search(r"prompt \d+ tokens \((\d+) cached\)", turns[1])
    if flag:
        assert cached is None
    else:  # the system message and the first turn, in whole 16-token blocks
        assert cached and int(cached.group(1)) >= 16 and int(cached.group(1)) % 16 == 0
