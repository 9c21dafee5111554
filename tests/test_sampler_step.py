"""The sampler's cost per step: one read of the device, work on penalized rows only, one launch for seeded rows.

Before issue 18 a step read the device up to six times (top_p's `any`, the
survivor count of a tie, four reads for logprobs, then the ids), cloned the
whole [B, V] logits for a repetition (and then presence / frequency) penalty,
and drew each seeded row's noise with its own launch. Counted here with bench.counting (every read of device
data counts as a sync), as a GPU would run it. Seeded noise is a counter-based
stream (pprt_kernels.seeded_noise): the Triton kernel must equal its torch
reference bit for bit, and the draws must follow the softmax.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pprt_kernels.seeded_noise as sn
from bench.counting import count_ops
from pprt.models.sampler import Sampler
from pprt.params import SamplingParams

V = 300


def sampler(params: list[SamplingParams], seed: int = 0) -> Sampler:
    s = Sampler(V, "cpu", seed=seed)
    for i, p in enumerate(params):
        s.add(i, p.resolve(), [1, 2, 3, 200])
    return s


MIXES = {
    "greedy": [SamplingParams(temperature=0)] * 4,
    "qwen": [SamplingParams(temperature=0.7, top_k=20, top_p=0.8)] * 4,
    "everything": [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=3, top_p=0.9, seed=5),
                   SamplingParams(repetition_penalty=1.3, min_p=0.1, logprobs=3),
                   SamplingParams(temperature=0, repetition_penalty=0.8, logprobs=0),
                   SamplingParams(top_k=5, top_p=0.99, seed=9),
                   SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, temperature=0.8),
                   SamplingParams(temperature=0, repetition_penalty=1.2, frequency_penalty=-0.4)],
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_one_read_per_step(mix):
    params = MIXES[mix]
    s = sampler(params)
    logits = torch.randn(len(params), V)
    logits[:, 40:60] = 2.5  # 20 tied tokens: top_k = 3 and 5 cut through the tie, past the partial topk
    for _ in range(3):
        with count_ops() as counts:
            out = s.sample(list(range(len(params))), logits)
        assert counts.syncs == 1, counts.sync_ops  # the sampled ids (with the logprobs asked for)
        assert len(out.token_ids) == len(params)


def test_seeded_rows_cost_one_launch_together(monkeypatch):
    monkeypatch.setenv("PPRT_KERNELS", "triton")
    base = SamplingParams(temperature=0.9, top_k=50)
    launches = []
    for seeded in (0, 1, 6):
        s = sampler([SamplingParams(temperature=0.9, top_k=50, seed=i) if i < seeded else base for i in range(8)])
        with count_ops() as counts:
            s.sample(list(range(8)), torch.randn(8, V))
        launches.append(counts.launches)
    assert launches[1] == launches[2] == launches[0] + 1  # 1 or 6 seeded rows: one launch more than none


class _Elements(TorchDispatchMode):
    """Elements of the tensors ops create (in-place ops and views create none)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            in_place = str(func.overloadpacket).endswith("_")
            if isinstance(t, torch.Tensor) and not func.is_view and not in_place:
                self.total += t.numel()
        return out


@pytest.mark.parametrize("penalty", [dict(repetition_penalty=1.2), dict(presence_penalty=0.5, frequency_penalty=0.5),
                                     dict(repetition_penalty=1.2, presence_penalty=0.5)],
                         ids=["repetition", "presence-frequency", "both"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_penalties_work_on_the_penalized_rows_only(temperature, penalty):
    B = 64
    logits = torch.randn(B, V)
    written = []
    for penalized in (0, 1):
        params = [SamplingParams(temperature=temperature, **(penalty if i < penalized else {})) for i in range(B)]
        s = sampler(params)
        with _Elements() as e:
            s.sample(list(range(B)), logits)
        written.append(e.total)
    assert written[1] - written[0] < B * V / 2  # [1, V] rows for the one penalized row; a copy of the logits is [B, V]


# ---- the seeded stream -------------------------------------------------------------------------------


def test_mix64_on_tensors_equals_python_ints():
    values = [0, 1, 2**63, 2**64 - 1, 0x123456789ABCDEF0, 0x9E3779B97F4A7C15]
    got = sn.mix64_ref(torch.tensor([sn.as_int64(v) for v in values]))
    assert got.tolist() == [sn.as_int64(sn.mix64(v)) for v in values]


@pytest.mark.parametrize("s,b,v,block", [(1, 1, 7, 16), (3, 5, 1000, 256), (4, 4, 4097, 1024)],
                         ids=["S1-V7", "S3-V1000", "S4-V4097"])
def test_seeded_noise_triton_equals_reference(s, b, v, block):
    pairs = [(0, 0), (2**63 - 1, 5), (42, 1), (42, 2)][:s]  # (seed, draw)
    starts = torch.tensor([sn.stream_start(seed, draw) for seed, draw in pairs])
    rows = torch.randperm(b)[:s]
    ref = sn.seeded_noise_ref(starts, rows, torch.zeros(b, v))
    out = sn.seeded_noise_triton(starts, rows, torch.zeros(b, v), block=block)
    assert torch.equal(out, ref)
    assert (ref[rows] > 0).all() and ref[rows].isfinite().all()
    assert len({tuple(r.tolist()[:8]) for r in ref[rows]}) == s  # distinct streams


def test_seeded_noise_is_exponential():
    starts = torch.tensor([sn.stream_start(7, d) for d in range(20)])
    q = sn.seeded_noise_ref(starts, torch.arange(20), torch.zeros(20, 5000)).flatten()  # 100,000 draws
    assert q.mean().item() == pytest.approx(1.0, abs=0.01)
    # P(q > t) = exp(-t)
    for t in (0.1, 1.0, 3.0):
        assert (q > t).float().mean().item() == pytest.approx(torch.exp(torch.tensor(-t)).item(), abs=0.005)


def test_seeded_draws_follow_the_softmax():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0, -0.5])
    n = len(logits)
    draws = []
    for seed in range(400):
        s = Sampler(n, "cpu")
        s.add(0, SamplingParams(temperature=1.5, seed=seed).resolve(), [])
        draws += [s.sample([0], logits[None]).token_ids[0] for _ in range(10)]
    counts = torch.bincount(torch.tensor(draws), minlength=n).float()
    expected = len(draws) * torch.softmax(logits / 1.5, -1)
    assert float(((counts - expected) ** 2 / expected).sum()) < 22.46  # chi-square, 6 dof, 99.9%


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_tokens_equal_on_cpu_and_gpu():
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(3)) * 0.3
    tokens = {}
    for device in ("cpu", "cuda"):
        s = Sampler(5000, device)
        for i in range(6):
            s.add(i, SamplingParams(temperature=1.0, seed=100 + i).resolve(), [])
        tokens[device] = [s.sample(list(range(6)), logits.to(device)).token_ids for _ in range(4)]
    assert tokens["cpu"] == tokens["cuda"]
