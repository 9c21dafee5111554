"""Tokenizer: tokenizer.json, the checkpoint's chat templates, incremental detokenization.

`Tokenizer` wraps a Hugging Face `tokenizer.json` (loaded with the `tokenizers`
library) plus what `tokenizer_config.json` / `chat_template.jinja` say:
- `encode` adds nothing (Qwen has no BOS); special tokens written in the text
  (`<|im_start|>`) are recognised as their ids, as transformers does.
- `apply_chat_template` renders the model's own template as transformers does
  (`pprt.chat_template`). A `chat_template.jinja` file wins over the
  `chat_template` of the config, as in transformers; the config's may be a
  list of named templates ("default", "tool_use", ...). No template means a
  plain completion model: ValueError.

`IncrementalDetokenizer` turns a stream of ids into text pieces whose
concatenation (with `flush()`) equals `decode(all_ids)`, and never emits a
character that a later token could still change. For a byte-level tokenizer
(every Qwen tokenizer: a `ByteLevel` decoder) each token's bytes go through
one incremental UTF-8 decoder: O(1) per token whatever came before, and a
run of bytes that can never decode streams out as U+FFFD at once. Any other
decoder uses vLLM's two-offset window (text is the difference between
decoding ids[prefix:] and ids[prefix:read], held back while it ends in
U+FFFD): a few tokens per push, more only while a held-back run lasts.

Knows nothing about devices, models or sampling.
"""

from __future__ import annotations

import codecs
import functools
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders as _decoders

from .chat_template import ChatTemplates
from .fields import read_json

_REPLACEMENT = "\ufffd"
# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES); any other `*_token` key of
# tokenizer_config.json is a model-specific one and reaches the template as well.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """The ByteLevel alphabet: each of the 256 byte values is written as one printable character
    (GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the others are
    shifted to U+0100 and up, in order)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or {{'content': ...}}, got {value!r}")


def _named_templates(value: Any, source: str) -> dict[str, str]:
    # `chat_template` is a string, or a list of {"name", "template"} entries.
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{source}: chat_template list entries must be {{'name': str, 'template': str}}, "
                                 f"got {entry!r}")
            named[entry["name"]] = entry["template"]
        return named
    raise ValueError(f"{source}: chat_template must be a string or a list, got {type(value).__name__}")


def _special_tokens(config: dict) -> dict[str, str]:
    """The tokens transformers passes to a chat template: the named ones and every other
    `*_token` key of tokenizer_config.json that holds a token, those that are set."""
    tokens = {}
    for key, value in config.items():
        if key in _NAMED_TOKENS:
            content = _token_content(value)
        elif key.endswith("_token") and (isinstance(value, str) or isinstance(value, dict)
                                         and isinstance(value.get("content"), str)):
            content = _token_content(value)
        else:
            continue
        if content is not None:
            tokens[key] = content
    return tokens


class Tokenizer:
    """A byte-level BPE tokenizer with the checkpoint's special tokens and chat templates."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | dict[str, str] | None = None,
                 source: str = "tokenizer", special_tokens: dict[str, str] | None = None) -> None:
        """chat_template: one template, or several by name; special_tokens: what the template
        sees besides eos_token and bos_token (pad_token, ...)."""
        self._tok = tokenizer
        self._source = source  # names the files in error messages
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        self.byte_level = isinstance(tokenizer.decoder, _decoders.ByteLevel)
        self._bytes: dict[int, bytes] = {}  # token id -> its bytes (byte-level only), filled as seen
        templates = {"default": chat_template} if isinstance(chat_template, str) else dict(chat_template or {})
        tokens = {**(special_tokens or {}), "eos_token": eos_token, "bos_token": bos_token}
        self._templates = ChatTemplates(
            templates, {k: v for k, v in tokens.items() if v is not None}, source) if templates else None

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config: Path | None = None,
                   chat_template_file: Path | None = None) -> Tokenizer:
        """Load tokenizer.json; special tokens and templates from the optional files."""
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
        tok = _HFTokenizer.from_file(str(tokenizer_json))
        config: dict[str, Any] = {}
        if tokenizer_config is not None:
            config = read_json(Path(tokenizer_config))  # strict JSON; CheckpointError naming the file
        templates = _named_templates(config.get("chat_template"), str(tokenizer_config))
        if chat_template_file is not None:  # the file replaces the config's templates, as in transformers
            templates = {"default": Path(chat_template_file).read_text(encoding="utf-8")}
        return cls(tok, eos_token=_token_content(config.get("eos_token")),
                   bos_token=_token_content(config.get("bos_token")), chat_template=templates,
                   source=str(tokenizer_json.parent), special_tokens=_special_tokens(config))

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        """Load from a model directory: tokenizer.json and, if present,
        tokenizer_config.json and chat_template.jinja."""
        path = Path(path)
        config, template = path / "tokenizer_config.json", path / "chat_template.jinja"
        return cls.from_files(path / "tokenizer.json",
                              config if config.is_file() else None,
                              template if template.is_file() else None)

    def _id_of(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self._source}: {field} {token!r} is not in tokenizer.json's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (a model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes a byte-level decoder makes of one token, as the `tokenizers` ByteLevel decoder
        does: a token whose characters are all in the byte alphabet stands for those bytes,
        any other (an added token holding a space or a newline) for its own UTF-8; an unknown id, or a
        special token when skipping them, for nothing. decode(ids) is the lossy UTF-8 decoding
        of the tokens' bytes joined. Byte-level tokenizers only (ValueError otherwise)."""
        if not self.byte_level:
            raise ValueError(f"{self._source}: token_bytes needs a ByteLevel decoder")
        if skip_special_tokens and token_id in self.special_token_ids:
            return b""
        cached = self._bytes.get(token_id)
        if cached is None:
            text = self._tok.id_to_token(token_id) or ""
            table = _byte_of_char()
            cached = bytes(table[c] for c in text) if all(c in table for c in text) else text.encode("utf-8")
            self._bytes[token_id] = cached
        return cached

    @property
    def has_chat_template(self) -> bool:
        return self._templates is not None

    @property
    def chat_template(self) -> str | None:
        """The template rendered when no tools are given (None without one)."""
        return None if self._templates is None else self._templates.templates[self._templates.pick()]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role", "content", ...}]) with the model's template, as
        transformers' apply_chat_template(..., tokenize=False) does.

        kwargs reach the template as variables (tools, documents, enable_thinking, ...).
        """
        if self._templates is None:
            raise ValueError(
                f"{self._source}: the model has no chat template (no 'chat_template' in "
                "tokenizer_config.json and no chat_template.jinja); it is a plain completion "
                "model: give it a prompt string, not messages")
        return self._templates.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)


class IncrementalDetokenizer:
    """Text pieces from ids pushed one at a time; never emits a character a later id could change."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        # byte-level: one incremental UTF-8 decoder over the tokens' bytes (lossy, as decode())
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if tokenizer.byte_level else None
        # any other decoder: ids[prefix:read] decode to text already emitted (context); ids[read:] not yet
        self._prefix = 0
        self._read = 0

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self.ids[start:stop], self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        if self._utf8 is not None:
            return self._utf8.decode(self._tokenizer.token_bytes(token_id, self.skip_special_tokens))
        # Decoding from `prefix` (not `read`) keeps context for decoders that
        # change a token's text by position (e.g. a stripped leading space).
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is held back at the end (undecodable bytes come out as U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]
