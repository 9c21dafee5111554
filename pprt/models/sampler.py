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
categorical draw from p. Rows without a seed take q from the sampler's
generator. A seeded row's q is a counter-based stream of (seed, the row's
draw count, v) (pprt_kernels.seeded_noise: splitmix64, one launch for all
seeded rows), so its tokens depend on its seed alone, not on which other rows
share the batch nor on the device (integer math). Every filter
decides from its own row alone (one top_k tie rule, one top_p rule, whatever
path the batch takes). Any finite logits are safe: each row is shifted so its
best token is at 0 before the temperature divides it, so nothing overflows
(logits of 1e38, all but one token at -inf).

Per step, the rows' settings reach the device in one copy
(pprt.models.staging), penalties touch only the penalized rows, and the host
reads the device once: the sampled ids with the logprobs asked for.

Logprobs are those of the model's distribution: log_softmax of the RAW
logits (before penalty, temperature and filters), as vLLM reports them.
Columns >= vocab_size (a padded head) are never sampled nor reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pprt_kernels.seeded_noise import seeded_noise, stream_start

from ..params import SamplingParams
from .staging import Layout, Uploader


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]  # one per row
    logprobs: list[dict[int, float] | None] | None  # None when no row asked; None entries for rows that did not


@dataclass(slots=True)
class _SeqState:
    params: SamplingParams
    slot: int | None  # row of the presence pool; None when repetition_penalty == 1
    count_slot: int | None = None  # row of the counts pool; None when presence and frequency penalties are 0
    # seeded requests: a generator of their own for speculative acceptance (pprt.models.speculative);
    # their sampled draws come from the counter-based stream
    generator: torch.Generator | None = None
    draws: int = 0  # tokens drawn so far: a seeded row's position in its stream


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
        self._uploader = Uploader(self.device)
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
            if prompt_ids and (min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size):
                raise ValueError(f"seq {seq_id}: prompt_ids must lie in [0, {self.vocab_size})")
            slot = self._presence.take()
            ids = self._uploader.send(Layout([("ids", torch.int64, len(prompt_ids))]), {"ids": prompt_ids})["ids"]
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
        rows = _Rows(states)
        f = self._upload(rows, states)
        lp = raw.index_select(0, f["lp_rows"]).log_softmax(dim=-1) if rows.logprobs else None  # [A, V]
        tokens = self._choose(raw, states, rows, f)  # [B]
        self._record(tokens, rows, f)
        for s in states:
            s.draws += 1
        return self._read(tokens, lp, states, rows, f)

    def _upload(self, rows: _Rows, states: list[_SeqState]) -> dict[str, torch.Tensor]:
        """Every per-row setting of the step on the device, in one copy."""
        ps = [s.params for s in states]
        B, U, R, C, S = len(states), len(rows.penalized), len(rows.repeated), len(rows.counted), len(rows.seeded)
        at = {row: j for j, row in enumerate(rows.penalized)}  # a penalized row's place among them
        layout = Layout([("knobs", torch.float32, 4 * B), ("pen", torch.float32, R), ("fp", torch.float32, 2 * C),
                         ("greedy", torch.int64, B), ("pen_rows", torch.int64, U), ("rep_rows", torch.int64, R),
                         ("rep_at", torch.int64, R), ("rep_slots", torch.int64, R), ("cnt_rows", torch.int64, C),
                         ("cnt_at", torch.int64, C), ("cnt_slots", torch.int64, C), ("seeded", torch.int64, S),
                         ("starts", torch.int64, S), ("lp_rows", torch.int64, len(rows.logprobs))])
        return self._uploader.send(layout, {
            "knobs": _knobs(ps), "pen": [ps[i].repetition_penalty for i in rows.repeated],
            "fp": [v for i in rows.counted for v in (ps[i].frequency_penalty, ps[i].presence_penalty)],
            "greedy": [p.greedy for p in ps], "pen_rows": rows.penalized,
            "rep_rows": rows.repeated, "rep_at": [at[i] for i in rows.repeated],
            "rep_slots": [states[i].slot for i in rows.repeated],
            "cnt_rows": rows.counted, "cnt_at": [at[i] for i in rows.counted],
            "cnt_slots": [states[i].count_slot for i in rows.counted], "seeded": rows.seeded,
            "starts": [stream_start(ps[i].seed, states[i].draws) for i in rows.seeded], "lp_rows": rows.logprobs})

    def _choose(self, raw: torch.Tensor, states: list[_SeqState], rows: _Rows,
                f: dict[str, torch.Tensor]) -> torch.Tensor:
        ps = [s.params for s in states]
        B = raw.shape[0]
        sub = self._penalize(raw, rows, f)  # [R, V] the penalized rows, or None
        greedy = [p.greedy for p in ps]
        argmax = None
        if any(greedy):  # [B], for the greedy rows
            argmax = raw.argmax(dim=-1)
            if sub is not None:
                argmax.index_copy_(0, f["pen_rows"], sub.argmax(dim=-1))
            if all(greedy):
                return argmax
        fmax = torch.finfo(raw.dtype).max
        x = raw.clamp(max=fmax)  # [B, V]; a penalty < 1 may have doubled a huge logit to inf
        if sub is not None:
            x.index_copy_(0, f["pen_rows"], sub.clamp_(max=fmax))
        probs = _probs(x, ps, f["knobs"].view(B, 4))  # [B, V]
        q = torch.empty_like(probs).exponential_(generator=self._gen)  # [B, V]
        if rows.seeded:  # every seeded row's own stream, in one launch
            seeded_noise(f["starts"], f["seeded"], q)
        drawn = (probs / q.clamp_min(torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # [B]
        if argmax is None:
            return drawn
        return torch.where(f["greedy"] != 0, argmax, drawn)

    def distribution(self, x: torch.Tensor, states: list[_SeqState]) -> torch.Tensor:
        """The distribution rows are drawn from: temperature, top_k, top_p, min_p over the
        (penalized) fp32 logits x [B, V] (left as they are); returns probabilities [B, V]
        (greedy rows: temperature 1)."""
        ps = [s.params for s in states]
        layout = Layout([("knobs", torch.float32, 4 * len(ps))])
        knobs = self._uploader.send(layout, {"knobs": _knobs(ps)})["knobs"].view(len(ps), 4)
        return _probs(x.clamp(max=torch.finfo(x.dtype).max), ps, knobs)

    def _penalize(self, raw: torch.Tensor, rows: _Rows, f: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The penalized rows [U, V] (rows.penalized; None when there are none), `raw` left as is:
        HF repetition penalty (seen tokens' logits divided by the penalty if > 0, multiplied if
        < 0), then OpenAI presence and frequency penalties (subtracted, by generated counts)."""
        if not rows.penalized:
            return None
        sub = raw.index_select(0, f["pen_rows"])  # [U, V]
        if rows.repeated:
            every = len(rows.repeated) == len(rows.penalized)
            x = sub if every else sub.index_select(0, f["rep_at"])  # [R, V]
            pen = f["pen"][:, None]  # [R, 1]
            seen = self._presence.rows.index_select(0, f["rep_slots"])  # [R, V]
            x = torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)
            sub = x if every else sub.index_copy_(0, f["rep_at"], x)
        if rows.counted:
            every = len(rows.counted) == len(rows.penalized)
            x = sub if every else sub.index_select(0, f["cnt_at"])  # [C, V]
            pen = f["fp"].view(-1, 2)  # [C, 2] frequency, presence
            counts = self._counts.rows.index_select(0, f["cnt_slots"])  # [C, V]
            x = x - pen[:, :1] * counts - pen[:, 1:] * (counts > 0)
            sub = x if every else sub.index_copy_(0, f["cnt_at"], x)
        return sub

    def _read(self, tokens: torch.Tensor, lp: torch.Tensor | None, states: list[_SeqState], rows: _Rows,
              f: dict[str, torch.Tensor]) -> SampleOutput:
        """The sampled ids and the logprobs asked for, read from the device at once."""
        if lp is None:
            return SampleOutput(token_ids=tokens.tolist(), logprobs=None)
        B, A = len(states), len(rows.logprobs)
        chosen = lp.gather(1, tokens.index_select(0, f["lp_rows"])[:, None])[:, 0]  # [A]
        k = min(max(states[i].params.logprobs for i in rows.logprobs), self.vocab_size)
        top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [A, k]
        # ids and logprobs in one float64 read (ids < 2**53 are exact)
        flat = torch.cat([tokens.double(), chosen.double(), top_v.double().flatten(), top_i.double().flatten()])
        values = flat.tolist()
        token_ids = [int(t) for t in values[:B]]
        chosen_l = values[B:B + A]
        top_vl, top_il = values[B + A:B + A + A * k], values[B + A + A * k:]
        out: list[dict[int, float] | None] = [None] * B
        for a, i in enumerate(rows.logprobs):
            d = {token_ids[i]: chosen_l[a]}
            kk = states[i].params.logprobs
            d.update(zip((int(t) for t in top_il[a * k:a * k + kk]), top_vl[a * k:a * k + kk]))
            out[i] = d
        return SampleOutput(token_ids=token_ids, logprobs=out)

    def _record(self, tokens: torch.Tensor, rows: _Rows, f: dict[str, torch.Tensor]) -> None:
        """Add each penalized row's new token to its presence row and its counts row."""
        if rows.repeated:
            self._presence.rows[f["rep_slots"], tokens.index_select(0, f["rep_rows"])] = True
        if rows.counted:  # one token per row: (slot, token) pairs are distinct
            self._counts.rows[f["cnt_slots"], tokens.index_select(0, f["cnt_rows"])] += 1


def _knobs(ps: list[SamplingParams]) -> list[float]:
    """Per row: temperature (1 for greedy rows), top_p, top_k, min_p."""
    return [v for p in ps for v in (1.0 if p.greedy else p.temperature, p.top_p, p.top_k, p.min_p)]


def _probs(x: torch.Tensor, ps: list[SamplingParams], knobs: torch.Tensor) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p over logits x [B, V] (overwritten; no +inf); knobs [B, 4]
    as `_knobs` lays them out. Returns probabilities [B, V]."""
    temp, top_p, top_k, min_p = knobs.unbind(dim=1)  # [B] each
    # best token at 0, the rest <= 0: exp never overflows, whatever the logits and temperature
    x = x.sub_(x.amax(dim=-1, keepdim=True)).div_(temp[:, None])
    any_top_p = any(p.top_p < 1 for p in ps)
    if any_top_p or any(p.top_k > 0 for p in ps):
        # every row top_k-limited (Qwen's defaults are): a partial topk, not a full sort
        max_k = max(p.top_k for p in ps) if all(p.top_k > 0 for p in ps) else None
        x = _top_k_top_p(x, top_k, top_p, max_k, any_top_p)
    if any(p.min_p > 0 for p in ps):
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), -math.inf)
    return x.softmax(dim=-1)  # [B, V]


class _Rows:
    """Which rows of a step need what (host lists of row indices)."""

    __slots__ = ("penalized", "repeated", "counted", "seeded", "logprobs")

    def __init__(self, states: list[_SeqState]):
        self.repeated = [i for i, s in enumerate(states) if s.slot is not None]  # repetition penalty
        self.counted = [i for i, s in enumerate(states) if s.count_slot is not None]  # presence / frequency
        self.penalized = sorted(set(self.repeated) | set(self.counted))
        self.seeded = [i for i, s in enumerate(states) if s.params.seed is not None and not s.params.greedy]
        self.logprobs = [i for i, s in enumerate(states) if s.params.logprobs is not None]


def _top_k_top_p(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_k: int | None,
                 any_top_p: bool | None = None) -> torch.Tensor:
    """Mask to -inf what top_k and then top_p remove; x: [B, V]; top_k, top_p: [B].

    top_k (0 = off) keeps every token whose logit is >= the k-th largest: tokens tied
    with the k-th all stay (transformers' TopKLogitsWarper and vLLM keep them too). The
    rule is the same on every path: `max_k` (every row has 0 < top_k <= max_k) only lets
    the k-th value come from a partial topk instead of a full sort.
    top_p (1 = off) then keeps a token when the renormalized mass of the tokens strictly
    more likely than it is < top_p (transformers' TopPLogitsWarper on untied logits);
    tokens tied in value are kept or dropped together, so the order a sort gives equal
    values never matters. Ties with the k-th that reach past the max_k best share the
    k-th token's fate and count in the renormalization (found without reading the device).
    any_top_p: whether some row has top_p < 1 (None: read it from top_p).
    """
    B, V = x.shape
    K = V if max_k is None else min(max_k, V)
    best, order = x.topk(K, dim=-1) if K < V else x.sort(dim=-1, descending=True)  # [B, K], descending
    k = torch.where(top_k > 0, top_k, float(K)).clamp(max=K).long()  # [B]
    kth = best.gather(1, (k - 1)[:, None])  # [B, 1]
    if any_top_p is None:
        any_top_p = bool((top_p < 1).any())
    if not any_top_p:
        return x.masked_fill(x < kth, -math.inf)  # ties with the k-th stay
    listed = best >= kth  # [B, K]: survivors among the K best
    xs = torch.where(listed, best, -math.inf)
    if K < V:  # survivors past the K best are ties with the k-th: one more column holds their mass
        unlisted = (x >= kth).sum(dim=-1, keepdim=True) - listed.sum(dim=-1, keepdim=True)  # [B, 1]
        probs = torch.cat([xs, kth + unlisted.log()], dim=-1).softmax(dim=-1)[:, :K]  # log(0) = -inf: no mass
    else:
        probs = xs.softmax(dim=-1)  # [B, K]
    ahead = probs.cumsum(dim=-1) - probs  # mass ranked before each token
    # a run of equal values takes the mass before its first member: the strictly better tokens
    starts = torch.ones_like(xs, dtype=torch.bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    first = torch.where(starts, torch.arange(xs.shape[1], device=x.device), 0).cummax(dim=-1).values
    ahead = ahead.gather(1, first)
    p = torch.where(top_p < 1, top_p, math.inf)[:, None]  # top_p == 1: never cut (cumsum rounding)
    # what stays is every token at least as likely as the least likely kept survivor (ties past
    # the K best included)
    cutoff = torch.where((ahead < p) & listed, xs, math.inf).amin(dim=-1, keepdim=True)  # [B, 1]
    return x.masked_fill(x < cutoff, -math.inf)
