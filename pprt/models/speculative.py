"""Speculative acceptance on the last stage: which drafts a sequence keeps, and the token after them.

A sequence that sent drafts d_1..d_k (after its last known token) has k + 1
rows of logits: row j predicts the token after d_j (row 0: after the last
known token). Greedy rows accept d_j while d_j == argmax(row j-1), then take
argmax(row a) after the a accepted drafts; with drafts equal to what greedy
decoding would produce this gives exactly the tokens of one-at-a-time greedy
decoding.

Sampling rows use rejection sampling (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding", algorithm 1; Chen et al. 2023)
for a draft that is a single token (a point mass q = onehot(d_j), as n-gram
drafts are): accept d_j with probability min(1, p(d_j) / q(d_j)) = p(d_j),
where p is the row's sampling distribution (temperature, top_k, top_p, min_p:
`Sampler.distribution`); on rejection draw from norm(max(0, p - q)), i.e. p
with d_j removed and renormalized, and stop; if every draft is accepted, draw
the next token from the last row's p. Each emitted token is then distributed
exactly as p, as without speculation (the draws differ, so a seeded request
gives other tokens than without speculation, from the same distribution).

Sequences with a repetition, presence or frequency penalty or logprobs are
never given drafts (the scheduler's rule, drafts.can_draft), so the penalty
state and logprobs are not needed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampler import Sampler


@dataclass(slots=True)
class Verified:
    token_ids: list[int]  # per sequence: the token after its accepted drafts
    accepted: list[list[int]]  # per sequence: its accepted drafts, in order


@torch.no_grad()
def verify(sampler: Sampler, seq_ids: list[int], drafts: list[list[int]], logits: torch.Tensor) -> Verified:
    """Accept drafts and draw one more token per sequence.

    logits: fp32 [sum(len(d) + 1), >= vocab_size]; sequence i owns len(drafts[i]) + 1
    consecutive rows, in seq_ids order. Raises ValueError on a row count that does not match.
    """
    rows = sum(len(d) + 1 for d in drafts)
    if len(drafts) != len(seq_ids) or logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"verify needs {rows} rows of logits for {len(seq_ids)} sequences, got {tuple(logits.shape)}")
    raw = logits[:, : sampler.vocab_size].float()  # [R, V]
    states = [sampler._seqs[s] for s in seq_ids]
    row_states = [s for s, d in zip(states, drafts) for _ in range(len(d) + 1)]
    greedy = raw.argmax(dim=-1).tolist()  # [R]
    probs = None
    if not all(s.params.greedy for s in states):
        probs = sampler.distribution(raw, row_states)  # [R, V]; greedy rows unused
    out = Verified([], [])
    first = 0
    for state, draft in zip(states, drafts):
        if state.params.greedy:
            a = 0
            while a < len(draft) and draft[a] == greedy[first + a]:
                a += 1
            token = greedy[first + a]
        else:
            a, token = _rejection(probs[first:first + len(draft) + 1], draft, state.generator or sampler._gen)
        out.accepted.append(list(draft[:a]))
        out.token_ids.append(token)
        first += len(draft) + 1
    return out


def _rejection(p: torch.Tensor, draft: list[int], gen: torch.Generator) -> tuple[int, int]:
    """Accepted count and the next token for one sampling sequence; p [k + 1, V] its rows' distributions."""
    k = len(draft)
    # one uniform per draft and one draw for the bonus, from the sequence's generator
    u = torch.rand(k, generator=gen, device=p.device).tolist() if k else []
    for j, d in enumerate(draft):
        if u[j] < float(p[j, d]):
            continue
        residual = p[j].clone()
        residual[d] = 0.0  # norm(max(0, p - onehot(d))): p without d
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return k, int(torch.multinomial(p[k], 1, generator=gen))
