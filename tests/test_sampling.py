"""SamplingParams validation/resolution and the batched Sampler, on CPU."""

import math

import pytest
import torch

from pprt.models.sampler import Sampler, _top_k_top_p
from pprt.params import STANDARD_DEFAULTS, SamplingParams

CPU = torch.device("cpu")


def make_sampler(vocab: int, seqs: dict[int, SamplingParams], prompts: dict | None = None, seed: int = 0):
    s = Sampler(vocab, CPU, seed=seed)
    for sid, p in seqs.items():
        s.add(sid, p.resolve(), (prompts or {}).get(sid, []))
    return s


# ---- SamplingParams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 1.0}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_top_k_minus_one_means_off():
    assert SamplingParams(top_k=-1).top_k == 0


def test_resolve_standard_defaults():
    r = SamplingParams(stop="\n\n", stop_token_ids=[7, 9]).resolve()
    assert {f: getattr(r, f) for f in STANDARD_DEFAULTS} == STANDARD_DEFAULTS
    assert r.stop == ("\n\n",) and r.stop_token_ids == (7, 9)
    assert r.resolved and not r.greedy
    assert SamplingParams().resolve().stop == () and not SamplingParams().resolved


def test_resolve_from_model_defaults_user_wins():
    gen = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "min_p": None}
    r = SamplingParams(top_p=0.95, stop=["a", "b"]).resolve(gen)
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.repetition_penalty) == (0.7, 0.95, 20, 0.0, 1.05)
    assert r.stop == ("a", "b")
    # do_sample False in generation_config means greedy, unless the user set a temperature
    assert SamplingParams().resolve({"do_sample": False, "temperature": 0.6}).greedy
    assert SamplingParams(temperature=0.3).resolve({"do_sample": False}).temperature == 0.3
    assert not SamplingParams().resolve({"do_sample": True, "temperature": 0.6}).greedy
    with pytest.raises(ValueError, match="top_p"):  # a bad model default is caught too
        SamplingParams().resolve({"top_p": 2.0})


def test_presence_and_frequency_penalties_resolve_from_model_defaults():
    r = SamplingParams(frequency_penalty=0.5).resolve({"presence_penalty": 1.5, "frequency_penalty": 0.1})
    assert (r.presence_penalty, r.frequency_penalty) == (1.5, 0.5)
    assert (SamplingParams().resolve().presence_penalty, SamplingParams().resolve().frequency_penalty) == (0.0, 0.0)
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams().resolve({"presence_penalty": 3.0})


# ---- Sampler: greedy and filters -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_and_padded_columns_masked(dtype):
    torch.manual_seed(1)
    V, pad, B = 37, 3, 5
    logits = torch.randn(B, V + pad).to(dtype)
    logits[:, V:] = 100.0  # padded head columns must never win
    s = make_sampler(V, {i: SamplingParams(temperature=0.0) for i in range(B)})
    out = s.sample(list(range(B)), logits)
    assert out.token_ids == logits[:, :V].float().argmax(dim=-1).tolist()
    assert out.logprobs is None


@pytest.mark.parametrize("temperature", [0.3, 1.0, 7.0])
def test_top_k_1_is_greedy(temperature):
    torch.manual_seed(2)
    V, B = 53, 9
    logits = torch.randn(B, V) * 3
    s = make_sampler(V, {i: SamplingParams(temperature=temperature, top_k=1) for i in range(B)})
    for _ in range(4):
        assert s.sample(list(range(B)), logits).token_ids == logits.argmax(dim=-1).tolist()


def _draw_many(V, params, logits_row, rows=64, steps=16):
    s = make_sampler(V, {i: params for i in range(rows)}, seed=3)
    logits = logits_row.expand(rows, V)
    return [t for _ in range(steps) for t in s.sample(list(range(rows)), logits).token_ids]


def _logits_from_probs(probs, perm):
    """Logits of `probs` placed at token ids `perm` (so the allowed set is not a prefix)."""
    row = torch.full((len(probs),), 0.0)
    row[perm] = torch.tensor(probs).log()
    return row


