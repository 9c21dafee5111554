"""pprt.tokenizer: encode/decode, chat templates, incremental detokenization.

The oracle for the tiny tokenizer's files is transformers (AutoTokenizer reads
the same directory): same ids, same rendered chat.
"""

from __future__ import annotations

import copy
import json
import time

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_tokenizer import QWEN3_CHAT_TEMPLATE, build_tokenizer

from pprt.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! The quick brown fox.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\n\tindented\r\n  trailing  ",
    "Crème brûlée, naïve café, Ångström, Straße, Ελληνικά, русский",
    "中文测试：你好，世界！日本語のテキスト。한국어 문장",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇯🇵 keycap 1️⃣ and math 𝔸𝔹 ∑∫",
    "mixed: a😀b中c\u00e9d\U0010FFFF end",
]

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2? 🤔"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_dir))


# --- the fixture itself -------------------------------------------------------

def test_build_tokenizer_is_fast_deterministic_and_fits_vocab(tmp_path):
    start = time.perf_counter()
    build_tokenizer(tmp_path / "a", vocab_size=300)
    elapsed = time.perf_counter() - start
    build_tokenizer(tmp_path / "b", vocab_size=300)
    assert elapsed < 1.0
    a, b = (tmp_path / d / "tokenizer.json" for d in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    for size in (300, 333):
        t = Tokenizer.from_dir(build_tokenizer(tmp_path / f"v{size}", vocab_size=size))
        assert t.vocab_size <= size
        assert max(t.encode("".join(TEXTS) + "<|im_end|></think>")) < size
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(tmp_path / "small", vocab_size=200)


def test_template_file_layouts(tmp_path):
    in_config = json.loads((build_tokenizer(tmp_path / "c") / "tokenizer_config.json").read_text())
    assert in_config["chat_template"] == QWEN3_CHAT_TEMPLATE
    assert in_config["eos_token"] == "<|im_end|>"
    as_file = build_tokenizer(tmp_path / "f", template="file")
    assert "chat_template" not in json.loads((as_file / "tokenizer_config.json").read_text())
    assert (as_file / "chat_template.jinja").read_text() == QWEN3_CHAT_TEMPLATE
    none = build_tokenizer(tmp_path / "n", template=None)
    assert "chat_template" not in json.loads((none / "tokenizer_config.json").read_text())
    assert not (none / "chat_template.jinja").exists()


# --- encode / decode ------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip_matches_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == hf_tok.encode(text, add_special_tokens=False)


def test_special_tokens(tok, hf_tok):
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    assert None not in (im_start, im_end, think, end_think)
    assert tok.token_to_id("<|no such token|>") is None
    assert tok.eos_token_id == im_end == hf_tok.eos_token_id
    assert tok.bos_token_id is None
    assert tok.special_token_ids == {tok.token_to_id("<|endoftext|>"), im_start, im_end}

    text = "<|im_start|>user\nhi<|im_end|>\n<think>\nhm</think>ok<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == im_start and ids[-1] == tok.token_to_id("<|endoftext|>")
    assert ids.count(im_end) == 1 and ids.count(think) == 1 and ids.count(end_think) == 1
    assert not set(tok.encode("hi")) & tok.special_token_ids  # encode adds nothing
    assert tok.decode(ids) == text
    # Special tokens are skipped; <think> is an added but not a special token (as in Qwen3).
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi\n<think>\nhm</think>ok"
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_eos_missing_from_vocab_is_an_error(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|eot|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"eos_token '<\|eot\|>'"):
        Tokenizer.from_files(tiny_dir / "tokenizer.json", tmp_path / "tokenizer_config.json", None)


# --- chat templates ---------------------------------------------------------------

def test_chat_template_from_config_and_from_file_agree(tmp_path, tok):
    from_file = Tokenizer.from_dir(build_tokenizer(tmp_path / "f", template="file"))
    assert tok.has_chat_template and from_file.has_chat_template
    prompt = tok.apply_chat_template(MESSAGES)
    assert prompt == from_file.apply_chat_template(MESSAGES)
    assert prompt == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                      "<|im_start|>user\nWhat is 2 + 2? 🤔<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == prompt.removesuffix(
        "<|im_start|>assistant\n")


