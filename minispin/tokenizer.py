"""Tokenizers for Llama/Mistral checkpoints and their chat templates.

`load_tokenizer(path)` reads a Hugging Face tokenizer folder: `tokenizer.json` through the `tokenizers`
library when present, else `tokenizer.model` through `sentencepiece`; special tokens and `add_bos_token`
come from `tokenizer_config.json` / `special_tokens_map.json`. A GGUF file's tokenizer metadata becomes
the same pair in memory (minispin.gguf.read_tokenizer). Nothing is fetched, nothing is unpickled, no
remote code runs.

Compatibility notes (checked against transformers 5.23, see tests/test_tokenizer.py):

- tokenizer.json is applied exactly as stored (like the `tokenizers` library and transformers 4.x),
  except that a stored truncation or padding block is switched off: encode() never drops tokens.
- transformers 5.x rebuilds Llama-class tokenizers from class defaults (a Metaspace pre-tokenizer)
  instead of the stored normalizer. For the zephyr/Mistral tokenizer.json this gives different ids in
  three cases only: text that starts with a space, text that starts with a space right after a special
  token (`"</s> hi"`), and text that starts with a literal "▁". There minispin follows the file (= the
  SentencePiece model and transformers 4.x, with which such checkpoints were trained): " hi" ->
  ["▁", "▁hi"], where transformers 5.x gives ["▁hi"]. Everywhere else the ids are identical,
  including chat-template output such as "</s>\\n<|user|>\\n".
- The sentencepiece path splits the text on special tokens (`<s>`, `</s>`, `<unk>`, configured ones)
  and encodes each piece between them with sentencepiece. With `legacy` true (the default when
  tokenizer_config.json does not say, as in transformers 4.x LlamaTokenizer and Meta's reference code)
  every piece gets sentencepiece's dummy-prefix "▁", the same ids as the legacy tokenizer.json
  normalizer. With `"legacy": false` only a piece at the very start of the text gets "▁" (Metaspace
  prepend_scheme "first", as transformers' LlamaTokenizer with legacy=False).
- transformers 5.23 itself cannot load a folder holding only a Llama-2 tokenizer.model without the
  protobuf package, and then adds neither a BOS token nor the dummy prefix ("hello" -> "hello" instead
  of "▁hello"). minispin uses the LlamaTokenizer defaults instead: bos "<s>", eos "</s>", unk "<unk>",
  add_bos_token true, add_eos_token false.
- decode() follows the Llama/Mistral decoder chain of transformers' fast tokenizers ("▁" -> " ", byte
  fallback, drop one leading space) on both paths; decode(encode(text, False)) == text whenever the
  text holds no special token and no literal "▁" (which decodes as a space).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from datetime import datetime
from typing import Any

from . import gguf
from .errors import UserError

SPIN_TEMPLATE = "### Instruction: {prompt}\n\n### Response: "
"""The instruction template of the SPIN paper's public generation code."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")

# LlamaTokenizer's defaults, used when no config names a token (and the token exists in the vocab).
DEFAULT_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
SPECIAL_TOKEN_KEYS = tuple(DEFAULT_SPECIAL_TOKENS)

_MISSING = object()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(UserError):
    """A tokenizer folder or file we cannot use as given (bad JSON, unknown token, vocabulary mismatch)."""


# ----------------------------------------------------------------------------------------------------
# Config files


