"""Write tests/data/tool_model/: a tiny Qwen3 checkpoint that has learnt a few tool-calling replies by heart.

Contract:
    python tools/make_tool_test_model.py [--out tests/data/tool_model] [--steps 400] [--seed 0]

The server's end-to-end tool test (tests/test_serve_tools.py) needs a model that
really writes a tool call in each format, under a real Qwen chat template. A
random model never does, and training one inside the test suite takes minutes
on CPU (the templates' tool instructions make prompts of 500-1200 tokens), so
this script trains one once and the test data holds it:

1. A tiny random Qwen3 checkpoint (tests/models.py, 2 layers, hidden 64) with
   the tiny test tokenizer (tests/tiny_tokenizer.py; eos `<|im_end|>`, and
   `<think>` / `</think>` as tokens), no chat template of its own.
2. Conversations (written to conversations.json beside the weights): one tool,
   get_weather(city: string, days: integer); for each of the published Qwen3
   (hermes calls) and Qwen3.5 (XML calls) templates of tests/data/chat_templates/:
   the first turn (reasoning, then a call), the same turn with the reply forced
   to start with the call (the prompt ends with the call's opening, as the
   server writes it for a named tool_choice), and the turn after the tool's
   result (reasoning, then an answer). Earlier calls are rendered with their
   arguments as a mapping, as the server passes them to the template.
3. Training: AdamW on the replies only (prompt tokens masked), full batch, fp32,
   until every reply is the model's greedy continuation (checked with
   transformers after every 25 steps), at most --steps steps.
4. Output: config.json, model.safetensors (fp32), generation_config.json,
   tokenizer.json, tokenizer_config.json, conversations.json. The test copies
   them beside a real template (chat_template.jinja) for each format.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from models import make_checkpoint  # noqa: E402

from pprt.tokenizer import Tokenizer  # noqa: E402

TEMPLATES = REPO / "tests" / "data" / "chat_templates"
EOS = "<|im_end|>"
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
USER = {"role": "user", "content": "What is the weather in Paris?"}
ARGUMENTS = {"city": "Paris", "days": 2}
CALLED = {"role": "assistant", "content": "",
          "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                        "arguments": ARGUMENTS}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"}
REASONING, ANSWER, LATER = "The user wants the weather.", "It is sunny in Paris.", "The tool answered."

# per format: its template, the call as the model writes it, the forced start of a reply that calls
# get_weather by name, and whether the template's generation prompt opens <think> itself
FORMATS = {
    "hermes": dict(template="qwen3.jinja", opens_think=False,
                   call='<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
                   forced='<tool_call>\n{"name": "get_weather", "arguments": '),
    "xml": dict(template="qwen3.5.jinja", opens_think=True,
                call="<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                     "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
                forced="<tool_call>\n<function=get_weather>\n"),
}


def conversations(tokenizer_dir: Path) -> list[dict]:
    """Every (format, prompt text, reply text) the model learns."""
    out = []
    for fmt, spec in FORMATS.items():
        tok = Tokenizer.from_files(tokenizer_dir / "tokenizer.json", tokenizer_dir / "tokenizer_config.json",
                                   TEMPLATES / spec["template"])
        think = "" if spec["opens_think"] else "<think>\n"
        first = tok.apply_chat_template([USER], tools=[TOOL])
        closed = first + ("\n</think>\n\n" if spec["opens_think"] else "")  # a forced reply skips the reasoning
        out += [
            dict(format=fmt, name="call", messages=[USER], prompt=first,
                 reply=f"{think}{REASONING}\n</think>\n\n{spec['call']}"),
            dict(format=fmt, name="forced", messages=[USER], prompt=closed + spec["forced"],
                 reply=spec["call"][len(spec["forced"]):]),
            dict(format=fmt, name="answer", messages=[USER, CALLED, RESULT],
                 prompt=tok.apply_chat_template([USER, CALLED, RESULT], tools=[TOOL]),
                 reply=f"{think}{LATER}\n</think>\n\n{ANSWER}"),
        ]
    return out


def train(model, tok: Tokenizer, convs: list[dict], steps: int) -> int:
    eos = tok.token_to_id(EOS)
    seqs = [(tok.encode(c["prompt"]), tok.encode(c["reply"]) + [eos]) for c in convs]
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, :len(p) + len(r)] = 1
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            learnt = all(_greedy(model, p, len(r)) == r for p, r in seqs)
            print(f"step {step}: loss {loss.item():.5f}, {time.time() - t0:.0f} s, learnt: {learnt}", flush=True)
            if learnt:
                return step
    raise SystemExit(f"the replies were not learnt in {steps} steps")


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    model.eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "tool_model")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import Qwen3ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        base = make_checkpoint(Path(tmp) / "base", "qwen3", seed=args.seed, eos_token_id=2, num_hidden_layers=2,
                               max_shard_size="10MB")
        tok = Tokenizer.from_files(base / "tokenizer.json", base / "tokenizer_config.json")
        assert tok.token_to_id(EOS) == 2, "the tiny tokenizer's <|im_end|> must be id 2 (the config's eos)"
        convs = conversations(base)
        torch.manual_seed(args.seed)
        model = Qwen3ForCausalLM.from_pretrained(base, dtype=torch.float32)
        steps = train(model, tok, convs, args.steps)
        out = args.out
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        shutil.copy(base / "tokenizer.json", out / "tokenizer.json")
        config = json.loads((base / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)  # each test copy gets a real Qwen template
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "conversations.json").write_text(json.dumps(
        {"tool": TOOL, "arguments": ARGUMENTS, "reasoning": REASONING, "answer": ANSWER, "later": LATER,
         "templates": {f: s["template"] for f, s in FORMATS.items()}, "steps": steps,
         "conversations": [{k: c[k] for k in ("format", "name", "messages", "reply")} for c in convs]},
        indent=1) + "\n")
    print(f"wrote {out} ({steps} steps)")


if __name__ == "__main__":
    main()
