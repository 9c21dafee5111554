"""Prefix caching benchmark: time to first token of a chat's second turn, with and without the cache.

A chat whose turns share a long prefix (a system prompt and tool definitions:
`--prefix` tokens, 4096 by default) and a short user message: turn 1 is
prefix + message, its reply `--reply` tokens; turn 2 is turn 1 + reply + a new
message. For each setup (stages x caching on/off) a fresh LLM runs `--repeats`
such chats, each on new random prefixes, and times turn 2's first token
(generate with max_tokens=1, wall clock). Rows (results/prefix_cache.jsonl):
`ttft_s` (median), `turn2_tokens`, `computed_tokens` and `cached_tokens` of
turn 2 (from LLM.stats()), and on the cached row `speedup` (uncached ttft /
cached ttft) beside `token_ratio` = turn2_tokens / computed_tokens, the
speedup if prefill time were proportional to the tokens computed: the
ceiling the cache can reach (attention over the cached prefix still costs).
Turn 2's token is checked equal with and without the cache.

Random weights from bench.generate's presets (Qwen2.5-7B geometry on GPU;
`qwen3.5-27b` a hybrid, resuming from state snapshots; `--tiny`: the tiny
qwen2, or `--tiny --config tiny-qwen3.5`, a 256-token prefix, on CPU) or any
config.json.

    python -m bench.prefix_cache                          # GPU: Qwen2.5-7B geometry, 4k prefix
    python -m bench.prefix_cache --config qwen3.5-27b --layers 8 --stages 1
    python -m bench.prefix_cache --tiny --results-dir /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.generate import PRESETS, _cleanup, write_random_checkpoint
from bench.harness import append_results, environment, print_table
from pprt import LLM, SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen2.5-7b", help=f"random weights from a preset ({', '.join(PRESETS)}) "
                   "or a config.json path")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers of --config")
    p.add_argument("--device", default=None, help="every stage's device (default cuda:0, else cpu)")
    p.add_argument("--stages", type=ints, default=(1, 2))
    p.add_argument("--prefix", type=int, default=4096, help="shared prefix tokens")
    p.add_argument("--message", type=int, default=32, help="tokens of each user message")
    p.add_argument("--reply", type=int, default=32, help="tokens of the first turn's reply")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny config, 256-token prefix, CPU (tests)")
    args = p.parse_args(argv)
    if args.tiny:  # the tiny qwen2 unless another tiny preset is named (tiny-qwen3.5: a hybrid)
        args.config = args.config if args.config.startswith("tiny") else "tiny"
        args.prefix, args.message, args.reply, args.repeats = 256, 8, 8, 2
        args.device, args.chunk_size = args.device or "cpu", 128
    args.device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    return args


def chat_ttft(llm: LLM, vocab: int, args, seed: int) -> dict:
    """One two-turn chat on a fresh random prefix; turn 2's first-token time and token counts."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731  (0, 1: special in the presets)
    turn1 = ids(args.prefix) + ids(args.message)
    reply = llm.generate(turn1, SamplingParams(max_tokens=args.reply, temperature=0, ignore_eos=True))[0]
    turn2 = turn1 + reply.token_ids + ids(args.message)
    before = llm.stats()
    t0 = time.perf_counter()
    first = llm.generate(turn2, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
    ttft = time.perf_counter() - t0
    after = llm.stats()
    return {"ttft_s": ttft, "turn2_tokens": len(turn2), "token": first.token_ids[0],
            "computed_tokens": after.computed_tokens - before.computed_tokens,
            "cached_tokens": after.prefix_cached_tokens - before.prefix_cached_tokens}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cfg = dict(PRESETS.get(args.config) or json.loads(Path(args.config).read_text()))
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    on_cuda = torch.device(args.device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    max_context = args.prefix + 2 * args.message + args.reply + 2
    if max_context > cfg["max_position_embeddings"]:
        raise SystemExit(f"--prefix {args.prefix} needs {max_context} positions; the model has "
                         f"{cfg['max_position_embeddings']}")
    geometry = (f"{cfg['model_type']} hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
                f"vocab {cfg['vocab_size']}")
    env = dict(environment(args.device), model=f"random {args.config} ({geometry})", prefix=args.prefix,
               message=args.message, reply=args.reply, load_avg=os.getloadavg()[0])
    tmp = Path(tempfile.mkdtemp(prefix="pprt-bench-prefix-"))
    rows = []
    try:
        model = write_random_checkpoint(cfg, tmp / "model", dtype, args.device if on_cuda else "cpu")
        for stages in args.stages:
            runs = {}
            for caching in (False, True):
                with LLM(str(model), devices=[args.device] * stages, dtype=dtype, max_context=max_context,
                         chunk_size=args.chunk_size, enable_prefix_caching=caching,
                         transport="host" if on_cuda and stages > 1 else "auto") as llm:
                    chat_ttft(llm, cfg["vocab_size"], args, seed=args.repeats)  # warm-up (a prefix of its own)
                    runs[caching] = [chat_ttft(llm, cfg["vocab_size"], args, seed) for seed in range(args.repeats)]
                _cleanup()
            if [r["token"] for r in runs[True]] != [r["token"] for r in runs[False]]:
                raise RuntimeError(f"{stages} stages: turn 2's token differs with the prefix cache")
            for caching, runs_ in runs.items():
                last = runs_[-1]
                rows.append({"stages": stages, "caching": caching,
                             "ttft_s": statistics.median(r["ttft_s"] for r in runs_),
                             "turn2_tokens": last["turn2_tokens"], "computed_tokens": last["computed_tokens"],
                             "cached_tokens": last["cached_tokens"]})
            off, on = rows[-2], rows[-1]
            on["speedup"] = off["ttft_s"] / on["ttft_s"]
            on["token_ratio"] = on["turn2_tokens"] / on["computed_tokens"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = append_results("prefix_cache", rows, env, args.results_dir)
    print_table(rows, ["stages", "caching", "ttft_s", "turn2_tokens", "computed_tokens", "cached_tokens", "speedup",
                       "token_ratio"])
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
