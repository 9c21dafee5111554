"""pprt as a library: a batch with generate(), a stream(), and chat().

    python examples/library.py                                  # the bundled demo model, on CPU
    python examples/library.py --model Qwen/Qwen3-8B --devices cuda:0,cuda:1

The demo model is a plain completion model (no chat template), so the chat
part says so and is skipped; with a chat model it runs.
"""

import argparse

from pprt import LLM, SamplingParams
from pprt.entrypoints.demo_model import demo_model_path

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=str(demo_model_path()))
parser.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1 (default: every GPU, else the CPU)")
parser.add_argument("--max-tokens", type=int, default=48)
args = parser.parse_args()

devices = args.devices.split(",") if args.devices else None
with LLM(args.model, devices=devices) as llm:
    # 1. A batch of prompts, greedy (a mild repetition penalty keeps a small model from looping):
    #    the batch shares the pipeline's steps.
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0, repetition_penalty=1.2)
    prompts = ["def fibonacci(n):", "import os\n\n\ndef list_python_files(directory):"]
    for prompt, completion in zip(prompts, llm.generate(prompts, greedy)):
        print(f"--- generate: {prompt!r} ({len(completion.token_ids)} tokens, {completion.finish_reason})")
        print(prompt + completion.text)

    # 2. Streaming with sampling: text arrives piece by piece.
    print("--- stream: 'class Stack:'")
    sampled = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, top_p=0.9, seed=0, stop=["\n\n\n"])
    print("class Stack:", end="")
    for piece in llm.stream("class Stack:", sampled):
        print(piece, end="", flush=True)
    print()

    # 3. Chat, with the model's own template (Qwen3: enable_thinking=False skips the <think> block).
    print("--- chat")
    if llm.tokenizer.has_chat_template:
        messages = [{"role": "system", "content": "You are a concise Python tutor."},
                    {"role": "user", "content": "What does a Python generator do? One sentence."}]
        reply = llm.chat(messages, greedy, enable_thinking=False)
        print(reply.text)
    else:
        print(f"{args.model} has no chat template: it is a completion model, so chat() is not available")
