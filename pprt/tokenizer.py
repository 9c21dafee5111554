"""Tokenizer: tokenizer.json, chat templates, incremental detokenization.

`Tokenizer` wraps a Hugging Face `tokenizer.json` (loaded with the `tokenizers`
library) plus what `tokenizer_config.json` / `chat_template.jinja` say:
- `encode` adds nothing (Qwen has no BOS); special tokens written in the text
  (`<|im_start|>`) are recognised as their ids, as transformers does.
- `apply_chat_template` renders the model's own Jinja template in a sandboxed
  environment set up like transformers' (trim_blocks, lstrip_blocks,
  `raise_exception`, `tojson`, `strftime_now`, `namespace`, loop controls).
  A `chat_template.jinja` file wins over a `chat_template` in the config, as
  in transformers. No template means a plain completion model: ValueError.

`IncrementalDetokenizer` turns a stream of ids into text pieces. It keeps two
offsets into the ids seen so far (vLLM's scheme): text is emitted as the
difference between decoding ids[prefix:] and ids[prefix:read], and held back
while the decoded tail ends in U+FFFD (a byte-level token that stops inside a
UTF-8 character). Each push decodes a few tokens, never the whole sequence,
and the pieces plus `flush()` concatenate to `decode(all_ids)`.

Knows nothing about devices, models or sampling.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from .fields import read_json

_REPLACEMENT = "\ufffd"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' override: no HTML escaping, unlike jinja's built-in tojson.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat template namespace attribute {name!r} starts with '_'")


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or {{'content': ...}}, got {value!r}")


def _pick_template(value: Any, source: str) -> str | None:
    # `chat_template` is a string, or a list of {"name", "template"} with a "default" entry.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{source}: chat_template list has no 'default' entry (has {sorted(named)})")
    raise ValueError(f"{source}: chat_template must be a string or a list, got {type(value).__name__}")


class Tokenizer:
    """A byte-level BPE tokenizer with the checkpoint's special tokens and chat template."""

    def __init__(self, tokenizer: _HFTokenizer, eos_token: str | None = None,
                 bos_token: str | None = None, chat_template: str | None = None,
                 source: str = "tokenizer") -> None:
        self._tok = tokenizer
        self._source = source  # names the files in error messages
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        added = tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config: Path | None = None,
                   chat_template_file: Path | None = None) -> Tokenizer:
        """Load tokenizer.json; eos/bos and the template from the optional files."""
        tokenizer_json = Path(tokenizer_json)
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tokenizer_json}")
        tok = _HFTokenizer.from_file(str(tokenizer_json))
        config: dict[str, Any] = {}
        if tokenizer_config is not None:
            config = read_json(Path(tokenizer_config))  # strict JSON; CheckpointError naming the file
        template = _pick_template(config.get("chat_template"), str(tokenizer_config))
        if chat_template_file is not None:
            template = Path(chat_template_file).read_text(encoding="utf-8")
        return cls(tok, eos_token=_token_content(config.get("eos_token")),
                   bos_token=_token_content(config.get("bos_token")), chat_template=template,
                   source=str(tokenizer_json.parent))

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

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` ([{"role", "content", ...}]) with the model's template.

        kwargs reach the template as variables (enable_thinking, tools, ...).
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self._source}: the model has no chat template (no 'chat_template' in "
                "tokenizer_config.json and no chat_template.jinja); it is a plain completion "
                "model: give it a prompt string, not messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError(f"messages must be a list of dicts, got {messages!r}")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        return self._compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)


class IncrementalDetokenizer:
    """Text pieces from ids pushed one at a time; never emits a split character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already emitted (context)
        self._read = 0  # ids[read:] are not emitted yet

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self.ids[start:stop], self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
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
        prefix_text = self._decode(self._prefix, self._read)
        new_text = self._decode(self._prefix)
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]
