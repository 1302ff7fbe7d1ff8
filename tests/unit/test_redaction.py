"""Redaction by name, value and shape; the runner's OOM prefilter never hides a recorded OOM."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.classify import is_oom_line
from supervisor.runner import _OOM_HINTS
from supervisor.secrets import LineScrubber, Redactor, is_secret_value, redact_printed

TAILS = Path(__file__).resolve().parent.parent / "data" / "tails"


def test_every_recorded_oom_line_passes_the_runner_prefilter() -> None:
    """A chunk is only skipped when it has none of the hint words: no recorded OOM line is."""
    oom_lines = [line for path in sorted(TAILS.glob("*.txt"))
                 for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if is_oom_line(line)]
    assert len(oom_lines) > 10
    for line in oom_lines:
        assert any(hint in line.encode().lower() for hint in _OOM_HINTS), line


@pytest.mark.parametrize(("text", "mark"), [
    ("GH_PAT=ghp_" + "a" * 36, "<redacted:GITHUB_TOKEN>"),
    ("token hf_" + "B" * 34 + " used", "<redacted:HF_TOKEN>"),
    ("OPENAI=sk-proj-" + "c" * 40, "<redacted:OPENAI_API_KEY>"),
    ("key AKIAABCDEFGHIJKLMNOP", "<redacted:AWS_ACCESS_KEY_ID>"),
    ("DATABASE_URL=postgres://me:s3cretPass@db:5432/x", "<redacted:URL_PASSWORD>"),
])
def test_secrets_are_recognised_by_their_shape(text: str, mark: str) -> None:
    """Whatever the variable is called, the value's shape gives it away."""
    assert mark in Redactor().text(text)


def test_identifiers_that_look_alike_are_left_alone() -> None:
    """hf_ and sk- prefixes of ordinary words and short ids are not tokens."""
    text = "hf_AutoModelForCausalLM task-sk-12 https://huggingface.co/x hf_hub_download"
    assert Redactor().text(text) == text


def test_booleans_are_never_secrets() -> None:
    """`--use_auth_token True` makes nothing secret; the token value after --hub_token is."""
    redactor = Redactor.for_run(["--use_auth_token", "True", "--hub_token", "abcd1234"],
                                {"USE_AUTH": "true", "HF_TOKEN": "1"})
    assert dict(redactor.values) == {"abcd1234": "<redacted:HUB_TOKEN>"}
    assert not is_secret_value("True")


def test_a_pem_block_over_many_lines_is_hidden_whole() -> None:
    """BEGIN ... END over several lines: one placeholder, no body line left."""
    scrubber = LineScrubber(Redactor())
    out = scrubber.lines(b"before\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaA\nAAAA\n"
                         b"-----END OPENSSH PRIVATE KEY-----\nafter\n")
    assert out == b"before\n<redacted:PRIVATE_KEY>\nafter\n"


@pytest.mark.parametrize(("text", "redacted"), [
    ("MY_PASSWORD=hunter2xyz", "MY_PASSWORD=<redacted:MY_PASSWORD>"),
    ('{"password": "jsonpw998877"}', '{"password": "<redacted:PASSWORD>"}'),
    ("api_key: abcd1234efghQQ", "api_key: <redacted:API_KEY>"),
    ("export OPENAI_API_KEY=abcdefgh123", "export OPENAI_API_KEY=<redacted:OPENAI_API_KEY>"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG",
     "AWS_SECRET_ACCESS_KEY=<redacted:AWS_SECRET_ACCESS_KEY>"),
    ('{"apiKey": "qwertyuiop1", "accessToken": "asdfghjkl12"}',
     '{"apiKey": "<redacted:APIKEY>", "accessToken": "<redacted:ACCESSTOKEN>"}'),
    ("GET https://h/x?token=querysecret123&a=1", "GET https://h/x?token=<redacted:TOKEN>&a=1"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIi",
     "Authorization: Bearer <redacted:AUTHORIZATION>"),
    ("passphrase=abcdefgh12", "passphrase=<redacted:PASSPHRASE>"),
])
def test_secrets_the_command_prints_under_its_own_name(text: str, redacted: str) -> None:
    """What the program prints is searched by the name it gives a value, and by shape."""
    assert redact_printed(text) == redacted
    assert Redactor().data(text.encode()) == redacted.encode()


@pytest.mark.parametrize("text", [
    "Tokenizing: 100%|██████████| 50/50 [00:01<00:00, 45.2it/s]",
    "Running tokenizer on dataset (num_proc=16): 100%|██████████| 64/64",
    '{"eos_token": "<|endoftext|>", "pad_token": "<|padding|>", "bos_token": null}',
    "pad_token_id: 0, max_token_len=abcdefghi, token_type_ids: [0,0,0]",
    "total_tokens: 123456789 train_tokens_per_second=1234.5678",
    "tokenizer: LlamaTokenizerFast, chat_template: abcdefghijkl",
    "author: JohnSmithXYZ monkey=bananabanana keys: abcdefghijk",
    "use_auth_token: True, hub_token=None, push_to_hub_token: <HUB_TOKEN>",
    "see https://huggingface.co/docs/transformers/main_classes/trainer for more",
])
def test_settings_and_progress_that_merely_mention_a_token_are_left_alone(text: str) -> None:
    """Tokenizer settings, counts, progress bars and booleans keep their values."""
    assert redact_printed(text) == text


def test_recorded_output_of_real_runs_is_left_alone() -> None:
    """No line of what real trainers printed (tests/data/tails) is taken for a secret."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(TAILS.rglob("*.txt"))]
    assert len(texts) > 10
    for text in texts:
        assert redact_printed(text) == text
