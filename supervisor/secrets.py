"""Secrets: values of tokens, keys and passwords never reach the journal, logs or reports.

Three ways a value is known to be secret:

- by NAME: an environment variable, a `--flag value`, a `key=value` override or a config-file
  key whose name says token / key / password (`HF_TOKEN`, `--hub_token`, `hub_token:`);
- by SHAPE, whatever its name: `ghp_...`, `hf_...`, `sk-...`, `AKIA...`, the password of a
  `scheme://user:PASS@host` URL, a `-----BEGIN ... PRIVATE KEY-----` block;
- in what the command PRINTS, also by the name it gives the value itself (`MY_PASSWORD=...`,
  `"api_key": "..."`, `?token=...`, `Authorization: Bearer ...`), tokenizer special tokens
  and numbers excepted;
- never by being a boolean: `--use_auth_token True` makes nothing secret.

A secret is replaced by `<redacted:NAME>`, NAME being the environment variable that
final-command.sh reads it back from. Config copies that the command must read with the real
value are written to a private 0600 file outside the run folder (`private_copy`); the run
folder keeps the redacted copy, and final-command.sh fills it from the environment at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.files import write_failed, write_file

_SECRET_NAME = re.compile(
    r"(?i)(token|secret|passw(?:or)?d|passwd|api[_-]?key|access[_-]?key|private[_-]?key|"
    r"credential|auth|_key$|^key$|(?:^|[_-])pass(?:$|[_-])|(?:^|[_-])pwd$|passphrase)")
# Names that look secret but carry none (tokenizer settings are the common false alarm).
_NOT_SECRET = re.compile(r"(?i)^(tokenizer\w*|max_tokens?|\w*_tokens?_\w*|pad_token\w*|"
                         r"\w*token_id|add_special_tokens|use_fast_tokenizer|\w*_token_len\w*|"
                         r"split_special_tokens|new_special_tokens|num_\w+|max_new_tokens|"
                         r"keys?_\w+|monkey\w*|hub_private_repo|ssh_auth_sock|pwd|oldpwd)$")
"""(`PWD`/`OLDPWD` are the shell's working directories; `MYSQL_PWD`, `DB_PASS` are secrets.)"""
_PLACEHOLDER = re.compile(r"<redacted:([A-Za-z_][A-Za-z0-9_]*)>")
_MIN_SECRET_LEN = 4
_NOT_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null", "nil",
                         "0", "1", "y", "n", "t", "f", "auto", "default"})
"""Booleans and sentinels: never a secret, whatever the flag's name (`--use_auth_token True`)."""

# Secrets recognised by their shape alone, each with the variable named in its placeholder.
# Sources: GitHub token formats (github.blog 2021-04-05), huggingface_hub (hf_ + 34),
# OpenAI keys (sk-, sk-proj-), AWS access key ids (AKIA/ASIA + 16), Slack (xox?-), GitLab.
SHAPES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"), "GITHUB_TOKEN"),
    (re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"), "GITHUB_TOKEN"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "HF_TOKEN"),
    (re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"), "OPENAI_API_KEY"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AWS_ACCESS_KEY_ID"),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "SLACK_TOKEN"),
    (re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"), "GITLAB_TOKEN"),
)
_URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@<>]*:)([^@\s/<>]+)(@)")
_PEM_ONE_LINE = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)",
    re.DOTALL)
_PEM_BEGIN = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
_PEM_END = re.compile(rb"-----END [A-Z0-9 ]*PRIVATE KEY-----")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_PEM_MAX_LINES = 200
"""A PEM block longer than this without its END line is taken to have ended (never hide a log)."""
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_CONFIG_MAX_BYTES = 16 * 1024 * 1024


def is_secret_name(name: str) -> bool:
    """True for names like HF_TOKEN, WANDB_API_KEY, --hub_token, --db-password."""
    bare = name.lstrip("-")
    return bool(_SECRET_NAME.search(bare)) and not _NOT_SECRET.match(bare)


def is_secret_value(value: str) -> bool:
    """False for what cannot be a secret: short values, booleans, sentinels."""
    return len(value) >= _MIN_SECRET_LEN and value.strip().lower() not in _NOT_VALUES


def placeholder(name: str) -> str:
    """The text a secret value is replaced by: names the variable that would hold it."""
    return f"<redacted:{re.sub(r'[^A-Za-z0-9_]', '_', name.lstrip('-')).upper()}>"


def redact_shapes(text: str) -> str:
    """`text` with every secret recognised by its shape (tokens, URL passwords, PEM) replaced."""
    if "-----BEGIN" in text:
        text = _PEM_ONE_LINE.sub("<redacted:PRIVATE_KEY>", text)
    if "://" in text:
        text = _URL_CREDENTIALS.sub(lambda m: f"{m.group(1)}<redacted:URL_PASSWORD>{m.group(3)}",
                                    text)
    for pattern, name in SHAPES:
        text = pattern.sub(f"<redacted:{name}>", text)
    return text


