"""Summarize a long file in one prompt: a large max_context (YaRN beyond the native window).

    python examples/long_context.py                                       # demo model, CPU, 4k context
    python examples/long_context.py --model Qwen/Qwen3-32B --devices cuda:0,cuda:1 \\
        --max-context 131072 --file big_module.py

The default file is the standard library's `argparse.py` (about 100 kB),
there on every machine. A prompt longer than the context keeps the file's
head and tail and says what it cut. On GPUs the default context is 128k
tokens (pprt enables YaRN when that exceeds the model's native window); on a
CPU it is 4096, which keeps the demo quick.
"""

import argparse
import time

import torch

from pprt import LLM, SamplingParams
from pprt.entrypoints.demo_model import demo_model_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=str(demo_model_path()))
parser.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1 (default: every GPU, else the CPU)")
parser.add_argument("--file", default=argparse.__file__)
parser.add_argument("--max-context", type=int, default=131072 if torch.cuda.is_available() else 4096)
parser.add_argument("--max-tokens", type=int, default=96)
args = parser.parse_args()

with open(args.file, encoding="utf-8") as f:
    text = f.read()
devices = args.devices.split(",") if args.devices else None

with LLM(args.model, devices=devices, max_context=args.max_context) as llm:
    chat = llm.tokenizer.has_chat_template

    def prompt_for(body: str) -> str:
        if chat:
            request = f"Summarize what this file does, in a few bullet points.\n\n```\n{body}\n```"
            return llm.tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                                     add_generation_prompt=True, enable_thinking=False)
        return f"{body}\n\n# Summary of the module above, in a few lines:\n#"

    # Fit the prompt into the context, leaving room for the answer: keep the head and the tail.
    ids = llm.tokenizer.encode(text)
    limit = args.max_context - args.max_tokens
    prompt, half = prompt_for(text), len(ids) // 2
    while len(llm.tokenizer.encode(prompt)) > limit:  # decode + encode may not round-trip: measure each try
        half -= (len(llm.tokenizer.encode(prompt)) - limit) // 2 + 8
        if half <= 0:
            raise SystemExit(f"--max-context {args.max_context} leaves no room for the file")
        prompt = prompt_for(llm.tokenizer.decode(ids[:half]) + f"\n# [... {len(ids) - 2 * half} tokens cut ...]\n"
                            + llm.tokenizer.decode(ids[-half:]))
    if half < len(ids) // 2:
        print(f"{args.file}: {len(ids)} tokens, more than the context allows: kept the first and last {half}")

    t0 = time.perf_counter()
    completion = llm.generate(prompt, SamplingParams(max_tokens=args.max_tokens, temperature=0))[0]
    seconds = time.perf_counter() - t0
    print(f"{len(completion.prompt_token_ids)} prompt tokens + {len(completion.token_ids)} new in {seconds:.1f} s "
          f"(max_context {args.max_context})")
    print(("" if chat else "#") + completion.text)
