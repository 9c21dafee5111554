"""What the public API accepts as a prompt, checked before anything is queued.

A prompt is text (a str) or token ids (a non-empty list or tuple of ints;
numpy integers count, booleans do not). `LLM.generate` takes one prompt or a
list of them; `as_prompt_list` tells the forms apart and refuses everything
else with a ValueError that says what it got: bytes (whose iteration gives
ints), dicts, booleans, floats, strings where token ids are expected ("5" in
[1, "5"]), empty prompts. Token ids are checked against the vocabulary by
`check_vocab`. Knows nothing of tokenizers or scheduling.
"""

from __future__ import annotations

import numbers

FORMS = "a prompt is a str or a list of token ids (ints); give one prompt or a list of them"


def _is_id(t: object) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def token_ids(prompt: list | tuple, what: str = "prompt") -> list[int]:
    """`prompt` as a list of Python ints. Raises ValueError when it is empty or holds a non-int."""
    if not prompt:
        raise ValueError(f"{what} is empty: a prompt needs at least one token")
    bad = next((i for i, t in enumerate(prompt) if not _is_id(t)), None)
    if bad is not None:
        raise ValueError(f"{what}: token ids must be ints, element {bad} is {prompt[bad]!r} "
                         f"({type(prompt[bad]).__name__})")
    return [int(t) for t in prompt]


def as_prompt_list(prompts: object) -> list[str | list[int]]:
    """One prompt or a batch as a list of prompts, each a str or a list of int token ids.

    `[1, 2, 3]` is one prompt of ids; `["a", "b"]`, `[[1, 2], [3]]` and `["a", [1, 2]]` are
    batches. Raises ValueError for anything else, naming the offending prompt.
    """
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{FORMS}; got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given")
    if _is_id(prompts[0]):
        return [token_ids(prompts)]  # one prompt of ids (a str or list among them is refused)
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, (list, tuple)):
            out.append(token_ids(p, f"prompt {i}"))
        else:
            raise ValueError(f"prompt {i} is {type(p).__name__} {str(p)[:40]!r}: {FORMS}")
    return out


def check_vocab(ids: list[int] | tuple[int, ...], vocab_size: int, what: str = "prompt") -> None:
    """Raise ValueError naming the first id outside [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{what} token id {bad} is outside the vocabulary [0, {vocab_size})")
