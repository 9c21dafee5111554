"""torchrun: each rank a stage, rank 0 the driver; also two "nodes" on localhost."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from models import make_checkpoint
from pprt import LLM, SamplingParams

SCRIPT = textwrap.dedent("""
    import json, sys
    from pprt.distributed.stage_main import serve_torchrun, torchrun_rank
    rank, world = torchrun_rank()
    if rank != 0:
        serve_torchrun()
    else:
        from pprt import LLM, SamplingParams
        with LLM(sys.argv[1]) as llm:
            outs = llm.generate([[5, 17, 40], [9, 8, 200, 4]],
                                SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            print("RESULT", json.dumps([o.token_ids for o in outs]), flush=True)
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    path = make_checkpoint(tmp / "model", "qwen2", num_hidden_layers=4)
    (tmp / "run.py").write_text(SCRIPT)
    with LLM(str(path), devices=["cpu"]) as llm:
        outs = llm.generate([[5, 17, 40], [9, 8, 200, 4]], SamplingParams(max_tokens=8, temperature=0,
                                                                          ignore_eos=True))
    return tmp, path, [o.token_ids for o in outs]


def result_of(stdout: str):
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[0][len("RESULT "):])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks(setup):
    tmp, path, expected = setup
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), str(tmp / "run.py"), str(path)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert result_of(out.stdout) == expected


@pytest.mark.slow  # two torchrun launchers and a c10d rendezvous: ~30 s; two_ranks covers the default run
def test_torchrun_two_nodes_with_rendezvous(setup):
    tmp, path, expected = setup
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1", "--node-rank", str(i), "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", endpoint, "--rdzv-id", "pprt-test", str(tmp / "run.py"),
                               str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [n.communicate(timeout=180) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [r[1][-2000:] for r in results]
    assert result_of(results[0][0] + results[1][0]) == expected