def test_chat_template_file_overrides_config(tiny_dir, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}{{ eos_token }}")
    t = Tokenizer.from_files(tiny_dir / "tokenizer.json", tiny_dir / "tokenizer_config.json",
                             tmp_path / "t.jinja")
    assert t.apply_chat_template(MESSAGES) == "[system][user]<|im_end|>"


def test_enable_thinking(tok):
    default = tok.apply_chat_template(MESSAGES)
    on = tok.apply_chat_template(MESSAGES, enable_thinking=True)
    off = tok.apply_chat_template(MESSAGES, enable_thinking=False)
    assert default == on
    assert off == on + "<think>\n\n</think>\n\n"


def test_chat_template_matches_transformers(tok, hf_tok):
    tools = [{"type": "function", "function": {
        "name": "lookup", "description": "Find <b>x</b> & \"y\" — ünïcode",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    chat = MESSAGES + [
        {"role": "assistant", "content": "", "reasoning_content": "call it",
         "tool_calls": [{"function": {"name": "lookup", "arguments": {"q": "2+2"}}}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "<think>\nsum\n</think>\n\nIt is 4."},
        {"role": "user", "content": "Thanks"},
    ]
    for kwargs in ({}, {"tools": tools}, {"enable_thinking": False, "tools": tools}):
        for gen in (True, False):
            ours = tok.apply_chat_template(chat, add_generation_prompt=gen, **kwargs)
            theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False, **kwargs)
            assert ours == theirs, kwargs
    # tojson must not HTML-escape (jinja's built-in filter would).
    assert "<b>x</b> & \\\"y\\\" — ünïcode" in tok.apply_chat_template(MESSAGES, tools=tools)


def test_missing_chat_template_is_a_clear_error(tmp_path):
    t = Tokenizer.from_dir(build_tokenizer(tmp_path, template=None))
    assert not t.has_chat_template
    assert t.decode(t.encode("plain prompt")) == "plain prompt"
    with pytest.raises(ValueError, match="no chat template.*plain completion model"):
        t.apply_chat_template(MESSAGES)


def test_template_helpers_and_list_form(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": (
            "{% if messages|length == 1 %}{{ raise_exception('need two messages') }}{% endif %}"
            "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{{ greeting }}"
            "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}"
            "{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}|{{ ns.n }}")},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_files(tiny_dir / "tokenizer.json", tmp_path / "tokenizer_config.json", None)
    out = t.apply_chat_template([{"role": "user", "content": "<é>"}] * 3, greeting="hey")
    year, message, greeting, count = out.split("|")
    assert int(year) >= 2024 and json.loads(message) == {"role": "user", "content": "<é>"}
    assert "<é>" in message and greeting == "hey" and count == "1"
    with pytest.raises(jinja2.TemplateError, match="need two messages"):
        t.apply_chat_template([{"role": "user", "content": "<é>"}])


def test_chat_template_is_sandboxed(tiny_dir, tmp_path):
    (tmp_path / "evil.jinja").write_text("{{ messages.__class__.__mro__ }}")
    t = Tokenizer.from_files(tiny_dir / "tokenizer.json", None, tmp_path / "evil.jinja")
    with pytest.raises(jinja2.exceptions.SecurityError):
        t.apply_chat_template(MESSAGES)


# --- incremental detokenization ---------------------------------------------------

def _stream(tok, ids, skip_special_tokens=False):
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip_special_tokens)
    pieces = []
    for i, token_id in enumerate(ids):
        pieces.append(detok.push(token_id))
        so_far = "".join(pieces)
        prefix = tok.decode(ids[: i + 1], skip_special_tokens)
        # Text comes out as soon as its characters are complete, and never a broken one.
        if not prefix.endswith("\ufffd"):
            assert so_far == prefix
        assert prefix.startswith(so_far)
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_incremental_equals_full_decode(tok, text):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    if any(ord(c) > 127 for c in text):
        assert "" in pieces[:-1]  # some token ended inside a character and was held back


def test_incremental_special_tokens(tok):
    text = "<|im_start|>assistant\n<think>\n思考 🤔\n</think>\n\nDone ✅<|im_end|>"
    ids = tok.encode(text)
    for skip in (False, True):
        pieces = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
    assert "<|im_end|>" not in "".join(_stream(tok, ids, skip_special_tokens=True))


def test_incremental_invalid_utf8(tok):
    cjk = tok.encode("你")  # three byte tokens: E4 BD A0
    assert len(cjk) == 3
    tail = tok.encode("ab")
    # A character cut short and followed by text: the replacement comes out with the text.
    ids = cjk[:2] + tail
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "\ufffdab"
    # A character cut short at the very end: flush() emits what decode() gives.
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in tail + cjk[:2]] == ["a", "b", "", ""]
    assert detok.flush() == tok.decode(tail + cjk[:2])[2:] and detok.flush() == ""


