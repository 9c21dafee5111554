"""Real Qwen chat templates render as transformers' apply_chat_template renders them.

The templates under tests/data/chat_templates/ are the published ones (see the
README there). Each is rendered over conversations with tools, tool calls and
tool results, reasoning history (as `reasoning_content`, as `thinking`, and
inline `<think>` blocks) and `enable_thinking` both ways, with and without the
generation prompt; pprt's text must equal transformers' (or both must raise).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jinja2
import pytest
from tiny_tokenizer import build_tokenizer

from pprt.chat_template import compile_template
from pprt.tokenizer import Tokenizer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
TEMPLATE_FILES = sorted(p.name for p in TEMPLATES.glob("*.jinja"))

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather <b>now</b> & \"later\" — ünïcode",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {
                                          "a": {"type": "number"}, "b": {"type": "number"}}}}},
]

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "Weather in Paris, and 2 + 3? 🤔"}
CALLS = {"role": "assistant", "content": None, "reasoning_content": "Two tools are needed.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris", "days": 2}}},
                        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": [3, {"x": 1}]}}}]}
RESULTS = [{"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "5"}]
ANSWER_INLINE = {"role": "assistant", "content": "<think>\nIt is mild.\n</think>\n\nParis: 21 °C; 2 + 3 = 5."}
ANSWER_THINKING = {"role": "assistant", "content": "Paris: 21 °C.", "thinking": "Read the tool result."}
ANSWER_PLAIN = {"role": "assistant", "content": "Paris: 21 °C; 2 + 3 = 5."}
FOLLOW_UP = {"role": "user", "content": "Thanks! And tomorrow?"}

CONVERSATIONS = {
    "user": [USER],
    "system+user": [SYSTEM, USER],
    "tool-round": [SYSTEM, USER, CALLS, *RESULTS],
    "tool-round+answer": [USER, CALLS, *RESULTS, ANSWER_INLINE],
    "history+follow-up": [SYSTEM, USER, CALLS, *RESULTS, ANSWER_THINKING, FOLLOW_UP],
    "plain-history": [USER, ANSWER_PLAIN, FOLLOW_UP, ANSWER_INLINE],
    "string-arguments": [USER, {"role": "assistant", "content": "Calling.", "tool_calls": [
        {"function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]}, RESULTS[1]],
}

OPTIONS = [
    {},
    {"tools": TOOLS},
    {"enable_thinking": True},
    {"enable_thinking": False},
    {"tools": TOOLS, "enable_thinking": False},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


def _ours(tiny_dir, template_path: Path) -> Tokenizer:
    return Tokenizer.from_files(tiny_dir / "tokenizer.json", tiny_dir / "tokenizer_config.json", template_path)


def _render_both(ours: Tokenizer, hf_tok, template: str, messages, gen: bool, **kwargs):
    """(pprt's text or its error type, transformers' text or its error type)."""
    results = []
    for render in (lambda: ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs),
                   lambda: hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                      add_generation_prompt=gen, **kwargs)):
        try:
            results.append(render())
        except (jinja2.TemplateError, TypeError) as e:  # the template itself refused
            results.append(("raised", type(e).__name__, str(e)))
    return results


@pytest.mark.parametrize("name", TEMPLATE_FILES)
def test_real_template_matches_transformers(tiny_dir, hf_tok, name):
    path = TEMPLATES / name
    template = path.read_text(encoding="utf-8")
    ours = _ours(tiny_dir, path)
    rendered = set()
    for (convo, messages), options, gen in itertools.product(CONVERSATIONS.items(), OPTIONS, (True, False)):
        got, want = _render_both(ours, hf_tok, template, messages, gen, **options)
        assert got == want, (name, convo, options, gen)
        if isinstance(got, str):
            rendered.add(got)
    # the cases really differ: each conversation renders differently with and without tools
    assert len(rendered) >= 2 * len(CONVERSATIONS), len(rendered)


def test_the_real_templates_are_there():
    """The set the issue names: Qwen2.5-Instruct, Qwen3, Qwen3.5, QwQ, and one with generation markers."""
    assert {"qwen2.5-instruct.jinja", "qwen3.jinja", "qwen3.5.jinja", "qwq-32b.jinja",
            "qwen3-trl-training.jinja"} <= set(TEMPLATE_FILES)
    assert "{% generation %}" in (TEMPLATES / "qwen3-trl-training.jinja").read_text()


def test_generation_markers_print_nothing(tiny_dir):
    """{% generation %} ... {% endgeneration %} renders its body unchanged (TRL's training templates)."""
    marked = "{% for m in messages %}[{% generation %}{{ m.content }}{% endgeneration %}]{% endfor %}"
    plain = "{% for m in messages %}[{{ m.content }}]{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert compile_template(marked).render(messages=messages) == compile_template(plain).render(messages=messages)
    ours = _ours(tiny_dir, TEMPLATES / "qwen3-trl-training.jinja")
    text = ours.apply_chat_template([USER, ANSWER_INLINE], add_generation_prompt=False)
    assert "generation" not in text and "Paris: 21 °C" in text


HELPERS = (
    "{{ strftime_now('%Y') | length }}§{{ messages[0] | tojson(indent=2, sort_keys=true) }}§"
    "{{ {'b': 1, 'a': [1, 2]} | tojson(separators=(',', ':')) }}§{{ 'é<&>' | tojson(ensure_ascii=true) }}§"
    "{% set d = dict(x=1, y=2) %}{{ d | tojson }}§{{ dict.fromkeys(['p', 'q'], 0) | tojson }}§"
    "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
    "{% if loop.index0 == 3 %}{% break %}{% endif %}{{ m.role }},{% endfor %}§"
    "{{ pad_token }}§{{ eos_token }}§{{ bos_token is defined }}§{{ tools is none }}§{{ documents is none }}§"
    "{{ messages[1].reasoning_content }}§{{ messages[1].thinking }}§{{ 'content' in messages[2] }}§{{ greeting }}"
    "{% if messages | length > 5 %}{{ raise_exception('too many: ' ~ messages | length) }}{% endif %}"
)


def test_environment_helpers_match_transformers(tiny_dir, hf_tok, tmp_path):
    """tojson's keyword arguments, dict, loop controls, special tokens, None-dropping and
    reasoning aliases, raise_exception: each as transformers does it."""
    (tmp_path / "t.jinja").write_text(HELPERS, encoding="utf-8")
    ours = _ours(tiny_dir, tmp_path / "t.jinja")
    messages = [{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "x", "reasoning": "r"},
                {"role": "assistant", "content": None}, {"role": "user", "content": "y"}]
    got, want = _render_both(ours, hf_tok, HELPERS, messages, True, greeting="hey")
    assert got == want
    assert got.split("§")[6:] == ["user,assistant,", "<|endoftext|>", "<|im_end|>", "False", "True", "True",
                                  "r", "r", "False", "hey"]
    got, want = _render_both(ours, hf_tok, HELPERS, messages * 2, True)
    assert got == want == ("raised", "TemplateError", "too many: 8")


def test_named_templates_pick_tool_use_when_tools_are_given(tiny_dir, hf_tok, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}{{ tools is none }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    transformers = pytest.importorskip("transformers")
    hf_named = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.from_dir(tmp_path)
    for kwargs in ({}, {"tools": TOOLS}):
        assert ours.apply_chat_template([USER], **kwargs) == hf_named.apply_chat_template(
            [USER], tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template([USER]) == "D1True"
    assert ours.apply_chat_template([USER], tools=TOOLS) == "T2"
    config["chat_template"] = [{"name": "a", "template": "x"}, {"name": "b", "template": "y"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"several chat templates \['a', 'b'\] and none is named 'default'"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([USER])


def test_empty_conversation_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="empty conversation"):
        Tokenizer.from_dir(tiny_dir).apply_chat_template([])


def test_llm_chat_with_a_generation_marked_template(tmp_path, hf_tok):
    """The failure as reported: a TRL-trained checkpoint loads, then llm.chat() raised
    TemplateSyntaxError: unknown tag 'generation'."""
    from models import make_checkpoint
    from pprt import LLM, SamplingParams

    path = make_checkpoint(tmp_path, "qwen3")
    template = (TEMPLATES / "qwen3-trl-training.jinja").read_text(encoding="utf-8")
    (path / "chat_template.jinja").write_text(template, encoding="utf-8")
    messages = [SYSTEM, USER, ANSWER_INLINE, FOLLOW_UP]
    with LLM(str(path), devices=["cpu"], max_context=512) as llm:
        out = llm.chat(messages, SamplingParams(max_tokens=2, temperature=0), enable_thinking=False)
        want = hf_tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False)
        assert out.prompt_token_ids == llm.tokenizer.encode(want) and len(out.token_ids) == 2
