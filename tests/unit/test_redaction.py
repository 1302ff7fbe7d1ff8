"""Redaction by name, value and shape; the runner's OOM prefilter never hides a recorded OOM."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.classify import is_oom_line
from supervisor.runner import _OOM_HINTS
from supervisor.secrets import LineScrubber, Redactor, is_secret_value

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