def _read_json(path: str) -> Any:
    """Parsed JSON of `path`, or None when the file does not exist; malformed files raise naming the file."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: malformed JSON ({err})") from err


def _read_json_object(path: str) -> dict:
    data = _read_json(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _token_content(value: Any, key: str, source: str) -> str | None:
    """A special-token setting as a string: configs store a string, a {"content": ...} dict or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: {key} must be a string, a {{\"content\": ...}} object or null, got {value!r}")


def _bool_setting(config: dict, key: str, default: bool, source: str) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise TokenizerError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _find_files(path: str, backend: str | None) -> tuple[str, str, str]:
    """(folder, tokenizer file, kind) for a folder or a tokenizer file; kind is 'tokenizers' or 'sentencepiece'."""
    if backend not in (None, "tokenizers", "sentencepiece"):
        raise TokenizerError(f"backend must be None, 'tokenizers' or 'sentencepiece', got {backend!r}")
    if os.path.isfile(path):
        kind = "tokenizers" if path.endswith(".json") else "sentencepiece"
        if backend is not None and backend != kind:
            raise TokenizerError(f"{path}: backend {backend!r} asked for, but this is a {kind} file")
        return os.path.dirname(os.path.abspath(path)), path, kind
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer path {path!r} does not exist (expected a folder holding {' or '.join(TOKENIZER_FILES)}, "
            "or a tokenizer.model / tokenizer.json file)"
        )
    wanted = {"tokenizers": ["tokenizer.json"], "sentencepiece": ["tokenizer.model"], None: list(TOKENIZER_FILES)}
    for name in wanted[backend]:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return path, candidate, "tokenizers" if name.endswith(".json") else "sentencepiece"
    raise FileNotFoundError(f"no tokenizer file in {path!r}: looked for {' and '.join(wanted[backend])}")


def _read_chat_templates(folder: str, config: dict, config_path: str) -> tuple[dict[str, str], str]:
    """Named chat templates ("default" is the tokenizer's own) and where they were found (folder None:
    only `config`'s own)."""
    jinja_path = os.path.join(folder, "chat_template.jinja") if folder is not None else ""
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return {"default": f.read()}, jinja_path
    json_path = os.path.join(folder, "chat_template.json") if folder is not None else ""
    json_data = _read_json_object(json_path) if folder is not None else {}
    if "chat_template" in json_data:
        value, source = json_data["chat_template"], json_path
    else:
        value, source = config.get("chat_template"), config_path
    if value is None:
        return {}, source
    if isinstance(value, str):
        return {"default": value}, source
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}, source
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


# ----------------------------------------------------------------------------------------------------
# Chat templates (Jinja, sandboxed like transformers)


class _TemplateError(Exception):
    """Raised by a template's raise_exception(); turned into a ValueError by apply_chat_template."""


