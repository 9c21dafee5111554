"""Speculative decoding with n-gram (prompt lookup) drafts, verified in the pipeline.

Greedy decoding with drafts gives transformers' greedy tokens (one by one there), on 1
and 2 stages, for a plain family and for hybrid DeltaNet families, whose recurrent and
conv state must be rolled back to the last accepted token (the stats show that drafts
were both accepted and rejected, so both paths ran). A rejecting sequence does not change
its batch neighbours' tokens (greedy and seeded sampling). Rejection sampling keeps the
target distribution (a statistical test on the acceptance function itself, and end to
end: token frequencies with and without drafts agree within a stated tolerance). Stop tokens
inside an accepted run end the output there; preemption between verify steps keeps the
tokens. 3 stages and the other families' preemption are slow variants.
"""

from __future__ import annotations

import pytest
import torch

from models import make_checkpoint, reference_greedy, reference_model, spoiled_continuation
from pprt import LLM, SamplingParams
from pprt.engine.drafts import SpeculativeConfig, propose_ngram
from pprt.models.sampler import Sampler
from pprt.models.speculative import verify

N = 24
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
# repeated n-grams in the prompts give drafts from the first step on
PROMPTS = [[5, 17, 40, 33, 5, 17, 40, 33, 5, 17], [9, 8], [30, 31, 32, 33, 34, 35, 30, 31, 32, 33, 34, 35, 30],
           [300, 3, 3, 3, 3, 3, 250, 11, 12, 13, 250, 11]]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def oracles(tmp_path_factory):
    """A checkpoint per family and transformers' greedy continuations of PROMPTS (built once)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = make_checkpoint(tmp_path_factory.mktemp(family), family)
            model = reference_model(path)
            cache[family] = path, {tuple(p): reference_greedy(model, p, N)[0] for p in PROMPTS}
        return cache[family]

    return get


def oracle_drafter(expected: dict):
    """A proposer that knows transformers' greedy continuation and spoils one draft in most
    steps (which one cycles with the length), so that every acceptance count 0..k happens: a
    random tiny model rarely repeats itself, and n-gram drafts would all be rejected."""
    def propose(tokens, k, n_max, n_min=1):
        return spoiled_continuation(expected, tokens, k)
    return propose


def check_greedy(family, oracles, monkeypatch=None, **llm_kw):
    """Greedy tokens with drafts equal transformers'; with `monkeypatch`, drafts from oracle_drafter."""
    path, expected = oracles(family)
    if monkeypatch is not None:
        monkeypatch.setattr("pprt.engine.scheduler.propose_ngram", oracle_drafter(expected))
    with LLM(str(path), speculative=NGRAM, **llm_kw) as llm:
        outs = llm.generate(PROMPTS, GREEDY)
        alone = llm.generate(PROMPTS[0], GREEDY)[0]
        stats = llm.stats()
        assert stats.kv_blocks_used == 0 and stats.state_slots_used == 0  # every block and slot came back
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == expected[tuple(prompt)], prompt
    assert alone.token_ids == expected[tuple(PROMPTS[0])]
    # both paths ran: drafts accepted (KV kept) and rejected (KV dropped, state rolled back)
    assert 0 < stats.accepted_tokens < stats.draft_tokens, stats
    assert stats.acceptance_rate == stats.accepted_tokens / stats.draft_tokens
    assert 1.0 < stats.mean_accepted_length <= 1 + NGRAM["num_speculative_tokens"]
    return stats


def test_greedy_with_ngram_drafts_equals_transformers(oracles):
    """Real prompt-lookup drafts (the random qwen3 model repeats itself enough to accept some)."""
    check_greedy("qwen3", oracles, devices=["cpu"])


@pytest.mark.parametrize("family, devices, split, chunk_size", [
    ("qwen3", ["cpu", "cpu"], [1, 2], 5),
    ("qwen3_5_text", ["cpu"], None, 2048),
    ("qwen3_next", ["cpu", "cpu"], [5, 3], 5),
], ids=["qwen3-2stages-chunked", "qwen3_5-1stage", "qwen3_next-2stages-chunked"])
def test_greedy_with_partly_wrong_drafts_equals_transformers(oracles, monkeypatch, family, devices, split,
                                                             chunk_size):
    """Drafts of which 0..k are right: KV kept up to the last accepted one, DeltaNet state
    rolled back. chunk_size 5: prefill chunks share micro-batches with verify chunks, and a
    hybrid sequence that rejected recomputes from its snapshot in chunks cut by the budget."""
    check_greedy(family, oracles, monkeypatch, devices=devices, split=split, chunk_size=chunk_size)


@pytest.mark.slow
@pytest.mark.parametrize("family, split", [("qwen2", [1, 1, 1]), ("qwen3_5_text", [2, 3, 3]),
                                           ("qwen3_next", [3, 2, 3])])
