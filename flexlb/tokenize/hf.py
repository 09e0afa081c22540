"""A Hugging Face tokenizer from local files: ``tokenizer.json`` (the ``tokenizers`` package) and the chat template of
``tokenizer_config.json`` (or ``chat_template.jinja``), rendered with jinja2 as ``transformers`` and vLLM render it
(sandboxed, ``trim_blocks`` / ``lstrip_blocks``, the special tokens as variables, ``add_generation_prompt=True``), then
encoded without adding special tokens (the template writes them). Completion prompts are encoded with them, as vLLM
does. Nothing is ever downloaded: the path must hold the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flexlb.tokenize.base import ChatPrompt, Prompt, TextPrompt, TokenizerError, TokenPrompt, content_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
_INSTALL = "pip install 'flexlb[tokenizer]'"


def resolve_tokenizer_dir(path: str) -> Path:
    """The directory holding ``tokenizer.json``: ``path`` itself, the file's directory, or, for a model in the Hugging
    Face cache (``models--org--name``), the snapshot ``refs/main`` names (else the only one). TokenizerError naming
    what was looked for otherwise."""
    given = Path(path).expanduser()
    if given.is_file():
        return given.parent
    candidates = [given]
    snapshots = given / "snapshots"
    if snapshots.is_dir():
        ref = given / "refs" / "main"
        if ref.is_file():
            candidates.append(snapshots / ref.read_text().strip())
        candidates += sorted(p for p in snapshots.iterdir() if p.is_dir())
    for candidate in candidates:
        if (candidate / TOKENIZER_FILE).is_file():
            return candidate
    raise TokenizerError(
        f"tokenizerPath {path!r}: no {TOKENIZER_FILE} there (looked in {', '.join(str(c) for c in candidates)});"
        " give the directory of an already-downloaded model or the tokenizer.json itself (flexlb never downloads)"
    )


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken object with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _template_source(config: Mapping[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str) and template:
        return template
    file = directory / TEMPLATE_FILE
    return file.read_text() if file.is_file() else None


def compile_template(source: str) -> Any:
    """The chat template as ``transformers`` compiles it (a sandbox: a template is code from the model's files)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class HfTokenizer:
    """A loaded tokenizer and chat template (see the module docstring); ``load`` builds one from a path."""

    def __init__(self, tokenizer: Any, template: Any | None, special: Mapping[str, str], source: str) -> None:
        self._tokenizer = tokenizer
        self._template = template
        self._special = dict(special)
        self.kind = f"hf:{source}"

    @classmethod
    def load(cls, path: str) -> HfTokenizer:
        """Load from a local path; TokenizerError (a start-up error) when the files are missing or unreadable."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            missing = f"tokenizerPath is set but the tokenizers package is not installed: {_INSTALL}"
            raise TokenizerError(missing) from None
        directory = resolve_tokenizer_dir(path)
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"tokenizerPath {path!r}: cannot read {directory / TOKENIZER_FILE}: {exc}") from None
        config: dict[str, Any] = {}
        config_file = directory / CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError) as exc:
                raise TokenizerError(f"tokenizerPath {path!r}: cannot read {config_file}: {exc}") from None
        special = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
        source = _template_source(config, directory)
        template = None
        if source is not None:
            try:
                template = compile_template(source)
            except Exception as exc:  # a TemplateSyntaxError, or jinja2 missing
                raise TokenizerError(f"tokenizerPath {path!r}: the chat template does not compile: {exc}") from None
        return cls(tokenizer, template, special, str(directory))

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def render(self, prompt: ChatPrompt) -> str:
        """The chat as the engine's template renders it, ending with the assistant's turn."""
        if self._template is None:
            raise TokenizerError(f"the tokenizer ({self.kind}) has no chat_template: use /v1/completions")
        messages = [dict(m, content=content_text(m.get("content"), "\n")) for m in prompt.messages]
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except Exception as exc:  # the template's raise_exception, or a bad variable: the request's fault
            raise TokenizerError(f"the chat template refused the messages: {exc}") from None

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, TokenPrompt):
            return list(prompt.ids)
        if isinstance(prompt, TextPrompt):
            return self._tokenizer.encode(prompt.text, add_special_tokens=True).ids
        return self._tokenizer.encode(self.render(prompt), add_special_tokens=False).ids

    async def tokens(self, prompt: Prompt) -> list[int]:
        return self.encode(prompt)

    async def close(self) -> None:
        return None