def _generic(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer, detokenized by the window algorithm that serves non-byte-level decoders."""
    other = copy.copy(tok)
    other.byte_level = False
    return other


@pytest.mark.parametrize("path", ["byte-level", "window"])
@pytest.mark.parametrize("text", TEXTS + ["<|im_start|>x 你\n<think>é</think><|im_end|>"], ids=range(len(TEXTS) + 1))
def test_both_detokenizers_equal_full_decode(tok, path, text):
    t = tok if path == "byte-level" else _generic(tok)
    ids = t.encode(text)
    for skip in (False, True):
        assert "".join(_stream(t, ids, skip_special_tokens=skip)) == t.decode(ids, skip)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 305), max_size=24), skip=st.booleans())
def test_token_bytes_are_what_decode_joins(tok, ids, skip):
    """decode(ids) is the lossy UTF-8 decoding of the tokens' bytes joined, for any ids (out-of-range,
    special and partial-character tokens included), and streaming them gives the same text."""
    joined = b"".join(tok.token_bytes(i, skip) for i in ids)
    assert joined.decode("utf-8", "replace") == tok.decode(ids, skip)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == tok.decode(ids, skip)


def test_incremental_cost_per_token_is_bounded(tiny_dir, monkeypatch):
    """Byte-level: each push looks at one token's bytes and never decodes the sequence."""
    tok = Tokenizer.from_dir(tiny_dir)
    ids = tok.encode("".join(TEXTS) * 20)
    full = tok.decode(ids)
    monkeypatch.setattr(tok, "decode", lambda *a, **k: pytest.fail("push decoded the sequence"))
    looked_up = []
    plain_bytes = tok.token_bytes
    monkeypatch.setattr(tok, "token_bytes", lambda i, skip=False: looked_up.append(i) or plain_bytes(i, skip))
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == full
    assert looked_up == ids


def test_a_long_run_that_never_decodes_streams_at_once_and_stays_cheap(tok):
    """9,000 lone continuation bytes: each is U+FFFD for good, so each push emits it at once
    (the window algorithm held the whole run back and re-decoded it every push: 6.2 s here)."""
    lone = tok.encode("你")[1]  # 0xBD alone can never start a character
    ids = [lone] * 9000 + tok.encode("ok")
    detok = IncrementalDetokenizer(tok)
    start = time.perf_counter()
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    elapsed = time.perf_counter() - start
    assert pieces[:9000] == ["\ufffd"] * 9000 and "".join(pieces) == tok.decode(ids)
    assert elapsed < 1.0, elapsed  # 13 ms measured; quadratic re-decoding took 6.2 s