def test_greedy_with_drafts_three_stages(oracles, monkeypatch, family, split):
    check_greedy(family, oracles, monkeypatch, devices=["cpu"] * 3, split=split, chunk_size=7)


@pytest.mark.parametrize("family", [pytest.param("qwen3", marks=pytest.mark.slow), "qwen3_5_text",
                                    pytest.param("qwen3_next", marks=pytest.mark.slow)])
def test_greedy_with_drafts_under_preemption(oracles, monkeypatch, family):
    """A pool of 14 blocks of 4 tokens for 4 sequences of up to 37 tokens: sequences are
    preempted between verify steps (a hybrid one also loses its snapshot slot) and recomputed."""
    path, _ = oracles(family)
    with LLM(str(path), devices=["cpu"], block_size=4) as llm:
        per_block = llm.executor.worker.cache.spec.bytes_per_block
    stats = check_greedy(family, oracles, monkeypatch, devices=["cpu"], block_size=4,
                         kv_cache_memory=14 * per_block)
    assert stats.preemptions > 0


def test_stop_token_inside_accepted_drafts_ends_there(oracles):
    path, expected = oracles("qwen3")
    tokens = expected[tuple(PROMPTS[2])]
    stop = tokens[N // 2]
    want = tokens[: tokens.index(stop) + 1]
    params = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    with LLM(str(path), devices=["cpu"], speculative=NGRAM) as llm:
        out = llm.generate(PROMPTS[2], params)[0]
        short = llm.generate(PROMPTS[2], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == want and out.finish_reason == "stop"
    assert short.token_ids == tokens[:5] and short.finish_reason == "length"  # drafts never pass max_tokens


def test_seeded_sampling_does_not_depend_on_neighbours(oracles, monkeypatch):
    path, expected = oracles("qwen3_5_text")
    monkeypatch.setattr("pprt.engine.scheduler.propose_ngram", oracle_drafter(expected))
    # a low temperature: the oracle's greedy drafts are mostly accepted (spoiled ones rejected)
    params = SamplingParams(max_tokens=N, temperature=0.05, seed=11, ignore_eos=True)
    with LLM(str(path), devices=["cpu"], speculative=NGRAM) as llm:
        alone = llm.generate(PROMPTS[0], params)[0]
        batch = llm.generate(PROMPTS, params)
        stats = llm.stats()
    assert batch[0].token_ids == alone.token_ids
    assert 0 < stats.accepted_tokens < stats.draft_tokens


def test_sampled_tokens_follow_the_same_distribution_with_drafts():
    """End to end on the demo model (trained: its drafts are often but not always accepted):
    B unseeded samples at temperature 1.3 with and without drafts. Every token's frequency at
    output positions 1-3 agrees within 4.5 standard errors of the difference of two binomial
    frequencies (fixed LLM seeds: the test is deterministic)."""
    from pprt.entrypoints.demo_model import demo_model_path

    B, n = 400, 3
    params = SamplingParams(max_tokens=n, temperature=1.3, top_p=1.0, top_k=0, min_p=0.0, ignore_eos=True)
    runs = {}
    for spec in (None, NGRAM):
        with LLM(str(demo_model_path()), devices=["cpu"], seed=5, speculative=spec) as llm:
            runs[spec is None] = torch.tensor([o.token_ids for o in llm.generate([REPEATED] * B, params)])
            stats = llm.stats()
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    base, spec = runs[True], runs[False]  # [B, n] each
    for pos in range(n):
        V = int(max(base[:, pos].max(), spec[:, pos].max())) + 1
        fb, fs = (torch.bincount(x[:, pos], minlength=V).float() / B for x in (base, spec))
        pooled = (fb + fs) / 2
        tol = 4.5 * (pooled * (1 - pooled) * 2 / B).sqrt() + 1e-3
        assert ((fb - fs).abs() <= tol).all(), (pos, (fb - fs).abs().max())


def test_rejection_sampling_keeps_the_target_distribution():
    """Many sequences with the same rows: the first emitted token follows row 0's distribution
    whatever the draft, and after an accepted first draft the second follows row 1's."""
    V, B = 6, 6000
    sampler = Sampler(V, "cpu", seed=0)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0).resolve({})
    for i in range(B):
        sampler.add(i, params, [1])
    torch.manual_seed(0)
    rows = torch.randn(3, V) * 1.5  # [k + 1, V]
    p = rows.softmax(dim=-1)
    draft = [int(p[0].argmin()), int(p[1].argmax())]  # an unlikely first draft, a likely second one
    out = verify(sampler, list(range(B)), [draft] * B, rows.repeat(B, 1))
    first = torch.tensor([(acc + [tok])[0] for acc, tok in zip(out.accepted, out.token_ids)])
    freq = torch.bincount(first, minlength=V).float() / B
    # 4.5 standard errors of a binomial frequency, per token
    assert ((freq - p[0]).abs() <= 4.5 * (p[0] * (1 - p[0]) / B).sqrt() + 1e-3).all(), (freq, p[0])
    second = torch.tensor([(acc + [tok])[1] for acc, tok in zip(out.accepted, out.token_ids) if acc])
    n = len(second)
    assert n > 30
    freq = torch.bincount(second, minlength=V).float() / n
    assert ((freq - p[1]).abs() <= 4.5 * (p[1] * (1 - p[1]) / n).sqrt() + 1e-3).all(), (freq, p[1])


def test_greedy_acceptance_takes_the_longest_matching_prefix():
    V = 7
    sampler = Sampler(V, "cpu", seed=0)
    for i in range(3):
        sampler.add(i, SamplingParams(temperature=0).resolve({}), [1])
    eye = torch.eye(V) * 5  # row for token t: argmax t
    drafts = [[2, 3, 4], [2, 6], [1]]
    logits = torch.cat([eye[[2, 3, 5, 0]], eye[[4, 6, 6]], eye[[1, 3]]])  # accepts 2 of 3, 0 of 2, 1 of 1
    out = verify(sampler, [0, 1, 2], drafts, logits)
    assert out.accepted == [[2, 3], [], [1]] and out.token_ids == [5, 4, 3]


@pytest.mark.parametrize("tokens, k, expected", [
    ([1, 2, 3, 9, 1, 2, 3], 2, [9, 1]),  # the 3-gram 1 2 3 matched
    ([1, 2, 7, 5, 2, 8, 1, 2], 3, [7, 5, 2]),  # the 2-gram 1 2 before the 1-gram 2
    ([4, 2, 6, 2, 5, 2], 1, [5]),  # the latest match of the 1-gram 2
    ([1, 2, 3, 4], 3, []),  # no earlier match
    ([7, 7], 4, [7]),  # the continuation ends at the last token
])
def test_ngram_proposer(tokens, k, expected):
    assert propose_ngram(tokens, k, n_max=3) == expected


def test_speculative_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="unknown field"):
        SpeculativeConfig.parse({"method": "ngram", "k": 2})
    with pytest.raises(ValueError, match="'eagle' is not supported"):
        SpeculativeConfig.parse({"method": "eagle"})
    assert SpeculativeConfig.parse(NGRAM) == SpeculativeConfig("ngram", 3)
    assert SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 2}).mtp