@pytest.mark.parametrize(
    "params, probs, n_allowed",
    [
        (SamplingParams(top_k=3), [0.3, 0.25, 0.2, 0.15, 0.1], 3),
        # mass before rank 1 = 0.5 < 0.75, before rank 2 = 0.8 >= 0.75: ranks 0, 1 stay
        (SamplingParams(top_p=0.75), [0.5, 0.3, 0.1, 0.05, 0.03, 0.02], 2),
        # threshold 0.4 * 0.4 = 0.16: ranks 0, 1, 2 stay
        (SamplingParams(min_p=0.4), [0.4, 0.3, 0.2, 0.05, 0.05], 3),
        # top_p acts on the top 4 renormalized (/0.9): mass before rank 2 = 0.61 >= 0.58 (unrenormalized: 0.55)
        (SamplingParams(top_k=4, top_p=0.58, temperature=1.0), [0.3, 0.25, 0.2, 0.15, 0.1], 2),
    ],
    ids=["top_k", "top_p", "min_p", "top_k+top_p"],
)
def test_filters_keep_exactly_the_allowed_set(params, probs, n_allowed):
    perm = torch.randperm(len(probs), generator=torch.Generator().manual_seed(4))
    logits_row = _logits_from_probs(probs, perm)
    seen = set(_draw_many(len(probs), params, logits_row))
    allowed = set(perm[:n_allowed].tolist())
    assert seen == allowed  # nothing outside, and every allowed token does occur


@pytest.mark.parametrize(
    "ks, ps",
    [([0, 1, 7, 50, 0, 13], [0.9, 1.0, 0.5, 0.99, 0.3, 1.0]), ([20, 1, 7, 50, 3, 13], [0.8, 1.0, 0.5, 0.99, 0.3, 1.0])],
    ids=["full-sort", "partial-topk"],
)
def test_top_k_top_p_mask_matches_transformers(ks, ps):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(5)
    B, V = 6, 101
    x = torch.randn(B, V) * 2
    max_k = max(ks) if all(ks) else None
    ours = _top_k_top_p(x, torch.tensor(ks, dtype=torch.float32), torch.tensor(ps), max_k)
    for i in range(B):
        ref = x[i : i + 1]
        if ks[i]:
            ref = TopKLogitsWarper(ks[i])(None, ref)
        if ps[i] < 1:
            ref = TopPLogitsWarper(ps[i])(None, ref)
        assert torch.equal(torch.isfinite(ours[i]), torch.isfinite(ref[0])), f"row {i}"


# ---- Sampler: distribution and seeds ---------------------------------------------------------


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_distribution_matches_softmax_over_temperature():
    V, T = 7, 2.5
    logits_row = torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, 1.0, -0.5])
    draws = _draw_many(V, SamplingParams(temperature=T), logits_row, rows=400, steps=10)  # 4000 draws
    counts = torch.bincount(torch.tensor(draws), minlength=V).float()
    # chi-square, 6 degrees of freedom: the 99.9% quantile is 22.46
    assert _chi2(counts, torch.softmax(logits_row / T, -1)) < 22.46
    assert _chi2(counts, torch.softmax(logits_row, -1)) > 200  # the test can tell T apart


def test_same_seed_same_tokens_whatever_the_batch():
    V, steps = 50, 8
    torch.manual_seed(6)
    row = torch.randn(V) * 0.5  # flat-ish, so draws vary
    alone = make_sampler(V, {1: SamplingParams(seed=1234)}, seed=10)
    ref = [alone.sample([1], row[None]).token_ids[0] for _ in range(steps)]

    others = {5: SamplingParams(), 7: SamplingParams(seed=99), 8: SamplingParams(temperature=0)}
    mixed = make_sampler(V, {**others, 1: SamplingParams(seed=1234)}, seed=11)
    got = []
    orders = [[5, 1, 7, 8], [1, 8], [7, 5, 8, 1], [8, 7, 1], [1], [5, 7, 1, 8], [1, 5], [8, 5, 7, 1]]
    for order in orders:
        logits = torch.randn(len(order), V)
        logits[order.index(1)] = row
        got.append(mixed.sample(order, logits).token_ids[order.index(1)])
    assert got == ref
    other = make_sampler(V, {1: SamplingParams(seed=4321)})
    assert [other.sample([1], row[None]).token_ids[0] for _ in range(steps)] != ref


# ---- Sampler: one tie rule, any finite logits -------------------------------------------------


