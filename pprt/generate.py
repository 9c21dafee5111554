"""python -m pprt.generate: complete a prompt from the command line.

A thin layer over the public API: arguments become the same objects a
library user builds (`LLM`, `SamplingParams`).
"""

from __future__ import annotations

import argparse
import sys

from . import LLM, SamplingParams


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pprt.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--devices", default=None, help="comma-separated, e.g. cpu or cuda:0,cuda:1")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    devices = args.devices.split(",") if args.devices else None
    sampling = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    with LLM(args.model, devices=devices) as llm:
        for piece in llm.stream(args.prompt, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
