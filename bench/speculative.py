"""Speculative decoding benchmark: greedy decode tokens/s with and without drafts, on a real checkpoint.

Acceptance depends on trained weights and real text, so this bench takes a checkpoint
(a directory or a hub id: a Qwen3.5 / Qwen3-Next release for MTP, any model for n-gram)
and prompts (built-in code and chat prompts, or `--prompts FILE`: a JSON list of strings).
For each method (`off`, `mtp:K`, `ngram:K`) a fresh LLM generates `--max-tokens` greedy
tokens for every prompt at batch `--batch`, once to warm up and `--repeats` times timed.
Rows (results/speculative.jsonl): decode `tok_s` (generated tokens / wall seconds,
prefill included), `acceptance_rate`, `mean_accepted_length` (tokens a sequence gains per
verify step, 1.0 = no gain) from LLM.stats(); beside the `off` row's tokens/s, `speedup`
and its ceiling `1 + K` (every draft accepted, verification free). `same_tokens` says
whether the greedy tokens equal the `off` run's (they must: speculation never changes
greedy output).

    python -m bench.speculative --model Qwen/Qwen3.5-27B --devices cuda:0,cuda:1 --methods off,mtp:1,mtp:3
    python -m bench.speculative --model ./my-model --methods off,ngram:4 --prompts prompts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.harness import append_results, environment, print_table
from pprt import LLM, SamplingParams

PROMPTS = [
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "Rewrite this function with type hints:\n\ndef add(a, b):\n    return a + b\n\ndef mul(a, b):\n    return a * b\n",
    "Explain in three sentences why the sky is blue.",
    "List the planets of the solar system in order, one per line.",
]


def parse_method(text: str) -> tuple[str, dict | None]:
    """'off' | 'mtp:K' | 'ngram:K' -> (label, LLM's speculative argument). Raises ValueError."""
    if text == "off":
        return text, None
    method, _, k = text.partition(":")
    if method not in ("mtp", "ngram") or not k.isdigit():
        raise ValueError(f"method {text!r} is not off, mtp:K or ngram:K")
    return text, {"method": method, "num_speculative_tokens": int(k)}


def run_method(args, speculative: dict | None, prompts: list[str]) -> dict:
    """One fresh LLM: warm-up, then `repeats` timed runs of every prompt; stats of the timed runs."""
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    with LLM(args.model, devices=args.devices, speculative=speculative, max_num_seqs=args.batch,
             enable_prefix_caching=False) as llm:
        llm.generate(prompts[: args.batch], params)  # warm-up (kernels, graphs, allocator)
        before = llm.stats()
        times, outputs = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            times.append(time.perf_counter() - start)
        after = llm.stats()
    drafts = after.draft_tokens - before.draft_tokens
    accepted = after.accepted_tokens - before.accepted_tokens
    verify_steps = after.verify_steps - before.verify_steps
    seconds = statistics.median(times)
    return {
        "tok_s": len(prompts) * args.max_tokens / seconds, "seconds": seconds,
        "draft_tokens": drafts, "acceptance_rate": accepted / drafts if drafts else 0.0,
        "mean_accepted_length": (accepted + verify_steps) / verify_steps if verify_steps else 0.0,
        "tokens": [list(o.token_ids) for o in outputs],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--devices", type=lambda s: s.split(","), default=None, help="e.g. cuda:0,cuda:1 (default: pprt's)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["off", "mtp:1", "mtp:3"])
    p.add_argument("--prompts", type=Path, default=None, help="a JSON list of prompt strings")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (max_num_seqs)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args(argv)
    methods = [parse_method(m) for m in args.methods]
    if methods[0][0] != "off":
        methods.insert(0, parse_method("off"))  # the baseline every row is compared to
    prompts = json.loads(args.prompts.read_text()) if args.prompts else PROMPTS
    if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
        raise SystemExit(f"--prompts {args.prompts}: expected a non-empty JSON list of strings")
    rows, base = [], None
    for label, speculative in methods:
        result = run_method(args, speculative, prompts)
        tokens = result.pop("tokens")
        base = base or (result, tokens)
        k = speculative["num_speculative_tokens"] if speculative else 0
        rows.append({"model": args.model, "method": label, "batch": args.batch, "prompts": len(prompts),
                     "max_tokens": args.max_tokens, **result, "speedup": result["tok_s"] / base[0]["tok_s"],
                     "ceiling": 1.0 + k, "same_tokens": tokens == base[1]})
    device = (args.devices or ["cpu"])[-1]
    print_table(rows, ["method", "tok_s", "speedup", "ceiling", "acceptance_rate", "mean_accepted_length",
                       "same_tokens"])
    append_results("speculative", rows, environment(device), args.results_dir)
    return rows


if __name__ == "__main__":
    main()
