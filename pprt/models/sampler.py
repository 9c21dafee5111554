"""The batched `Sampler` of the last stage.

`Sampler` lives on the device holding the logits (logits never leave it) and
keeps per-sequence state between steps: a token-presence row for repetition
penalty (prompt + generated), a row of generated-token counts for presence and
frequency penalties, and, for seeded requests, a private generator.
Per step and per row, in the order transformers and vLLM use:

    repetition penalty (HF rule) -> presence / frequency penalties (OpenAI rule)
        -> temperature -> top_k -> top_p -> min_p -> draw

The OpenAI rule (platform.openai.com, "Parameter details" of the API guide, as
vLLM applies it): logit[v] -= frequency_penalty * c[v] + presence_penalty * (c[v] > 0),
where c[v] counts v among the tokens generated so far (not the prompt).

Greedy rows (`SamplingParams.greedy`: temperature 0, or below
GREEDY_TEMPERATURE) take the argmax of the penalized logits. Draws use the
exponential race, argmax(p / q) with q ~ Exp(1), which is exactly a
categorical draw from p; a seeded row draws its q from its own generator and
every filter decides from its own row alone (one top_k tie rule, one top_p
rule, whatever path the batch takes), so its tokens do not depend on which
other rows share the batch. Any finite logits are safe: each row is shifted
so its best token is at 0 before the temperature divides it, so nothing
overflows (logits of 1e38, all but one token at -inf).

Logprobs are those of the model's distribution: log_softmax of the RAW
logits (before penalty, temperature and filters), as vLLM reports them.
Columns >= vocab_size (a padded head) are never sampled nor reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..params import SamplingParams


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]  # one per row
    logprobs: list[dict[int, float] | None] | None  # None when no row asked; None entries for rows that did not


@dataclass(slots=True)
class _SeqState:
    params: SamplingParams
    slot: int | None  # row of the presence pool; None when repetition_penalty == 1
    count_slot: int | None  # row of the counts pool; None when presence and frequency penalties are 0
    generator: torch.Generator | None  # only for seeded requests


class _RowPool:
    """Rows of a [slots, V] tensor handed to sequences; a returned row is zeroed. Grows geometrically."""

    def __init__(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows = torch.zeros(0, vocab_size, dtype=dtype, device=device)  # [slots, V]
        self._free: list[int] = []

    def take(self) -> int:
        if not self._free:
            old, V = self.rows.shape
            new = max(4, 2 * old)
            grown = torch.zeros(new, V, dtype=self.rows.dtype, device=self.rows.device)
            grown[:old] = self.rows
            self.rows = grown
            self._free = list(range(new - 1, old - 1, -1))
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self.rows[slot] = 0
        self._free.append(slot)


class Sampler:
    """Batched, stateful sampler for the sequences of the last stage."""

    def __init__(self, vocab_size: int, device: torch.device | str, seed: int | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._seqs: dict[int, _SeqState] = {}
        # one row per repetition-penalized sequence: has token v appeared (prompt or generated)
        self._presence = _RowPool(vocab_size, torch.bool, self.device)  # [slots, V]
        # one row per presence/frequency-penalized sequence: how often v was generated
        self._counts = _RowPool(vocab_size, torch.float32, self.device)  # [slots, V]
        self._gen = torch.Generator(device=self.device)  # for rows without a seed
        if seed is None:
            self._gen.seed()
        else:
            self._gen.manual_seed(seed)

    def add(self, seq_id: int, params: SamplingParams, prompt_ids: list[int]) -> None:
        if seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id} is already in the sampler")
        if not params.resolved:
            raise ValueError(f"seq {seq_id}: SamplingParams must be resolved first (params.resolve(defaults))")
        slot = None
        if params.repetition_penalty != 1.0:
            ids = torch.as_tensor(prompt_ids, dtype=torch.long).to(self.device)
            if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise ValueError(f"seq {seq_id}: prompt_ids must lie in [0, {self.vocab_size})")
            slot = self._presence.take()
            self._presence.rows[slot, ids] = True
        count_slot = None
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            count_slot = self._counts.take()
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        self._seqs[seq_id] = _SeqState(params, slot, count_slot, gen)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def remove(self, seq_id: int) -> None:
        state = self._seqs.pop(seq_id)
        if state.slot is not None:
            self._presence.give_back(state.slot)
        if state.count_slot is not None:
            self._counts.give_back(state.count_slot)

    @torch.no_grad()
    def sample(self, seq_ids: list[int], logits: torch.Tensor) -> SampleOutput:
        """Draw one token per row of `logits` [B, >= vocab_size]; row i is seq_ids[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(seq_ids):
            raise ValueError(f"logits must be [len(seq_ids)={len(seq_ids)}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size {self.vocab_size}")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids has duplicates: {seq_ids}")
        states = [self._seqs[s] for s in seq_ids]
        raw = logits[:, : self.vocab_size].float()  # [B, V]; padded head columns dropped
        tokens = self._choose(raw, states)  # [B]
        logprobs = self._logprobs(raw, tokens, states)
        self._record(tokens, states)
        return SampleOutput(token_ids=tokens.tolist(), logprobs=logprobs)

    def _choose(self, raw: torch.Tensor, states: list[_SeqState]) -> torch.Tensor:
        ps = [s.params for s in states]
        x = self._penalize(raw, states)  # [B, V]
        greedy = [p.greedy for p in ps]
        if all(greedy):
            return x.argmax(dim=-1)
        argmax = x.argmax(dim=-1) if any(greedy) else None  # [B], for the greedy rows
        probs = self.distribution(x, states)  # [B, V]
        q = torch.empty_like(probs).exponential_(generator=self._gen)  # [B, V]
        for i, s in enumerate(states):
            if s.generator is not None and not greedy[i]:
                q[i].exponential_(generator=s.generator)
        drawn = (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # [B]
        if argmax is None:
            return drawn
        return torch.where(torch.tensor(greedy).to(self.device), argmax, drawn)

    def distribution(self, x: torch.Tensor, states: list[_SeqState]) -> torch.Tensor:
        """The distribution rows are drawn from: temperature, top_k, top_p, min_p over the
        (penalized) fp32 logits x [B, V]; returns probabilities [B, V] (greedy rows: temperature 1)."""
        ps = [s.params for s in states]
        # per-row knobs in one host->device copy: [B, 4] = temperature, top_p, top_k, min_p
        knobs = torch.tensor(
            [[1.0 if p.greedy else p.temperature, p.top_p, p.top_k, p.min_p] for p in ps], dtype=torch.float32
        ).to(self.device)
        temp, top_p, top_k, min_p = knobs.unbind(dim=1)  # [B] each
        # best token at 0, the rest <= 0: exp never overflows, whatever the logits and temperature
        x = x.clamp(max=torch.finfo(x.dtype).max)  # a penalty < 1 may have doubled a huge logit to inf
        x = (x - x.amax(dim=-1, keepdim=True)) / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in ps):
            # every row top_k-limited (Qwen's defaults are): a partial topk, not a full sort
            max_k = max(p.top_k for p in ps) if all(p.top_k > 0 for p in ps) else None
            x = _top_k_top_p(x, top_k, top_p, max_k)
        if any(p.min_p > 0 for p in ps):
            probs = x.softmax(dim=-1)
            x = x.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), -math.inf)
        return x.softmax(dim=-1)  # [B, V]

    def _penalize(self, raw: torch.Tensor, states: list[_SeqState]) -> torch.Tensor:
        """The penalties on a copy of `raw` [B, V] (raw itself is left as is):
        HF repetition penalty (seen tokens' logits divided by the penalty if > 0, multiplied if < 0),
        then OpenAI presence and frequency penalties (subtracted, by generated counts)."""
        out = raw
        rows = [i for i, s in enumerate(states) if s.slot is not None]
        if rows:
            rows_t = torch.tensor(rows).to(self.device)
            slots = torch.tensor([states[i].slot for i in rows]).to(self.device)
            pen = torch.tensor([states[i].params.repetition_penalty for i in rows], dtype=torch.float32)
            pen = pen.to(self.device)[:, None]  # [R, 1]
            sub = out[rows_t]  # [R, V]
            seen = self._presence.rows[slots]  # [R, V]
            out = out.clone()
            out[rows_t] = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
        rows = [i for i, s in enumerate(states) if s.count_slot is not None]
        if rows:
            rows_t = torch.tensor(rows).to(self.device)
            slots = torch.tensor([states[i].count_slot for i in rows]).to(self.device)
            pen = torch.tensor([[states[i].params.frequency_penalty, states[i].params.presence_penalty]
                                for i in rows], dtype=torch.float32).to(self.device)  # [R, 2]
            counts = self._counts.rows[slots]  # [R, V]
            sub = out[rows_t] - pen[:, :1] * counts - pen[:, 1:] * (counts > 0)
            out = out.clone() if out is raw else out
            out[rows_t] = sub
        return out

    def _logprobs(
        self, raw: torch.Tensor, tokens: torch.Tensor, states: list[_SeqState]
    ) -> list[dict[int, float] | None] | None:
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not rows:
            return None
        rows_t = torch.tensor(rows).to(self.device)
        lp = raw[rows_t].log_softmax(dim=-1)  # [A, V], the model's distribution
        chosen = lp.gather(1, tokens[rows_t, None])[:, 0]  # [A]
        k = min(max(states[i].params.logprobs for i in rows), self.vocab_size)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [A, k]
        chosen_l, tok_l, top_vl, top_il = chosen.tolist(), tokens[rows_t].tolist(), top_v.tolist(), top_i.tolist()
        out: list[dict[int, float] | None] = [None] * len(states)
        for a, i in enumerate(rows):
            d = {tok_l[a]: chosen_l[a]}
            kk = states[i].params.logprobs
            d.update(zip(top_il[a][:kk], top_vl[a][:kk]))
            out[i] = d
        return out

    def _record(self, tokens: torch.Tensor, states: list[_SeqState]) -> None:
        """Add each penalized row's new token to its presence row and its counts row."""
        rows = [i for i, s in enumerate(states) if s.slot is not None]
        if rows:
            slots = torch.tensor([states[i].slot for i in rows]).to(self.device)
            self._presence.rows[slots, tokens[torch.tensor(rows).to(self.device)]] = True
        rows = [i for i, s in enumerate(states) if s.count_slot is not None]
        if rows:  # one token per row: (slot, token) pairs are distinct
            slots = torch.tensor([states[i].count_slot for i in rows]).to(self.device)
            self._counts.rows[slots, tokens[torch.tensor(rows).to(self.device)]] += 1


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_k: int | None) -> torch.Tensor:
    """Mask to -inf what top_k and then top_p remove; x: [B, V]; top_k, top_p: [B].

    top_k (0 = off) keeps every token whose logit is >= the k-th largest: tokens tied
    with the k-th all stay (transformers' TopKLogitsWarper and vLLM keep them too). The
    rule is the same on every path: `max_k` (every row has 0 < top_k <= max_k) only lets
    the k-th value come from a partial topk instead of a full sort.
    top_p (1 = off) then keeps a token when the renormalized mass of the tokens strictly
    more likely than it is < top_p (transformers' TopPLogitsWarper on untied logits);
    tokens tied in value are kept or dropped together, so the order a sort gives equal
    values never matters.
    """
    B, V = x.shape
    K = V if max_k is None else min(max_k, V)
    best, order = x.topk(K, dim=-1) if K < V else x.sort(dim=-1, descending=True)  # [B, K], descending
    k = torch.where(top_k > 0, top_k, float(K)).clamp(max=K).long()  # [B]
    kth = best.gather(1, (k - 1)[:, None])  # [B, 1]
    if not bool((top_p < 1).any()):
        return x.masked_fill(x < kth, -math.inf)  # ties with the k-th stay
    n = int((x >= kth).sum(dim=-1).max())  # survivors of the fullest row
    if n > K:  # ties with the k-th reach past the max_k best: rank the survivors again
        best, order = x.topk(n, dim=-1)
    xs = best.masked_fill(best < kth, -math.inf)  # [B, K or n], descending; every survivor is in it
    probs = xs.softmax(dim=-1)
    ahead = probs.cumsum(dim=-1) - probs  # mass ranked before each token
    # a run of equal values takes the mass before its first member: the strictly better tokens
    starts = torch.ones_like(xs, dtype=torch.bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    first = torch.where(starts, torch.arange(xs.shape[1], device=x.device), 0).cummax(dim=-1).values
    ahead = ahead.gather(1, first)
    p = torch.where(top_p < 1, top_p, math.inf)[:, None]  # top_p == 1: never cut (cumsum rounding)
    xs = xs.masked_fill(ahead >= p, -math.inf)
    return torch.full_like(x, -math.inf).scatter_(1, order, xs)
