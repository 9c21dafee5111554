"""A tiny Qwen-style tokenizer for tests, trained in milliseconds, no downloads.

`build_tokenizer(directory)` trains a byte-level BPE (the `tokenizers` library)
on a fixed English + Python text and writes the Hugging Face layout a Qwen
checkpoint ships:

    tokenizer.json          NFC normalizer, Qwen2's split regex + ByteLevel,
                            BPE, ByteLevel decoder
    tokenizer_config.json   eos_token "<|im_end|>", no BOS, and (by default)
                            `chat_template`: a ChatML template in Qwen3's
                            style that takes `enable_thinking` and `tools`
    chat_template.jinja     only with template="file" (instead of the config)

Ids: the special tokens `<|endoftext|>` 0, `<|im_start|>` 1, `<|im_end|>` 2,
then the 256 byte symbols, then merges, then `<think>` and `</think>` (added,
not special, as in Qwen3). Every id is < vocab_size, so a tiny model with
vocab_size >= 300 can use it. With so few merges most non-ASCII characters
span several tokens, which is what incremental detokenization tests need.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# Qwen2/Qwen3 tokenizer.json pre-tokenizer pattern.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINING_TEXT = '''\
The quick brown fox jumps over the lazy dog. The dog is not amused, and the fox
runs into the forest where the other foxes are waiting for their dinner.
A model reads the prompt, then it writes the answer one token at a time.
The user asks a question and the assistant answers it in a short sentence.

def greet(name: str) -> str:
    """Return a greeting for the given name."""
    return f"Hello, {name}!"


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def add(self, value: int = 1) -> int:
        self.count += value
        return self.count


for index in range(10):
    if index % 2 == 0:
        print(index, greet("world"))
'''

QWEN3_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

_TEMPLATES = ("chatml-qwen3", "file", None)
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS)


def _train(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),  # the think tokens come after
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict]:
    # The `added_tokens_decoder` section transformers writes into tokenizer_config.json.
    out = {}
    for token_id, added in sorted(tok.get_added_tokens_decoder().items()):
        out[str(token_id)] = {
            "content": added.content, "lstrip": added.lstrip, "normalized": added.normalized,
            "rstrip": added.rstrip, "single_word": added.single_word, "special": added.special,
        }
    return out


def build_tokenizer(
    directory: Path, vocab_size: int = 300, template: str | None = "chatml-qwen3"
) -> Path:
    """Write tokenizer.json, tokenizer_config.json (and maybe chat_template.jinja).

    template: "chatml-qwen3" puts QWEN3_CHAT_TEMPLATE in tokenizer_config.json,
    "file" writes it to chat_template.jinja instead, None writes no template
    (a plain completion model). Returns `directory`.
    """
    if template not in _TEMPLATES:
        raise ValueError(f"template must be one of {_TEMPLATES}, got {template!r}")
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (bytes + special tokens), got {vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = _train(vocab_size)
    assert tok.get_vocab_size(with_added_tokens=True) <= vocab_size
    tok.save(str(directory / "tokenizer.json"))

    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 131072,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
    }
    if template == "chatml-qwen3":
        config["chat_template"] = QWEN3_CHAT_TEMPLATE
    elif template == "file":
        (directory / "chat_template.jinja").write_text(QWEN3_CHAT_TEMPLATE, encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory
