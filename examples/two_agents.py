"""Two agents over the OpenAI API: a reasoner plans, a tool agent acts, one model per card.

    python examples/two_agents.py       # starts `python -m pprt.serve` itself: the demo model twice (CPU)
    python examples/two_agents.py --base-url http://127.0.0.1:8000/v1 --api-key KEY

The second form talks to a server you started with one model per card, e.g.

    python -m pprt.serve --model Qwen/Qwen3-32B --devices cuda:0 --served-model-name reasoner \\
                         --model Qwen/Qwen3-Coder-30B-A3B-Instruct --devices cuda:1 --served-model-name agent

Everything goes through the official `openai` client, as any agent framework
would. With chat models the reasoner is offered one tool, `ask_agent(request)`;
its reasoning and its call come back parsed (reasoning_content, tool_calls),
the agent answers the request, and the answer goes back to the reasoner as the
tool's result. The demo model is a completion model (no chat template), so on
it the same hand-off runs over /v1/completions: the reasoner names a helper
function, the agent writes it (streamed), the reasoner writes the code that
uses it.
"""

import argparse
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import openai

TASK = "Read a CSV file and print the average of its second column."
ASK_AGENT = {"type": "function", "function": {
    "name": "ask_agent", "description": "Ask a coding agent to write a Python function.",
    "parameters": {"type": "object", "properties": {"request": {"type": "string"}}, "required": ["request"]}}}

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default=None, help="a running server's /v1 URL (default: start one)")
parser.add_argument("--api-key", default="none")
parser.add_argument("--reasoner", default="reasoner", help="served model name of the reasoner")
parser.add_argument("--agent", default="agent", help="served model name of the tool agent")
parser.add_argument("--max-tokens", type=int, default=64)
args = parser.parse_args()


@contextmanager
def demo_server():
    """`python -m pprt.serve` with the demo model served twice, on two cards when there are two."""
    try:
        import torch

        two_gpus = torch.cuda.device_count() >= 2
    except ImportError:
        two_gpus = False
    command = [sys.executable, "-m", "pprt.serve", "--port", "0", "--log-level", "warning",
               "--model", _demo(), "--served-model-name", "reasoner", "--devices", "cuda:0" if two_gpus else "cpu",
               "--model", _demo(), "--served-model-name", "agent", "--devices", "cuda:1" if two_gpus else "cpu"]
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        for line in server.stdout:  # the server prints where it listens once it does
            if line.startswith("pprt.serve: serving "):
                yield line.rsplit(" at ", 1)[1].strip() + "/v1"
                break
        else:
            raise SystemExit("the server did not start")
    finally:
        server.terminate()
        server.wait(60)


def _demo() -> str:
    from pprt.entrypoints.demo_model import demo_model_path

    return str(demo_model_path())


def chat_with_tool(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": f"{TASK} Use ask_agent for the code."}]
    greedy = dict(temperature=0, max_tokens=args.max_tokens)
    reply = client.chat.completions.create(model=args.reasoner, messages=messages, tools=[ASK_AGENT], **greedy)
    message = reply.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    if reasoning:
        print(f"[reasoner thinks] {reasoning}")
    print(f"[reasoner] {message.content or ''}")
    if not message.tool_calls:
        print("(the reasoner answered without calling the agent)")
        return
    messages.append({"role": "assistant", "content": message.content,
                     "tool_calls": [c.model_dump() for c in message.tool_calls]})
    for call in message.tool_calls:
        request = json.loads(call.function.arguments).get("request", "")
        print(f"[reasoner calls ask_agent] {request}")
        answer = client.chat.completions.create(model=args.agent, messages=[{"role": "user", "content": request}],
                                                **greedy).choices[0].message.content
        print(f"[agent] {answer}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": answer})
    final = client.chat.completions.create(model=args.reasoner, messages=messages, tools=[ASK_AGENT], **greedy)
    print(f"[reasoner] {final.choices[0].message.content}")


def completion_hand_off(client: openai.OpenAI) -> None:
    # A small completion model loops on greedy text; a mild repetition penalty keeps it moving.
    code = dict(temperature=0, max_tokens=args.max_tokens, extra_body={"repetition_penalty": 1.2})
    plan = f'"""{TASK}"""\n\nimport csv\n\n\n'
    name = client.completions.create(model=args.reasoner, prompt=plan + "def", max_tokens=16, temperature=0,
                                     stop=["\n"], extra_body={"repetition_penalty": 1.2}).choices[0].text
    signature = "def" + (name.rstrip() if name.strip() else " average_of_column(path):")
    print(f"[reasoner] asks the agent for: {signature}")
    print(f"[agent]\n{signature}")
    helper = ""
    for chunk in client.completions.create(model=args.agent, prompt=f"import csv\n\n\n{signature}\n", stream=True,
                                           **code):
        helper += chunk.choices[0].text
        print(chunk.choices[0].text, end="", flush=True)
    print()
    usage = client.completions.create(model=args.reasoner, prompt=f"{plan}{signature}\n{helper}\n\n\n"
                                      'if __name__ == "__main__":\n', **code).choices[0].text
    print(f"[reasoner]\nif __name__ == \"__main__\":\n{usage}")


def run(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=args.api_key)
    print("models:", ", ".join(m.id for m in client.models.list().data))
    try:
        chat_with_tool(client)
    except openai.BadRequestError as e:
        if "no chat template" not in str(e):
            raise
        completion_hand_off(client)  # completion models: the same hand-off without chat


if args.base_url:
    run(args.base_url)
else:
    with demo_server() as url:
        run(url)
