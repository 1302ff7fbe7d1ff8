"""Secrets: values of tokens, keys and passwords never reach the journal, logs or reports."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

_SECRET_NAME = re.compile(
    r"(?i)(token|secret|passw(?:or)?d|passwd|api[_-]?key|access[_-]?key|private[_-]?key|"
    r"credential|auth|_key$|^key$)")
# Names that look secret but carry none (LLaMA-Factory's `--resume_lora_training`... none yet;
# tokenizer settings are the common false alarm).
_NOT_SECRET = re.compile(r"(?i)^(tokenizer\w*|max_tokens?|\w*_tokens?_\w*|pad_token\w*|"
                         r"\w*token_id|add_special_tokens|use_fast_tokenizer|\w*_token_len\w*|"
                         r"split_special_tokens|new_special_tokens|num_\w+|max_new_tokens|"
                         r"keys?_\w+|monkey\w*|hub_private_repo)$")
_PLACEHOLDER = re.compile(r"<redacted:([A-Za-z_][A-Za-z0-9_]*)>")
_MIN_SECRET_LEN = 4


def is_secret_name(name: str) -> bool:
    """True for names like HF_TOKEN, WANDB_API_KEY, --hub_token, --db-password."""
    bare = name.lstrip("-")
    return bool(_SECRET_NAME.search(bare)) and not _NOT_SECRET.match(bare)


def placeholder(name: str) -> str:
    """The text a secret value is replaced by: names the variable that would hold it."""
    return f"<redacted:{re.sub(r'[^A-Za-z0-9_]', '_', name.lstrip('-')).upper()}>"


@dataclass(frozen=True, slots=True)
class Redactor:
    """Knows the secret values of one run and replaces them wherever they appear."""

    values: tuple[tuple[str, str], ...] = ()
    """(secret value, its placeholder), longest value first."""

    @classmethod
    def for_run(cls, argv: Sequence[str], env: Mapping[str, str]) -> Redactor:
        """Collect secret values from the environment and from argv flags and assignments."""
        found: dict[str, str] = {}
        for name, value in env.items():
            if is_secret_name(name) and len(value) >= _MIN_SECRET_LEN:
                found[value] = placeholder(name)
        for i, token in enumerate(argv):
            name, eq, value = token.partition("=")
            if eq and not token.startswith("-") and is_secret_name(name):
                found[value] = placeholder(name)  # env NAME=value, KEY=value overrides
            elif token.startswith("-") and is_secret_name(name):
                if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    value = argv[i + 1]
                if eq or (i + 1 < len(argv) and value == argv[i + 1]):
                    found[value] = placeholder(name)
        pairs = sorted(((v, p) for v, p in found.items() if len(v) >= _MIN_SECRET_LEN),
                       key=lambda pair: -len(pair[0]))
        return cls(values=tuple(pairs))

    def text(self, text: str) -> str:
        """`text` with every secret value replaced by its placeholder."""
        for value, mark in self.values:
            if value in text:
                text = text.replace(value, mark)
        return text

    def argv(self, argv: Iterable[str]) -> list[str]:
        """Each argument with secret values replaced."""
        return [self.text(a) for a in argv]

    def data(self, data: bytes) -> bytes:
        """The same for raw bytes (attempt logs)."""
        for value, mark in self.values:
            raw = value.encode()
            if raw in data:
                data = data.replace(raw, mark.encode())
        return data


def shell_word(word: str) -> str:
    """Quote one argv word for sh, turning placeholders into required environment variables."""
    import shlex  # noqa: PLC0415 - only final-command.sh needs it

    if not _PLACEHOLDER.search(word):
        return shlex.quote(word)
    parts = _PLACEHOLDER.split(word)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                out.append(shlex.quote(part))
        else:
            out.append(f'"${{{part}:?set {part} (redacted by oom-supervisor)}}"')
    return "".join(out)
