"""Hub ids that cannot be resolved say why, in one line, and fast; without the internet.

A local HTTP server stands in for the hub (HF_ENDPOINT): it answers as huggingface.co
does for a missing repository (404 RepoNotFound), a private one without a token (401), a
repository without config.json (404 EntryNotFound), a failing hub (503) and a working
one; a closed port stands for no network. HF_HUB_CACHE is a temporary directory.
Every case is one line, and none waits out huggingface_hub's ~25-40 s of retries.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pprt.entrypoints.plan_cli import main as plan_main
from pprt.errors import CheckpointError
from pprt.weights.source import ModelSource

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = json.dumps(dict(model_type="qwen3", vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=4096, torch_dtype="bfloat16")).encode()
FAST = 5.0  # seconds: one metadata request, no retries


class FakeHub(BaseHTTPRequestHandler):
    """/{org}/{name}/resolve/{revision}/{file}, answered by repository name."""

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        parts = self.path.split("/")
        repo, file = "/".join(parts[1:3]), "/".join(parts[5:])
        self.server.requests.append((self.command, repo, file))
        status, headers, content = 200, {}, b""
        if repo == "org/missing":
            status, headers = 404, {"X-Error-Code": "RepoNotFound"}
        elif repo == "org/private":
            status = 401
        elif repo == "org/failing":
            status = 503
        elif repo == "org/tiny" and file == "config.json":
            headers, content = {"X-Repo-Commit": COMMIT, "ETag": '"cfg-etag-1"'}, CONFIG
        else:  # org/noconfig, or any other file of org/tiny
            status, headers = 404, {"X-Error-Code": "EntryNotFound"}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub_env(tmp_path, monkeypatch):
    """Point huggingface_hub at `endpoint` with an empty cache; returns a function doing it."""
    from huggingface_hub import constants

    def use(endpoint: str, offline: bool = False) -> None:
        for name, value in (("HF_ENDPOINT", endpoint), ("HF_HUB_CACHE", str(tmp_path / "cache"))):
            monkeypatch.setenv(name, value)
        # huggingface_hub reads these once, at import
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # "org/x" is no local directory
    return use


@pytest.fixture()
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with block ends: connections are refused


def require_error(name: str) -> tuple[str, float]:
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        ModelSource(name).require("config.json")
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg, elapsed


@pytest.mark.parametrize("repo, words", [
    ("org/missing", "no such repository or no access (HTTP 404; "),
    ("org/private", "no such repository or no access (HTTP 401; "),
    ("org/noconfig", "the repository has no config.json"),
    ("org/failing", "the hub cannot be reached (HTTP 503 from http://127.0.0.1:"),
])
def test_hub_answers_are_told_apart(hub_env, fake_hub, repo, words):
    server, endpoint = fake_hub
    hub_env(endpoint)
    msg, elapsed = require_error(repo)
    assert msg.startswith(f"model {repo!r}: ") and words in msg, msg
    assert elapsed < FAST
    if repo == "org/failing":
        assert "set HF_HUB_OFFLINE=1 to use the cache, or pass a directory" in msg
        assert len(server.requests) == 1  # no retries


def test_no_network_is_one_fast_line(hub_env):
    hub_env(f"http://127.0.0.1:{closed_port()}")
    msg, elapsed = require_error("Qwen/Qwen3.6-27B")
    assert msg.startswith("model 'Qwen/Qwen3.6-27B': the hub cannot be reached (")
    assert "Connection refused" in msg or "connect" in msg.lower(), msg
    assert msg.endswith("; set HF_HUB_OFFLINE=1 to use the cache, or pass a directory)")
    assert elapsed < FAST  # huggingface_hub alone retries for ~25 s here


def test_offline_without_a_cached_copy(hub_env):
    hub_env("http://127.0.0.1:9", offline=True)
    msg, elapsed = require_error("Qwen/Qwen3.6-27B")
    assert "config.json is not in the local cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert elapsed < FAST


def test_working_hub_then_cache_when_it_goes_away(hub_env, fake_hub, capsys):
    server, endpoint = fake_hub
    hub_env(endpoint)
    assert plan_main(["--model", "org/tiny", "--gpus", "96"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    assert {f for _, _, f in server.requests} == {"config.json"}  # config.json only, as the planner says
    hub_env(f"http://127.0.0.1:{closed_port()}")  # the network goes away: the cached copy serves
    t0 = time.monotonic()
    assert plan_main(["--model", "org/tiny", "--gpus", "96"]) == 0
    assert time.monotonic() - t0 < FAST
    hub_env(endpoint, offline=True)
    assert plan_main(["--model", "org/tiny", "--gpus", "96"]) == 0


def test_plan_cli_without_network_answers_in_one_line(tmp_path):
    """The command of the issue, as a user runs it (a closed port stands for no network)."""
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HUB_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-m", "pprt.plan", "--model", "Qwen/Qwen3.6-27B", "--gpus", "96,96"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in out.stderr.splitlines() if line.strip() and "WARNING" not in line], out.stderr
    assert len(errors) == 1 and "the hub cannot be reached" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0]