def _tied_row(V: int = 40) -> torch.Tensor:
    """Logits whose 5th..8th best tokens tie: top_k=6 cuts through the tie."""
    row = torch.linspace(-3.0, -1.0, V)
    row[[7, 21, 3, 30]] = torch.tensor([3.0, 2.5, 2.0, 1.5])  # ranks 0-3
    row[[11, 5, 38, 17]] = 1.0  # ranks 4-7, tied
    return row


@pytest.mark.parametrize("max_k", [None, 6, 9, 40], ids=["full-sort", "topk-6", "topk-9", "topk-V"])
def test_top_k_keeps_every_token_tied_with_the_kth_on_every_path(max_k):
    from transformers.generation.logits_process import TopKLogitsWarper

    row = _tied_row()
    kept = _top_k_top_p(row[None], torch.tensor([6.0]), torch.tensor([1.0]), max_k)[0].isfinite()
    assert set(kept.nonzero()[:, 0].tolist()) == {7, 21, 3, 30, 11, 5, 38, 17}
    assert torch.equal(kept, TopKLogitsWarper(6)(None, row[None])[0].isfinite())


@pytest.mark.parametrize("max_k", [None, 3, 8])
def test_top_p_keeps_or_drops_tied_tokens_together(max_k):
    """Eight tokens of equal probability: top_p 0.3 needs three of them by mass; all eight tie, so all
    stay (no sort order decides which of equal tokens survive)."""
    row = torch.full((20,), -30.0)
    row[[2, 4, 6, 8, 10, 12, 14, 16]] = 0.0
    top_k = torch.tensor([float(max_k or 0)])
    kept = _top_k_top_p(row[None], top_k, torch.tensor([0.3]), max_k)[0].isfinite()
    assert kept.nonzero()[:, 0].tolist() == [2, 4, 6, 8, 10, 12, 14, 16]
    row[2] = 0.5  # now one token is strictly ahead: mass 0.19 < 0.3, so the tied rest still all stay
    kept = _top_k_top_p(row[None], top_k, torch.tensor([0.3]), max_k)[0].isfinite()
    assert kept.nonzero()[:, 0].tolist() == [2, 4, 6, 8, 10, 12, 14, 16]
    row[2] = 3.0  # mass 0.74 >= 0.3 ahead of the tie: the whole tie goes
    assert _top_k_top_p(row[None], top_k, torch.tensor([0.3]), max_k)[0].isfinite().nonzero()[:, 0].tolist() == [2]


def test_seeded_top_k_request_is_the_same_whatever_its_neighbours():
    """The same seeded top_k=6 request over tied logits, alone (partial topk), beside a top_k=0 row (full
    sort), beside a larger top_k and beside top_p/min_p rows: the same tokens, and the tied tokens are drawn."""
    V, steps = 40, 40
    row = _tied_row(V) * 0.4  # flat enough that all eight survivors get drawn
    request = SamplingParams(seed=77, top_k=6)
    neighbours = [{}, {5: SamplingParams(top_k=0)}, {5: SamplingParams(top_k=30), 6: SamplingParams(top_k=2)},
                  {5: SamplingParams(top_p=0.5), 6: SamplingParams(min_p=0.2, top_k=0)},
                  {5: SamplingParams(temperature=0), 6: SamplingParams(seed=3, top_k=9, top_p=0.9)}]
    runs = []
    for others in neighbours:
        s = make_sampler(V, {**others, 1: request}, seed=len(runs))
        order = [1, *others]
        tokens = []
        for step in range(steps):
            logits = torch.randn(len(order), V, generator=torch.Generator().manual_seed(step))
            logits[0] = row
            tokens.append(s.sample(order, logits).token_ids[0])
        runs.append(tokens)
    assert all(r == runs[0] for r in runs[1:])
    assert {11, 5, 38, 17} <= set(runs[0]) <= {7, 21, 3, 30, 11, 5, 38, 17}


@pytest.mark.parametrize("temperature", [1e-38, 1e-20, 1e-6])
def test_vanishing_temperature_is_greedy(temperature):
    """temperature=1e-38 over logits near 30 used to overflow to NaN and return token 0."""
    params = SamplingParams(temperature=temperature, top_k=20, top_p=0.9, seed=1)
    assert params.greedy and params.resolve().greedy
    torch.manual_seed(9)
    logits = 30 + torch.randn(4, 50)
    s = make_sampler(50, {i: params for i in range(4)})
    assert s.sample(list(range(4)), logits).token_ids == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=2e-5).greedy  # the threshold is 1e-5


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=2e-5), SamplingParams(temperature=0.5, top_k=3),
    SamplingParams(temperature=7.0, top_p=0.5), SamplingParams(min_p=0.5, repetition_penalty=0.5),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=4)], ids=lambda p: repr(p)[15:60])