# What a program PRINTS can name its secret however it likes (`MY_PASSWORD=...`, `"api_key":
# "..."`, `?token=...`, `Authorization: Bearer ...`). Only output is searched this way, never
# argv or config files, whose secrets final-command.sh must be able to read back by name.
# Searched for with str.find (C speed), never with a regex over the whole output: a name that
# holds one of these, then `=`/`:` and a value, is a candidate.
_PRINTED_WORDS = ("token", "secret", "pass", "pwd", "key", "auth", "credential")
_PRINTED_HINTS = (*(w.encode() for w in _PRINTED_WORDS), b"bearer", b"basic")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_AFTER_NAME = re.compile(r"""(["']?)(\s*[=:]\s*)(["']?)([^\s"'`,;&<>(){}\[\]|]{8,})""")
_BEARER = re.compile(r"(?i)\b(Bearer|Basic)(\s+)([A-Za-z0-9._~+/=-]{8,})")
_NUMBER = re.compile(r"[-+]?(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?%?")
_NAME_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_PARTS = frozenset({"token", "secret", "password", "passwd", "pwd", "passphrase",
                           "apikey", "credential", "credentials", "auth", "pass", "pw"})
# A password may be printed after its name with only a space (`DB_PASS s3cr3t!`, `connecting
# with password Hunter2x`): taken for one when it does not read as a plain lower-case word.
_PASSWORD_PARTS = frozenset({"password", "passwd", "pwd", "passphrase", "pass", "pw"})
_AFTER_SPACE = re.compile(r"""([ \t]+)([^\s"'`,;&<>(){}\[\]|]{6,})""")
_PLAIN_WORD = re.compile(r"[a-z]+[.:]?")
# Parts that make a "token" a count, a length or a tokenizer setting, never a credential.
_COUNTING_PARTS = frozenset({"id", "ids", "len", "length", "count", "num", "max", "min", "type",
                             "types", "budget", "limit", "per", "eos", "bos", "pad", "unk",
                             "sep", "cls", "mask", "special", "start", "end", "chat", "im"})


def _printed_secret(name: str, value: str) -> bool:
    """A name the program printed, and its value: a credential, not a setting or a metric."""
    parts = [p.lower() for p in _NAME_PARTS.findall(name)]
    if not parts or not is_secret_value(value) or _NUMBER.fullmatch(value):
        return False
    if value.startswith("<redacted:") or _NOT_SECRET.match(name.strip("-.")):
        return False
    named = bool(_SECRET_PARTS.intersection(parts)) or parts[-1] == "key"
    return named and not ("token" in parts and _COUNTING_PARTS.intersection(parts))


def _is_password_name(name: str) -> bool:
    return bool(_PASSWORD_PARTS.intersection(p.lower() for p in _NAME_PARTS.findall(name)))


def redact_printed(text: str) -> str:
    """`text` (a program's output) with the secrets it names itself replaced."""
    lower = text.lower()
    if "bearer" in lower or "basic" in lower:
        text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}<redacted:AUTHORIZATION>", text)
        lower = text.lower()
    names: set[tuple[int, int]] = set()
    for word in _PRINTED_WORDS:
        at = lower.find(word)
        while at != -1:
            start, end = at, at + len(word)
            while start and text[start - 1] in _NAME_CHARS:
                start -= 1
            while end < len(text) and text[end] in _NAME_CHARS:
                end += 1
            names.add((start, end))
            at = lower.find(word, end)
    cuts: list[tuple[int, int, str]] = []
    for start, end in sorted(names):
        name = text[start:end]
        after = _AFTER_NAME.match(text, end)
        if after is None:
            spaced = _AFTER_SPACE.match(text, end)
            if (spaced is not None and _is_password_name(name)
                    and not _PLAIN_WORD.fullmatch(spaced.group(2))
                    and _printed_secret(name, spaced.group(2))):
                cuts.append((spaced.start(2), spaced.end(2), placeholder(name)))
            continue
        quote, _sep, _vquote, value = after.groups()
        if quote and (not start or text[start - 1] != quote):
            continue  # `name"=...`: the quote after the name must close one before it
        if _printed_secret(name, value):
            cuts.append((after.start(4), after.end(4), placeholder(name)))
    if not cuts:
        return text
    out, last = [], 0
    for begin, finish, mark in cuts:
        if begin >= last:
            out += [text[last:begin], mark]
            last = finish
    return "".join([*out, text[last:]])


