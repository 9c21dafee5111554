"""Two models in one program: a "reasoner" that calls a "tool agent".

    python examples/two_models.py                     # both: the bundled demo model, on CPU
    python examples/two_models.py --reasoner Qwen/Qwen3-32B --agent Qwen/Qwen2.5-Coder-7B-Instruct

Each model is its own `LLM` with its own devices: by default the reasoner on
cuda:0 and the agent on cuda:1 when there are two GPUs, else both on the CPU.

With chat models the reasoner is offered one tool, `ask_agent(request)`, in
Qwen's tool-calling format; when it emits a <tool_call>, the agent answers
the request and the answer goes back to the reasoner as a tool message. A
completion model (the demo) cannot call tools, so the same hand-off is done
with plain prompts: the reasoner names a helper function, the agent writes
it, and the reasoner writes the code that uses it.
"""

import argparse
import json
import re

import torch

from pprt import LLM, SamplingParams
from pprt.entrypoints.demo_model import demo_model_path

TASK = "Read a CSV file and print the average of its second column."
ASK_AGENT = {"type": "function", "function": {
    "name": "ask_agent", "description": "Ask a coding agent to write a Python function.",
    "parameters": {"type": "object", "properties": {"request": {"type": "string"}}, "required": ["request"]}}}

parser = argparse.ArgumentParser()
parser.add_argument("--reasoner", default=str(demo_model_path()))
parser.add_argument("--agent", default=str(demo_model_path()))
two_gpus = torch.cuda.device_count() >= 2
parser.add_argument("--reasoner-devices", default="cuda:0" if two_gpus else "cpu")
parser.add_argument("--agent-devices", default="cuda:1" if two_gpus else "cpu")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()
greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0)


def chat_with_tool(reasoner: LLM, agent: LLM) -> None:
    messages = [{"role": "user", "content": f"{TASK} Use ask_agent for the code."}]
    reply = reasoner.chat(messages, greedy, tools=[ASK_AGENT], enable_thinking=False).text
    print(f"[reasoner] {reply}")
    call = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", reply, re.S)
    if call is None:
        print("(the reasoner answered without calling the agent)")
        return
    try:
        request = json.loads(call.group(1))["arguments"]["request"]
    except (ValueError, KeyError, TypeError):
        print("(the reasoner's tool call is not valid JSON with a 'request')")
        return
    answer = agent.chat([{"role": "user", "content": request}], greedy, enable_thinking=False).text
    print(f"[agent] {answer}")
    messages += [{"role": "assistant", "content": reply}, {"role": "tool", "content": answer}]
    print(f"[reasoner] {reasoner.chat(messages, greedy, tools=[ASK_AGENT], enable_thinking=False).text}")


def completion_hand_off(reasoner: LLM, agent: LLM) -> None:
    # A small completion model loops on greedy text; a mild repetition penalty keeps it moving.
    code_params = SamplingParams(max_tokens=args.max_tokens, temperature=0, repetition_penalty=1.2)
    plan = f'"""{TASK}"""\n\nimport csv\n\n\n'
    name = reasoner.generate(plan + "def", SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.2,
                                                          stop=["\n"]))[0].text
    signature = "def" + (name.rstrip() if name.strip() else " average_of_column(path):")
    print(f"[reasoner] asks the agent for: {signature}")
    helper = agent.generate(f"import csv\n\n\n{signature}\n", code_params)[0].text
    code = f"{signature}\n{helper}"
    print(f"[agent]\n{code}")
    usage = reasoner.generate(f"{plan}{code}\n\n\nif __name__ == \"__main__\":\n", code_params)[0].text
    print(f"[reasoner]\nif __name__ == \"__main__\":\n{usage}")


with LLM(args.reasoner, devices=args.reasoner_devices.split(",")) as reasoner, \
        LLM(args.agent, devices=args.agent_devices.split(",")) as agent:
    if reasoner.tokenizer.has_chat_template and agent.tokenizer.has_chat_template:
        chat_with_tool(reasoner, agent)
    else:
        completion_hand_off(reasoner, agent)