def test_any_finite_logits_are_safe(params):
    """Huge logits (a penalty below 1 doubles them past float32's max), a vanishing gap, and rows with
    all but one token at -inf: always a valid token, the only possible one when one is left."""
    V, big = 30, 3e38
    rows = torch.full((5, V), -big)
    rows[0, 17] = big  # +-3e38
    rows[1] = torch.linspace(-1.0, 1.0, V) * big
    rows[2, :] = -math.inf
    rows[2, 4] = -big  # all but one masked, the survivor hugely negative
    rows[3, :] = -math.inf
    rows[3, 29] = 31.0
    rows[4] = 30.0
    rows[4, 11] = 30.0 + 1e-5  # a gap of 1e-5 over 2e-5 of temperature
    s = make_sampler(V, {i: params for i in range(5)}, prompts={i: [17, 29] for i in range(5)})
    for _ in range(5):
        out = s.sample(list(range(5)), rows).token_ids
        assert out[:4] == [17, 29, 4, 29], out
        assert 0 <= out[4] < V


# ---- Sampler: repetition penalty -------------------------------------------------------------


def test_repetition_penalty_changes_argmax_over_prompt_and_history():
    V = 11
    row = torch.full((V,), -3.0)
    row[3], row[5], row[8] = 2.0, 1.8, 1.2
    s = make_sampler(V, {0: SamplingParams(temperature=0, repetition_penalty=2.0)}, prompts={0: [3, 10]})
    # step 1: 3 is in the prompt -> 1.0 < 1.8; step 2: 5 was generated -> 0.9, 3 -> 1.0 < 1.2;
    # step 3: 8 -> 0.6, so 3 (1.0) wins again
    assert [s.sample([0], row[None]).token_ids[0] for _ in range(3)] == [5, 8, 3]
    s.remove(0)  # a new sequence in the freed slot does not inherit the history
    s.add(1, SamplingParams(temperature=0, repetition_penalty=2.0).resolve(), [])
    assert s.sample([1], row[None]).token_ids == [3]


def test_repetition_penalty_negative_logits_multiplied():
    V = 6
    row = torch.tensor([-4.0, -1.0, -5.0, -1.5, -6.0, -7.0])
    seqs = {0: SamplingParams(temperature=0, repetition_penalty=2.0), 1: SamplingParams(temperature=0)}
    s = make_sampler(V, seqs, prompts={0: [1], 1: [1]})
    assert s.sample([0, 1], row.expand(2, V)).token_ids == [3, 1]  # -1 * 2 = -2 < -1.5; row 1 unpenalized


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(7)
    V, B = 29, 8
    logits = torch.randn(B, V) * 2
    prompts = {i: torch.randint(0, V, (5,)).tolist() for i in range(B)}
    s = make_sampler(V, {i: SamplingParams(temperature=0, repetition_penalty=1.7) for i in range(B)}, prompts)
    out = s.sample(list(range(B)), logits).token_ids
    proc = RepetitionPenaltyLogitsProcessor(1.7)
    ref = [int(proc(torch.tensor([prompts[i]]), logits[i : i + 1].clone()).argmax()) for i in range(B)]
    assert out == ref


# ---- Sampler: presence and frequency penalties ----------------------------------------------


def test_presence_penalty_counts_generated_tokens_only():
    V = 7
    row = torch.tensor([0.0, 3.0, 2.5, 2.0, 1.9, -1.0, -2.0])
    s = make_sampler(V, {0: SamplingParams(temperature=0, presence_penalty=1.5)}, prompts={0: [1, 2]})
    # the prompt's 1 is not penalized: 1 (3.0); then 2 (2.5 > 1.5); 3 (2.0); 4 (1.9); then 1 again
    # (1.5 > 1.0, 0.5, 0.4): a presence penalty does not grow with the count
    assert [s.sample([0], row[None]).token_ids[0] for _ in range(5)] == [1, 2, 3, 4, 1]
    s.remove(0)  # a new sequence in the freed row starts with no counts
    s.add(1, SamplingParams(temperature=0, frequency_penalty=2.0).resolve(), [])
    assert s.sample([1], row[None]).token_ids == [1]