@dataclass(frozen=True, slots=True)
class Redactor:
    """Knows the secret values of one run and replaces them (and any secret shape) everywhere."""

    values: tuple[tuple[str, str], ...] = ()
    """(secret value, its placeholder), longest value first."""

    @classmethod
    def for_run(cls, argv: Sequence[str], env: Mapping[str, str], *,
                cwd: str | None = None) -> Redactor:
        """Collect secret values from the environment, argv, and config files argv names."""
        found: dict[str, str] = {}
        for name, value in env.items():
            if is_secret_name(name) and is_secret_value(value):
                found[value] = placeholder(name)
        for i, token in enumerate(argv):
            name, eq, value = token.partition("=")
            following = argv[i + 1] if i + 1 < len(argv) else None
            if token.startswith("-") and is_secret_name(name):
                if eq:
                    found[value] = placeholder(name)  # --hub_token=VALUE
                elif following is not None and not following.startswith("-"):
                    found[following] = placeholder(name)  # --hub_token VALUE
            elif eq and is_secret_name(name):
                found[value] = placeholder(name)  # env NAME=VALUE, key=VALUE overrides
            # A URL's password, named for the flag or key that holds the URL.
            holder = name if eq else (argv[i - 1] if i and argv[i - 1].startswith("-") else "")
            for match in _URL_CREDENTIALS.finditer(token):
                found[match.group(2)] = placeholder(f"{holder}_password" if holder
                                                    else "URL_PASSWORD")
            if token.lower().endswith(_CONFIG_SUFFIXES):
                found.update(config_secrets(_resolve(token, cwd)))
        pairs = sorted(((v, p) for v, p in found.items() if is_secret_value(v)),
                       key=lambda pair: -len(pair[0]))
        return cls(values=tuple(pairs))

    def text(self, text: str) -> str:
        """`text` with every secret value and secret shape replaced by its placeholder."""
        for value, mark in self.values:
            if value in text:
                text = text.replace(value, mark)
        text = redact_shapes(text)
        return _private_to_public(text)

    def argv(self, argv: Iterable[str]) -> list[str]:
        """Each argument with secret values replaced (private config copies by public ones)."""
        return [self.text(a) for a in argv]

    def data(self, data: bytes) -> bytes:
        """The same for raw bytes (attempt logs, console echo)."""
        for value, mark in self.values:
            raw = value.encode()
            if raw in data:
                data = data.replace(raw, mark.encode())
        lower = data.lower()
        shapes = _may_hold_shape(data)
        printed = any(hint in lower for hint in _PRINTED_HINTS)
        if not shapes and not printed:
            return data
        text = data.decode("utf-8", "surrogateescape")
        if shapes:
            text = redact_shapes(text)
        if printed:
            text = redact_printed(text)
        return text.encode("utf-8", "surrogateescape")

    def to_json(self) -> str:
        """The values as JSON, for the attempt shim (which redacts the logs as they are written)."""
        return json.dumps([list(pair) for pair in self.values])

    @classmethod
    def from_json(cls, text: str) -> Redactor:
        """Inverse of to_json; anything malformed gives an empty redactor (shapes still apply)."""
        try:
            pairs = json.loads(text)
            return cls(values=tuple((str(v), str(p)) for v, p in pairs))
        except (ValueError, TypeError):
            return cls()


_SHAPE_HINTS = (b"://", b"-----BEGIN", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_",
                b"github_pat_", b"hf_", b"sk-", b"AKIA", b"ASIA", b"xox", b"glpat-")


def _may_hold_shape(data: bytes) -> bool:
    """Cheap prefilter: the shape regexes only run on bytes that could match one."""
    return any(hint in data for hint in _SHAPE_HINTS)


class LineScrubber:
    """Redacts a byte stream line by line, hiding whole multi-line PEM private-key blocks."""

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self._in_pem = 0  # lines hidden so far in an open PEM block; 0 when none is open

    def lines(self, whole: bytes) -> bytes:
        """Whole lines (each ending in \\n or \\r), as they may be written or shown."""
        if not self._in_pem and b"-----BEGIN" not in whole:
            return self.redactor.data(whole)  # no block can open here: one pass over all
        return b"".join(self.line(m.group()) for m in _LINE.finditer(whole))

    def line(self, raw: bytes) -> bytes:
        """One line (with its terminator), as it may be written or shown."""
        if self._in_pem:
            self._in_pem += 1
            if _PEM_END.search(raw) or self._in_pem > _PEM_MAX_LINES:
                self._in_pem = 0
            return b""
        begin = _PEM_BEGIN.search(raw)
        if begin is not None and not _PEM_END.search(raw, begin.end()):
            self._in_pem = 1
            return self.redactor.data(raw[:begin.start()]) + b"<redacted:PRIVATE_KEY>" + \
                _ending(raw)
        return self.redactor.data(raw)