def _raise_exception(message: str) -> None:
    raise _TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as transformers provides).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile_chat_template(source: str):
    """Compile a Jinja chat template in an immutable sandbox (trim_blocks, lstrip_blocks, as transformers)."""
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise ImportError("chat templates need the optional package jinja2: pip install 'jinja2>=3.1.6'") from err
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older sandboxes can be escaped), found {jinja2.__version__}")

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` renders its body unchanged (used to mark answers)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TokenizerError(f"message {i} must be a dict with a string 'role', got {message!r}")
    return [copy.deepcopy(dict(m)) for m in messages]


def render_spin_prompt(messages: list[dict]) -> str:
    """The SPIN paper's template for [system?, user, assistant?]: the system text (if any) and a blank line
    go before the user's text inside the instruction; a final assistant answer is appended after the
    response header. Other shapes (several user turns) raise: the template holds a single instruction."""
    roles = [m["role"] for m in messages]
    start = 1 if roles[:1] == ["system"] else 0
    shape = roles[start:]
    if shape not in (["user"], ["user", "assistant"]):
        raise TokenizerError(
            "the 'spin' template renders [system?, user, assistant?] (one instruction and its answer); "
            f"got roles {roles}"
        )
    contents = [m.get("content") for m in messages]
    for role, content in zip(roles, contents):
        if not isinstance(content, str):
            raise TokenizerError(f"the 'spin' template needs string contents; the {role} message has {content!r}")
    prompt = contents[start]
    if start:
        prompt = contents[0] + "\n\n" + prompt
    text = SPIN_TEMPLATE.format(prompt=prompt)
    if shape[-1] == "assistant":
        text += contents[-1]
    return text


# ----------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Common part of both backends: special tokens, bos/eos handling, chat templates.

    Attributes: path, backend ("tokenizers" | "sentencepiece"), tokenizer_file, bos_token/eos_token/
    pad_token/unk_token (str | None), bos_id/eos_id/unk_id (int | None), pad_id (pad token's id, else
    eos_id: padding positions are always masked, so any valid id works), vocab_size (including added
    tokens), add_bos_token, add_eos_token, stop_ids (eos_id plus the eos_token_id list of a
    generation_config.json next to the tokenizer), chat_template (str | None).
    """

    backend = ""
    files_in_memory: dict[str, str] = {}  # {file name: text} an HF folder needs, for a tokenizer read from no folder

    def __init__(self, path: str, folder: str | None, tokenizer_file: str, settings: dict | None = None):
        """`settings`: tokenizer_config.json's content given in memory (a GGUF file's metadata); then no
        file beside `tokenizer_file` is read (folder None)."""
        self.path = path
        self.tokenizer_file = tokenizer_file
        in_memory = settings is not None
        self.config_path = f"{tokenizer_file} (tokenizer metadata)" if in_memory else os.path.join(folder, CONFIG_FILE)
        config = settings if in_memory else _read_json_object(self.config_path)
        special_map_path = "" if in_memory else os.path.join(folder, SPECIAL_TOKENS_MAP_FILE)
        special_map = {} if in_memory else _read_json_object(special_map_path)
        self._config = config
        self.legacy = _bool_setting(config, "legacy", True, self.config_path)
        self._load_backend(config)

        # Special tokens: tokenizer_config.json, then special_tokens_map.json, then LlamaTokenizer defaults.
        for key in SPECIAL_TOKEN_KEYS:
            if key in config:
                token, source = _token_content(config[key], key, self.config_path), self.config_path
            elif key in special_map:
                token, source = _token_content(special_map[key], key, special_map_path), special_map_path
            else:
                token, source = DEFAULT_SPECIAL_TOKENS[key], None
                if token is not None and self.token_to_id(token) is None:
                    token = None
            token_id = None
            if token is not None:
                token_id = self.token_to_id(token)
                if token_id is None:
                    raise TokenizerError(f"{source}: {key} {token!r} is not in the vocabulary of {self.tokenizer_file}")
            setattr(self, key, token)
            setattr(self, key[: -len("token")] + "id", token_id)
        self.additional_special_tokens = self._additional_special_tokens(config, special_map, special_map_path)

        default_bos, default_eos = self._default_add_bos_eos()
        self.add_bos_token = _bool_setting(config, "add_bos_token", default_bos, self.config_path)
        self.add_eos_token = _bool_setting(config, "add_eos_token", default_eos, self.config_path)
        for flag, key in (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token")):
            if getattr(self, flag) and getattr(self, key) is None:
                raise TokenizerError(f"{self.config_path}: {flag} is true but no {key} is configured")
        if self.pad_id is None:
            self.pad_id = self.eos_id  # padding is masked out, any valid id will do

        self.stop_ids = self._stop_ids(None if in_memory else os.path.join(folder, GENERATION_CONFIG_FILE))
        self.chat_templates, self.chat_template_source = _read_chat_templates(folder, config, self.config_path)
        self.chat_template = self.chat_templates.get("default")

    # --- backend interface -----------------------------------------------------------------------
    def _load_backend(self, config: dict) -> None:
        raise NotImplementedError

    def _default_add_bos_eos(self) -> tuple[bool, bool]:
        raise NotImplementedError

    def _encode_text(self, text: str) -> list[int]:
        """Ids of `text` without bos/eos; special tokens written in the text are recognised."""
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------
    def _additional_special_tokens(self, config: dict, special_map: dict, special_map_path: str) -> list[str]:
        if "additional_special_tokens" in config:
            values, source = config["additional_special_tokens"], self.config_path
        else:
            values, source = special_map.get("additional_special_tokens") or [], special_map_path
        if not isinstance(values, list):
            raise TokenizerError(f"{source}: additional_special_tokens must be a list, got {values!r}")
        tokens = []
        for value in values:
            token = _token_content(value, "additional_special_tokens", source)
            if token is None or self.token_to_id(token) is None:
                raise TokenizerError(
                    f"{source}: additional_special_tokens entry {token!r} is not in the vocabulary of {self.tokenizer_file}"
                )
            tokens.append(token)
        return tokens

    def _stop_ids(self, generation_config_path: str | None) -> list[int]:
        stop = [] if self.eos_id is None else [self.eos_id]
        extra = _read_json_object(generation_config_path).get("eos_token_id") if generation_config_path else None
        extra = [] if extra is None else extra if isinstance(extra, list) else [extra]
        for token_id in extra:
            if not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{generation_config_path}: eos_token_id {token_id!r} is not a valid token id")
            if token_id not in stop:
                stop.append(token_id)
        return stop

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, add_bos_token={self.add_bos_token})"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with bos/eos added as configured when add_special_tokens. Never truncates.
        Special tokens written in the text ("</s>" in a rendered chat template) become their ids, as in
        transformers."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._with_special(self._encode_text(text), add_special_tokens)

    def _with_special(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(text, add_special_tokens) for text in texts]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; ids outside the vocabulary raise."""
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenizerError(f"token id {bad} is outside the vocabulary (size {self.vocab_size}) of {self.tokenizer_file}")
        return self._decode_ids(ids, skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # --- chat templates --------------------------------------------------------------------------
    def _resolve_template(self, template: str | None) -> tuple[str, str]:
        """(kind, source) for a template argument: kind 'spin' or a Jinja string."""
        if template is None or template == "chat":
            if self.chat_template is None:
                raise TokenizerError(
                    f"tokenizer {self.path!r} has no chat_template (looked in {self.config_path} and "
                    f"{' / '.join(CHAT_TEMPLATE_FILES)}); use template='spin' or pass a Jinja template string"
                )
            return self.chat_template, f"chat_template of {self.chat_template_source}"
        if template == "spin":
            return "spin", "spin"
        if template in self.chat_templates:
            return self.chat_templates[template], f"chat template {template!r} of {self.chat_template_source}"
        if "{{" in template or "{%" in template:
            return template, "the given Jinja template"
        raise TokenizerError(
            f"unknown template {template!r}: expected 'chat', 'spin', a named template of this tokenizer "
            f"{sorted(self.chat_templates)} or a Jinja template string"
        )

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, template: str | None = None, **kwargs: Any
    ) -> str:
        """Render a conversation as text, the way transformers' apply_chat_template(tokenize=False) does.

        template: None / "chat" = the tokenizer's chat_template; "spin" = the SPIN paper's
        "### Instruction: {prompt}\\n\\n### Response: " (see render_spin_prompt; its response header is
        always there, so add_generation_prompt changes nothing); a name from a list of named templates;
        or a literal Jinja string. The Jinja templates see messages, add_generation_prompt, tools,
        documents, bos_token/eos_token/unk_token/pad_token (those set), raise_exception, and **kwargs.
        """
        messages = _check_messages(messages)
        source, origin = self._resolve_template(template)
        if source == "spin":
            return render_spin_prompt(messages)
        try:
            compiled = _compile_chat_template(source)
        except ImportError:
            raise
        except Exception as err:  # jinja2.TemplateSyntaxError and friends
            raise TokenizerError(f"cannot compile {origin}: {err}") from err
        variables = {key: getattr(self, key) for key in SPECIAL_TOKEN_KEYS if getattr(self, key) is not None}
        if self.additional_special_tokens:
            variables["additional_special_tokens"] = list(self.additional_special_tokens)
        variables.update(kwargs)
        from jinja2.exceptions import TemplateError  # importable: _compile_chat_template succeeded

        try:
            return compiled.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except (_TemplateError, TemplateError) as err:  # raise_exception(), undefined names, sandbox violations
            raise TokenizerError(f"{origin} failed on this conversation: {err}") from err

    def render_prompt(self, messages: list[dict], template: str | None = None) -> str:
        """The prompt text, ending where the assistant's answer begins: apply_chat_template(prompt
        messages, add_generation_prompt=True). A final assistant message, if any, is left out, so a full
        [user, assistant] row gives its prompt. Training takes the answer's tokens from the jointly
        encoded conversation instead of encoding the answer on its own (`minispin.collate.tokenize_answers`)."""
        messages = _check_messages(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages:
            raise TokenizerError("render_prompt needs at least one non-assistant message")
        return self.apply_chat_template(messages, add_generation_prompt=True, template=template)


class HFTokenizersTokenizer(Tokenizer):
    """tokenizer.json through the `tokenizers` library, as stored, minus truncation and padding."""

    backend = "tokenizers"

    def __init__(self, path: str, folder: str | None, tokenizer_file: str, settings: dict | None = None,
                 tokenizer_json: str | None = None):
        """`tokenizer_json`: the tokenizer.json text given in memory (with `settings`, see Tokenizer)."""
        self._tokenizer_json = tokenizer_json
        super().__init__(path, folder, tokenizer_file, settings)
        if tokenizer_json is not None:
            self.files_in_memory = {"tokenizer.json": tokenizer_json,
                                    "tokenizer_config.json": json.dumps(settings, indent=2, ensure_ascii=False) + "\n"}

    def _load_backend(self, config: dict) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            if self._tokenizer_json is not None:
                self._tokenizer = RustTokenizer.from_str(self._tokenizer_json)
            else:
                self._tokenizer = RustTokenizer.from_file(self.tokenizer_file)
        except Exception as err:
            raise TokenizerError(f"{self.tokenizer_file}: not a valid tokenizers file ({err})") from err
        # A truncation/padding block left in tokenizer.json must not silently cut or pad our sequences.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    def _default_add_bos_eos(self) -> tuple[bool, bool]:
        # Without a config setting, do what the stored post-processor does for bos/eos.
        ids = self._tokenizer.encode("", add_special_tokens=True).ids
        add_bos = bool(ids) and self.bos_id is not None and ids[0] == self.bos_id
        add_eos = bool(ids) and self.eos_id is not None and ids[-1] == self.eos_id and (len(ids) > 1 or not add_bos)
        return add_bos, add_eos

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def _encode_text(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: texts[{i}] is a {type(text).__name__}, not a str")
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_special(e.ids, add_special_tokens) for e in encodings]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through `sentencepiece`, split on special tokens like transformers' LlamaTokenizer."""

    backend = "sentencepiece"

    def _load_backend(self, config: dict) -> None:
        import sentencepiece

        with open(self.tokenizer_file, "rb") as f:
            model_proto = f.read()
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
            # legacy=False: no dummy prefix from sentencepiece; encode() adds "▁" to the text's start only.
            self._sp_plain = (
                self._sp if self.legacy else sentencepiece.SentencePieceProcessor(model_proto=_without_dummy_prefix(model_proto))
            )
        except (RuntimeError, OSError, ValueError) as err:
            raise TokenizerError(f"{self.tokenizer_file}: not a valid sentencepiece model ({err})") from err
        sp = self._sp
        self._pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self._piece_ids = {piece: i for i, piece in enumerate(self._pieces)}
        self._byte_values = {i: int(_BYTE_PIECE.fullmatch(self._pieces[i]).group(1), 16) for i in range(len(self._pieces)) if sp.is_byte(i)}
        special_ids = {i for i in range(len(self._pieces)) if sp.is_control(i) or sp.is_unknown(i)}

        # Tokens listed in tokenizer_config.json's added_tokens_decoder (may extend the vocabulary).
        self._added = {}  # id -> content
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise TokenizerError(f"{self.config_path}: added_tokens_decoder must be an object")
        for key, value in decoder.items():
            content = _token_content(value, f"added_tokens_decoder[{key}]", self.config_path)
            if not key.isdigit() or content is None:
                raise TokenizerError(f"{self.config_path}: bad added_tokens_decoder entry {key!r}: {value!r}")
            token_id = int(key)
            if token_id < len(self._pieces) and self._pieces[token_id] != content:
                raise TokenizerError(
                    f"{self.config_path}: added_tokens_decoder[{key}] is {content!r} but {self.tokenizer_file} "
                    f"has {self._pieces[token_id]!r} at id {token_id}"
                )
            self._added[token_id] = content
            if not isinstance(value, dict) or value.get("special", True):
                special_ids.add(token_id)
        self._added_ids = {content: i for i, content in self._added.items()}
        self.vocab_size = max([len(self._pieces)] + [i + 1 for i in self._added])
        self._special_ids = special_ids

    def _default_add_bos_eos(self) -> tuple[bool, bool]:
        return True, False  # LlamaTokenizer defaults

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        return self._piece_ids.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self._added:
            return self._added[token_id]
        return self._pieces[token_id] if 0 <= token_id < len(self._pieces) else None

    @functools.cached_property
    def _split_pattern(self) -> re.Pattern | None:
        """Regex matching the special tokens recognised inside text (longest first)."""
        tokens = {self._pieces[i] for i in self._special_ids if i < len(self._pieces)}
        tokens |= set(self._added.values())
        tokens |= {getattr(self, key) for key in SPECIAL_TOKEN_KEYS if getattr(self, key) is not None}
        tokens |= set(self.additional_special_tokens)
        tokens.discard("")
        if not tokens:
            return None
        return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        position = 0
        pattern = self._split_pattern
        matches = list(pattern.finditer(text)) if pattern is not None else []
        for match in matches + [None]:
            end = match.start() if match is not None else len(text)
            if end > position:
                ids.extend(self._encode_piece(text[position:end], at_start=position == 0))
            if match is not None:
                ids.append(self.token_to_id(match.group()))
                position = match.end()
        return ids

    def _encode_piece(self, piece: str, at_start: bool) -> list[int]:
        if self.legacy:
            return self._sp.encode(piece)  # sentencepiece adds its dummy-prefix "▁" to every piece
        piece = piece.replace(" ", "▁")
        if at_start and not piece.startswith("▁"):
            piece = "▁" + piece
        return self._sp_plain.encode(piece)

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        # The decoder chain of Llama fast tokenizers: "▁" -> " ", byte fallback, fuse, strip one leading space.
        parts: list[str] = []
        pending_bytes = bytearray()

        def flush_bytes():
            if pending_bytes:
                try:
                    parts.append(pending_bytes.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * len(pending_bytes))
                pending_bytes.clear()

        for token_id in ids:
            if token_id in self._special_ids:
                if skip_special_tokens:
                    continue
                flush_bytes()
                parts.append(self.id_to_token(token_id))
            elif token_id in self._byte_values:
                pending_bytes.append(self._byte_values[token_id])
            else:
                flush_bytes()
                token = self.id_to_token(token_id)
                parts.append(token if token_id in self._added else token.replace("▁", " "))
        flush_bytes()
        text = "".join(parts)
        return text[1:] if text.startswith(" ") else text


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise TokenizerError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The sentencepiece ModelProto with normalizer_spec.add_dummy_prefix = false.

    ModelProto field 3 is normalizer_spec; its field 3 is add_dummy_prefix (a bool). Protobuf keeps the
    last value of a repeated scalar, so appending `add_dummy_prefix: false` (bytes 0x18 0x00) suffices.
    """
    out = bytearray()
    pos, found = 0, False
    while pos < len(model_proto):
        start = pos
        key, pos = _read_varint(model_proto, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(model_proto, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(model_proto, pos)
            payload = model_proto[pos : pos + length]
            pos += length
            if field == 3:
                payload += b"\x18\x00"
                out += _varint(key) + _varint(len(payload)) + payload
                found = True
                continue
        else:
            raise TokenizerError(f"unexpected protobuf wire type {wire_type}")
        out += model_proto[start:pos]
    if not found:
        out += _varint(3 << 3 | 2) + _varint(2) + b"\x18\x00"
    return bytes(out)


def load_tokenizer(path: str | os.PathLike, backend: str | None = None) -> Tokenizer:
    """Load the tokenizer in folder `path` (or the tokenizer.model / tokenizer.json / GGUF file `path`).

    tokenizer.json is preferred (via `tokenizers`), tokenizer.model is the fallback (via `sentencepiece`);
    backend="tokenizers" / "sentencepiece" forces one. Config files are read from the same folder. A
    GGUF file's tokenizer is built in memory from its metadata (`tokenizers` backend, nothing else read).
    """
    path = os.fspath(path)
    if gguf.is_gguf(path):
        if backend not in (None, "tokenizers"):
            raise TokenizerError(f"{path}: backend {backend!r} asked for, but a GGUF tokenizer uses 'tokenizers'")
        tokenizer_json, settings = gguf.read_tokenizer(path)
        return HFTokenizersTokenizer(path, None, path, settings=settings, tokenizer_json=tokenizer_json)
    folder, tokenizer_file, kind = _find_files(path, backend)
    cls = HFTokenizersTokenizer if kind == "tokenizers" else SentencePieceTokenizer
    return cls(path, folder, tokenizer_file)


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, model: Any = "the model") -> None:
    """Refuse a tokenizer whose ids reach past the model's vocabulary (checked when both are loaded, so a
    mismatch stops a run before any work instead of deep inside the first generation or training step).
    A model vocabulary padded past the tokenizer's is fine."""
    size = len(tokenizer)
    if size > vocab_size:
        source = getattr(tokenizer, "path", None) or getattr(tokenizer, "name_or_path", None) or "the tokenizer"
        raise TokenizerError(f"tokenizer {source} and model {model} do not match: the tokenizer has {size} tokens "
                         f"but the model's vocabulary has {vocab_size} (ids >= {vocab_size} cannot be embedded); "
                         "use the tokenizer the model was trained with (--tokenizer, default: the model folder)")