REPEATED = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(a, b):\n"


def test_cli_reports_acceptance_and_keeps_the_greedy_tokens(capsys):
    """The bundled demo model (trained) on a prompt that repeats itself: drafts are accepted."""
    import json

    from pprt.entrypoints import generate as cli
    from pprt.entrypoints.demo_model import demo_model_path

    model = str(demo_model_path())
    with LLM(model, devices=["cpu"]) as llm:
        expected = llm.generate(REPEATED, SamplingParams(max_tokens=32, temperature=0))[0]
    argv = ["--model", model, "--devices", "cpu", "--prompt", REPEATED, "--temperature", "0",
            "--max-new-tokens", "32", "--speculative-ngram", "4"]
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == expected.token_ids
    spec = out["statistics"]["speculative"]
    assert 0 < spec["accepted_tokens"] <= spec["draft_tokens"]
    assert spec["acceptance_rate"] == round(spec["accepted_tokens"] / spec["draft_tokens"], 4)
    assert cli.main(argv) == 0
    assert "drafts accepted" in capsys.readouterr().err


def test_cli_speculative_flag_is_checked_before_loading(capsys):
    from pprt.entrypoints import generate as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--model", "/nonexistent/never/loaded", "--speculative-ngram", "0"])
    assert e.value.code == 2 and "--speculative-ngram must be in 1..16" in capsys.readouterr().err


def test_a_hybrid_drafts_at_max_num_seqs_one(tmp_path):
    """A hybrid sequence needs a second state slot (the snapshot its drafts roll back to): the pool
    plans one beside each running slot, so a lone sequence at max_num_seqs=1 drafts (it never did
    when the pool held exactly max_num_seqs slots, with n-gram and MTP drafts alike: the slot is
    the scheduler's, whatever proposes; MTP proposes every step) and its greedy tokens stay the
    plain run's."""
    path = make_checkpoint(tmp_path / "m", "qwen3_5_text", mtp=True, tokenizer=False)
    prompt = [5, 6, 7, 8, 9] * 4
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(str(path), devices=["cpu"], max_num_seqs=1) as llm:
        plain = llm.generate([prompt], greedy)[0].token_ids
        assert llm.stats().state_slots_total == 1
    with LLM(str(path), devices=["cpu"], max_num_seqs=1,
             speculative={"method": "mtp", "num_speculative_tokens": 2}) as llm:
        assert llm.generate([prompt], greedy)[0].token_ids == plain
        stats = llm.stats()
    assert stats.state_slots_total == 2 and stats.draft_tokens > 0