def test_penalties_match_the_openai_rule_in_mixed_batches():
    """Greedy tokens over 12 steps equal the rule applied row by row: HF repetition penalty over
    prompt + generated, then logit -= frequency * count + presence * (count > 0) over generated."""
    torch.manual_seed(3)
    V, B, steps = 23, 6, 12
    params = [SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=0, frequency_penalty=0.7),
              SamplingParams(temperature=0, presence_penalty=-0.5, frequency_penalty=1.5),
              SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.9),
              SamplingParams(temperature=0, frequency_penalty=-0.3)]
    prompts = {i: torch.randint(0, V, (4,)).tolist() for i in range(B)}
    s = make_sampler(V, dict(enumerate(params)), prompts)
    history: dict[int, list[int]] = {i: [] for i in range(B)}
    for _ in range(steps):
        logits = torch.randn(B, V)
        rows = [i for i in range(B) if torch.rand(()) < 0.8]  # not every row in every step
        if not rows:
            continue
        got = s.sample(rows, logits[rows]).token_ids
        for i, token in zip(rows, got):
            p, x = params[i].resolve(), logits[i].clone()
            seen = set(prompts[i]) | set(history[i])
            for v in seen:
                x[v] = x[v] / p.repetition_penalty if x[v] > 0 else x[v] * p.repetition_penalty
            for v in set(history[i]):
                x[v] -= p.frequency_penalty * history[i].count(v) + p.presence_penalty
            assert token == int(x.argmax()), (i, history[i])
            history[i].append(token)
    assert any(len(set(h)) < len(h) for h in history.values())  # some token came back: counts were exercised


# ---- Sampler: logprobs -----------------------------------------------------------------------


def test_logprobs_chosen_plus_top_k_of_raw_distribution():
    torch.manual_seed(8)
    V, k = 31, 3
    logits = torch.randn(4, V + 5)  # padded head
    logits[:, V:] = 50.0
    raw_order = logits[2, :V].argsort(descending=True).tolist()
    seqs = {
        0: SamplingParams(temperature=0, logprobs=k),  # chosen = argmax, inside the top k
        1: SamplingParams(temperature=0.8, seed=3),  # did not ask
        # penalty pushes the top 3 raw tokens down: chosen is outside the raw top k
        2: SamplingParams(temperature=0, logprobs=k, repetition_penalty=1000.0),
        3: SamplingParams(logprobs=0),
    }
    s = make_sampler(V, seqs, prompts={2: raw_order[:3]})
    out = s.sample([0, 1, 2, 3], logits)
    ref = logits[:, :V].log_softmax(dim=-1)
    assert out.logprobs[1] is None
    assert len(out.logprobs[0]) == k and len(out.logprobs[2]) == k + 1 and len(out.logprobs[3]) == 1
    assert out.token_ids[2] == raw_order[3]
    for i in (0, 2, 3):
        d = out.logprobs[i]
        assert out.token_ids[i] in d
        for tok, lp in d.items():
            assert math.isclose(lp, float(ref[i, tok]), rel_tol=1e-5, abs_tol=1e-6)
    for i in (0, 2):
        assert set(ref[i].topk(k).indices.tolist()) <= set(out.logprobs[i])


# ---- Sampler: misuse -------------------------------------------------------------------------


def test_sampler_rejects_misuse():
    s = Sampler(10, CPU)
    with pytest.raises(ValueError, match="resolve"):
        s.add(0, SamplingParams(), [])
    s.add(0, SamplingParams(repetition_penalty=1.2).resolve(), [1])
    with pytest.raises(ValueError, match="already"):
        s.add(0, SamplingParams().resolve(), [])
    with pytest.raises(ValueError, match="prompt_ids"):
        s.add(1, SamplingParams(repetition_penalty=1.2).resolve(), [10])
    with pytest.raises(ValueError, match="vocab_size"):
        s.sample([0], torch.zeros(1, 9))
    with pytest.raises(ValueError, match="logits"):
        s.sample([0], torch.zeros(2, 10))
    with pytest.raises(KeyError):
        s.sample([5], torch.zeros(1, 10))
