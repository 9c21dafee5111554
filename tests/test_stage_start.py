"""Stage processes start as their own program, so every way of running Python can drive a pipeline.

Spawned stages used to re-import the caller's main module: a script without
`if __name__ == "__main__":` killed every stage at start. Each form below runs
in a fresh interpreter (from another working directory) with two CPU stages,
prints its tokens and its stages' pids, and must match one in-process stage.
"""

import subprocess
import sys
import textwrap
import time

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams

PROMPTS = [[5, 17, 40, 33], [9, 8, 200]]
PARAMS = dict(max_tokens=6, temperature=0, ignore_eos=True)

BODY = """\
from pprt import LLM, SamplingParams
llm = LLM({model!r}, devices=["cpu", "cpu"])
print("PIDS", *[p.pid for p in llm.executor.procs], flush=True)
outs = llm.generate({prompts!r}, SamplingParams(**{params!r}))
print("RESULT", [o.token_ids for o in outs], flush=True)
"""

THREAD_BODY = """\
import threading
from pprt import LLM, SamplingParams
box = {{}}
def build_and_run():
    box["llm"] = llm = LLM({model!r}, devices=["cpu", "cpu"])
    print("PIDS", *[p.pid for p in llm.executor.procs], flush=True)
    box["outs"] = llm.generate({prompts!r}, SamplingParams(**{params!r}))
t = threading.Thread(target=build_and_run)
t.start()
t.join()
print("RESULT", [o.token_ids for o in box["outs"]], flush=True)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("start") / "m", "qwen3", tokenizer=False)
    with LLM(str(path), devices=["cpu"]) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**PARAMS))]
    return path, expected


def run_form(form: str, model, cwd) -> subprocess.CompletedProcess:
    """Run the snippet as `form`; none of them calls close() (interpreter exit must end the stages)."""
    fill = dict(model=str(model), prompts=PROMPTS, params=PARAMS)
    body = BODY.format(**fill)
    script = cwd / "user_script.py"
    py = [sys.executable]
    if form == "script-no-guard":
        script.write_text(body)
        return _run(py + [str(script)], cwd)
    if form == "script-guarded":
        script.write_text('if __name__ == "__main__":\n' + textwrap.indent(body, "    "))
        return _run(py + [str(script)], cwd)
    if form == "python-c":
        return _run(py + ["-c", body], cwd)
    if form == "stdin":
        return _run(py + ["-"], cwd, stdin=body)
    if form == "interactive":  # the REPL, as a notebook or a terminal session feeds it line by line
        return _run(py + ["-i"], cwd, stdin=body + "exit()\n")
    if form == "thread-no-guard":
        script.write_text(THREAD_BODY.format(**fill))
        return _run(py + [str(script)], cwd)
    raise ValueError(form)


def _run(cmd, cwd, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=240)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# Three forms in the default run (each starts a driver and two stages, ~10 s); the
# guarded script, stdin and interactive forms take the same start path and run with -m slow.
@pytest.mark.parametrize("form", ["script-no-guard",  # the README's way; the others run with -m slow
                                  *(pytest.param(f, marks=pytest.mark.slow) for f in
                                    ("python-c", "thread-no-guard", "script-guarded", "stdin", "interactive"))])
def test_every_way_of_running_python_drives_two_stages(setup, tmp_path, form):
    model, expected = setup
    out = run_form(form, model, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith(("PIDS", "RESULT"))}
    assert "RESULT" in lines, out.stdout + out.stderr[-3000:]
    assert eval(lines["RESULT"][len("RESULT "):]) == expected
    assert "bootstrapping phase" not in out.stderr
    pids = [int(p) for p in lines["PIDS"].split()[1:]]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 2 and not any(alive(p) for p in pids)


def test_one_stage_in_a_process_of_its_own(setup):
    """stage_processes=True: one device, yet the stage is a program of its own (the server runs each of
    several models so); same tokens as the in-process stage, and closing ends the process."""
    model, expected = setup
    with LLM(str(model), devices=["cpu"], stage_processes=True) as llm:
        [proc] = llm.executor.procs
        assert alive(proc.pid)
        assert [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(**PARAMS))] == expected
        assert llm.stats().stages[0].steps > 0  # counted in the stage's own process
    deadline = time.monotonic() + 10
    while alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(proc.pid)
    with pytest.raises(ValueError, match="stage_processes"):
        LLM(str(model), devices=["cpu"], stage_processes="yes")
