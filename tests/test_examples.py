"""Each program in examples/ runs on CPU and prints what the library computes.

The examples default to the bundled demo model (pprt/demo/); these tests skip
only when that directory has not been trained yet. library.py also runs on a
tiny checkpoint with a chat template, so its chat() branch is exercised.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams
from pprt.entrypoints.demo_model import demo_model_available, demo_model_path

REPO = Path(__file__).resolve().parent.parent
N = 5  # new tokens per generation: keep the runs short


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONIOENCODING="utf-8", CUDA_VISIBLE_DEVICES="")  # CPU, as on CI
    r = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], capture_output=True, text=True,
                       encoding="utf-8", cwd=REPO, env=env, timeout=240)
    assert r.returncode == 0, f"{name} failed:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def demo() -> str:
    if not demo_model_available():
        pytest.skip(f"the demo model has not been trained into {demo_model_path()} (tools/train_demo.py)")
    return str(demo_model_path())


def test_library_on_the_demo_model(demo):
    out = run_example("library.py", "--max-tokens", str(N))
    prompts = ["def fibonacci(n):", "import os\n\n\ndef list_python_files(directory):"]
    with LLM(demo, devices=["cpu"]) as llm:
        expected = llm.generate(prompts, SamplingParams(max_tokens=N, temperature=0, repetition_penalty=1.2))
    for prompt, completion in zip(prompts, expected):
        assert prompt + completion.text in out
    assert "--- stream: 'class Stack:'" in out
    assert "has no chat template: it is a completion model" in out


def test_library_chat_on_a_model_with_a_template(tmp_path):
    model = make_checkpoint(tmp_path / "chat", "qwen3", seed=5)
    out = run_example("library.py", "--model", str(model), "--devices", "cpu", "--max-tokens", str(N))
    messages = [{"role": "system", "content": "You are a concise Python tutor."},
                {"role": "user", "content": "What does a Python generator do? One sentence."}]
    with LLM(str(model), devices=["cpu"]) as llm:
        reply = llm.chat(messages, SamplingParams(max_tokens=N, temperature=0, repetition_penalty=1.2),
                         enable_thinking=False).text
    assert out.split("--- chat\n", 1)[1] == reply + "\n"


def test_two_models_hand_off_on_the_demo_model(demo):
    out = run_example("two_models.py", "--max-tokens", str(N))
    asked = re.search(r"^\[reasoner\] asks the agent for: (def .+)$", out, re.M)
    assert asked, out
    assert f"[agent]\n{asked.group(1)}\n" in out  # the agent's code starts with what the reasoner asked for
    assert '[reasoner]\nif __name__ == "__main__":\n' in out


def test_long_context_fits_a_long_file_into_the_context(demo):
    out = run_example("long_context.py", "--max-context", "512", "--max-tokens", str(N))
    assert re.search(r"argparse\.py: \d+ tokens, more than the context allows: kept the first and last \d+", out)
    used = re.search(r"^(\d+) prompt tokens \+ (\d+) new in [\d.]+ s \(max_context 512\)$", out, re.M)
    assert used, out
    assert int(used.group(1)) + N <= 512 and int(used.group(2)) <= N


def test_two_agents_over_the_server_on_the_demo_model(demo):
    pytest.importorskip("openai", reason="the test extra (openai) is not installed")
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    out = run_example("two_agents.py", "--max-tokens", str(N))
    assert out.startswith("models: reasoner, agent\n"), out
    asked = re.search(r"^\[reasoner\] asks the agent for: (def .+)$", out, re.M)
    assert asked, out
    with LLM(demo, devices=["cpu"]) as llm:  # the agent's streamed code is what the library writes
        helper = llm.generate(f"import csv\n\n\n{asked.group(1)}\n",
                              SamplingParams(max_tokens=N, temperature=0, repetition_penalty=1.2))[0].text
    assert f"[agent]\n{asked.group(1)}\n{helper}\n" in out
    assert '[reasoner]\nif __name__ == "__main__":\n' in out