def _ending(raw: bytes) -> bytes:
    return raw[len(raw.rstrip(b"\r\n")):]


# --- config files ------------------------------------------------------------------------------


def _resolve(token: str, cwd: str | None) -> Path:
    path = Path(token.partition("=")[2] if "=" in token and not token.startswith("/")
                else token).expanduser()
    return path if path.is_absolute() or cwd is None else Path(cwd) / path


def config_secrets(path: Path) -> dict[str, str]:
    """Secret values a YAML/JSON config holds under secret-named keys (value -> placeholder)."""
    try:
        if not path.is_file() or path.stat().st_size > _CONFIG_MAX_BYTES:
            return {}
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return text_secrets(text, json_text=path.suffix.lower() == ".json")


def text_secrets(text: str, *, json_text: bool) -> dict[str, str]:
    """Secret values under secret-named keys of a config's text (YAML or JSON)."""
    data: object
    try:
        if json_text:
            data = json.loads(text)
        else:
            from ruamel.yaml import YAML  # noqa: PLC0415 - only configs need it; the shim does not

            data = YAML(typ="safe", pure=True).load(text)
    except Exception:  # noqa: BLE001 - an unreadable config holds nothing we can find
        return {}
    found: dict[str, str] = {}
    stack: list[tuple[str, object]] = [("", data)]
    while stack:  # iterative: a config nested 100k deep must not overflow the stack
        name, node = stack.pop()
        if isinstance(node, Mapping):
            stack.extend((str(k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((name, v) for v in node)
        elif isinstance(node, str) and is_secret_name(name) and is_secret_value(node):
            found[node] = placeholder(name)
    return found


def redact_config(text: str, *, json_text: bool, redactor: Redactor | None = None) -> str:
    """A config's text with the values of its secret keys (and any secret shape) replaced."""
    pairs = sorted(text_secrets(text, json_text=json_text).items(), key=lambda p: -len(p[0]))
    for value, mark in pairs:
        text = text.replace(value, mark)
    return (redactor or Redactor()).text(text)


_PUBLIC_OF: dict[str, str] = {}
"""Private config copy -> its redacted twin in the run folder (what the journal shows)."""


def private_copy(public: Path, text: str) -> Path:
    """Write `text` (real secrets in it) to a 0600 file outside the run folder; return its path.

    The command reads the private file; `public` is where its redacted twin lies, and every
    argv the journal, report and final-command.sh show names `public` instead.
    """
    root = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    digest = hashlib.sha256(str(public.resolve()).encode()).hexdigest()[:16]
    folder = root / f"oom-supervisor-{os.getuid()}" / digest
    target = folder / public.name
    _PUBLIC_OF[str(target)] = str(public.resolve())  # removed with the others at the run's end
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.parent.chmod(0o700)
        write_file(target, text, mode=0o600)
    except OSError as exc:
        raise write_failed(target, exc) from None
    return target


def remove_private_copies() -> None:
    """Delete the private config copies this process wrote (the run has ended) and their folders."""
    for private in list(_PUBLIC_OF):
        path = Path(private)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: another run's copies stay
        del _PUBLIC_OF[private]


def _private_to_public(text: str) -> str:
    for private, public in _PUBLIC_OF.items():
        if private in text:
            text = text.replace(private, public)
    return text


# --- final-command.sh ----------------------------------------------------------------------------

_FILL_AWK = (
    '{ out = ""; s = $0; while (match(s, /<redacted:[A-Za-z_][A-Za-z0-9_]*>/)) { '
    "n = substr(s, RSTART + 10, RLENGTH - 11); if (!(n in ENVIRON)) { "
    'print "oom-supervisor: set " n " (a secret redacted from this config)" > "/dev/stderr"; '
    "exit 3 } out = out substr(s, 1, RSTART - 1) ENVIRON[n]; s = substr(s, RSTART + RLENGTH) } "
    "print out s }")


def shell_word(word: str) -> str:
    """Quote one argv word for sh, turning placeholders into required environment variables.

    A word naming a config file whose secrets were redacted becomes a private copy filled from
    the environment when the script runs (the script stops if a variable is missing).
    """
    if word.lower().endswith(_CONFIG_SUFFIXES) and _holds_placeholder(Path(word)):
        name = shlex.quote(Path(word).name)
        return (f'"$(d=$(mktemp -d) && chmod 700 "$d" && awk {shlex.quote(_FILL_AWK)} '
                f'{shlex.quote(word)} > "$d"/{name} && echo "$d"/{name} || kill $$)"')
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


def _holds_placeholder(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size <= _CONFIG_MAX_BYTES and \
            _PLACEHOLDER.search(path.read_text(encoding="utf-8", errors="replace")) is not None
    except OSError:
        return False
