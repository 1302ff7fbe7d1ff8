"""The rescue checkpoint's pure parts: the hook's lines read back (recorded from real runs,
tests/data/rescue/), the wait a polite stop gets, the policy switch, the report's sentences."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from supervisor import rescue
from supervisor._compat import tomllib
from supervisor.classify import Outcome, VerdictKind, classify
from supervisor.console import Console, last_output_line
from supervisor.device_memory import INJECT_DIR
from supervisor.policy import PolicyError, parse
from supervisor.report import rescue_line

DATA = Path(__file__).resolve().parents[1] / "data" / "rescue"
DEFAULT = Path(__file__).resolve().parents[2] / "policies" / "default.toml"


def _lines(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="utf-8").splitlines()


def test_an_oom_rescue_is_read_with_its_step_and_seconds() -> None:
    """The hook saved checkpoint-6 in 0.784 s after step 7 ran out of memory."""
    said = rescue.read(_lines("oom-saved.txt"))
    assert said.armed
    assert said.saved == (rescue.Saved(why="oom", step=6, seconds=0.784,
                                       checkpoint="/tmp/rq/out/checkpoint-6"),)  # noqa: S108 - as recorded
    assert said.failed == ()


def test_an_error_rescue_is_read_with_its_step_and_seconds() -> None:
    """A rendezvous error at the end of step 6: the hook saved checkpoint-6 first, why = error."""
    said = rescue.read(_lines("error-saved.txt"))
    assert said.armed
    assert said.saved == (rescue.Saved(why="error", step=6, seconds=0.344,
                                       checkpoint="/tmp/nq/out/checkpoint-6"),)  # noqa: S108 - as recorded
    assert said.failed == ()
    assert "RendezvousConnectionError" in "\n".join(_lines("error-saved.txt"))


def test_a_failed_rescue_is_read_with_its_error() -> None:
    """EFBIG during the save: failed, with the writer's own words; nothing saved."""
    said = rescue.read(_lines("oom-failed.txt"))
    assert said.saved == ()
    [failed] = said.failed
    assert (failed.why, failed.step) == ("oom", 6)
    assert failed.error is not None
    assert "File too large" in failed.error


def test_a_stop_rescue_is_read() -> None:
    """Asked to stop: saved at the end of step 1, why = stop."""
    said = rescue.read(_lines("stop-saved.txt"))
    assert [(s.why, s.step) for s in said.saved] == [("stop", 1)]


@pytest.mark.parametrize("name", ["oom-saved.txt", "oom-failed.txt"])
def test_the_hooks_lines_are_never_the_oom_evidence(name: str) -> None:
    """The verdict is the OOM, and its evidence is the allocator's own line, not the hook's."""
    verdict = classify(Outcome(exit_code=1, duration_s=1.0, tail=tuple(_lines(name))))
    assert verdict.kind is VerdictKind.OOM
    assert verdict.evidence is not None
    assert verdict.evidence.startswith("torch.OutOfMemoryError")


def test_the_armed_line_is_told_from_the_others() -> None:
    """The runner waits for a save only where the hook said it is in place."""
    armed, saved = _lines("stop-saved.txt")[:2]
    assert rescue.is_armed_line(armed.encode())
    assert not rescue.is_armed_line(saved.encode())
    assert not rescue.is_armed_line(b'oom-supervisor.peak {"peak_mib": 1}')


def test_torn_and_foreign_lines_say_nothing() -> None:
    """Two ranks writing at once tear a line: it is passed over, never a crash."""
    said = rescue.read(['oom-supervisor.rescue {"event": "saved", "why": "oom", "st',
                        'oom-supervisor.rescue {"event": "saved", "step": "six"}',
                        "oom-supervisor.rescue [1, 2]", "plain output"])
    assert said == rescue.Report()


def test_save_seconds_is_the_span_of_a_checkpoints_writes(tmp_path: Path) -> None:
    """config.json at t, trainer_state.json at t + 7.5: the save took 7.5 s; the slowest of
    several folders counts; a folder with one file says nothing."""
    one, two, lone = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "checkpoint-6"
    for folder, span in ((one, 7.5), (two, 3.0)):
        folder.mkdir()
        for name, at in (("config.json", 1000.0), ("model.safetensors", 1000.0 + span / 2),
                         ("trainer_state.json", 1000.0 + span)):
            (folder / name).write_text("x")
            os.utime(folder / name, (at, at))
    lone.mkdir()
    (lone / "config.json").write_text("x")
    assert rescue.save_seconds([one, two, lone]) == pytest.approx(7.5)
    assert rescue.save_seconds([lone, tmp_path / "missing"]) is None
    assert rescue.recent_save_seconds(tmp_path, since=0.0) == pytest.approx(7.5)
    assert rescue.recent_save_seconds(None, since=0.0) is None


def test_a_polite_stop_waits_a_save_and_a_step() -> None:
    """Measured: the save plus one step, stretched for a loaded machine; unmeasured: the
    policy's wait."""
    assert rescue.stop_grace_s(None, 2.0, unmeasured_s=90.0) == 90.0
    assert rescue.stop_grace_s(20.0, 4.0) == pytest.approx(
        rescue.MARGIN * 24.0 + rescue.MARGIN_S)
    assert rescue.stop_grace_s(20.0, None) == pytest.approx(rescue.MARGIN * 20.0 + rescue.MARGIN_S)
    assert rescue.stop_grace_s(86400.0, 2.0) == rescue.MAX_GRACE_S
    assert rescue.step_seconds([[3, 100.0], [7, 108.0]]) == pytest.approx(2.0)
    assert rescue.step_seconds([[3, 100.0]]) is None
    assert rescue.step_seconds(None) is None


def test_inject_puts_the_hook_first_and_arms_it(tmp_path: Path) -> None:
    """The injected folder leads PYTHONPATH (the command's own entries kept after it)."""
    env = rescue.inject({"PYTHONPATH": "/src"}, oom=True, stop_file=tmp_path / "stop")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(INJECT_DIR), "/src"]
    assert json.loads(env[rescue.ENV_VAR]) == {"oom": True, "error": False,
                                               "stop_file": str(tmp_path / "stop")}
    armed = rescue.inject({}, oom=False, stop_file=None, error=True)
    assert json.loads(armed[rescue.ENV_VAR]) == {"oom": False, "error": True, "stop_file": None}


def _policy(**rescue_table: Any) -> dict[str, Any]:  # noqa: ANN401
    data: dict[str, Any] = tomllib.loads(DEFAULT.read_text(encoding="utf-8"))
    data["rescue"] = rescue_table
    return data


def test_the_policy_switches() -> None:
    """[rescue] on by default; each switch and the wait read from the table."""
    default = parse(tomllib.loads(DEFAULT.read_text(encoding="utf-8")))
    assert (default.rescue_on_oom, default.rescue_on_stop, default.rescue_grace_s,
            default.rescue_on_error) == (True, True, 120.0, True)
    off = parse(_policy(on_oom=False, on_stop=False, stop_grace_s=30, on_error=False))
    assert (off.rescue_on_oom, off.rescue_on_stop, off.rescue_grace_s,
            off.rescue_on_error) == (False, False, 30.0, False)


@pytest.mark.parametrize(("table", "says"), [
    ({"on_oom": "yes"}, "on_oom must be true or false"),
    ({"on_error": 1}, "on_error must be true or false"),
    ({"stop_grace_s": -1}, "stop_grace_s"),
    ({"save": True}, "unknown key 'save'"),
])
def test_a_bad_rescue_table_is_one_line(table: dict[str, Any], says: str) -> None:
    """A typo in [rescue] is named, with what is valid."""
    with pytest.raises(PolicyError, match=says) as caught:
        parse(_policy(**table))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("event", "says"), [
    ({"event": "checkpoint.rescued", "attempt": 1, "step": 6, "why": "oom", "seconds": 0.78,
      "checkpoint": "/o/checkpoint-6"},
     ("attempt 1 ran out of memory in the step after step 6, and first saved `/o/checkpoint-6` "
     "(the last completed step) in 0.8 s")),
    ({"event": "checkpoint.rescued", "attempt": 2, "step": 26, "why": "stop", "seconds": 0.37,
      "checkpoint": "/o/checkpoint-26"},
     "attempt 2 was asked to stop and saved `/o/checkpoint-26` at its next step end in 0.4 s"),
    ({"event": "checkpoint.rescued", "attempt": 3, "step": 150, "why": "error", "seconds": 0.34,
      "checkpoint": "/o/checkpoint-150"},
     ("attempt 3 failed after step 150, and first saved `/o/checkpoint-150` (the last completed "
      "step) in 0.3 s")),
    ({"event": "checkpoint.rescue_failed", "attempt": 1, "step": 6, "why": "oom",
      "error": "SafetensorError: File too large", "seconds": 0.6},
     ("attempt 1 tried to save step 6 on its way out and could not (SafetensorError: File too "
     "large); it left nothing behind")),
])
def test_the_report_says_each_rescue_in_a_sentence(event: dict[str, Any], says: str) -> None:
    """No event names, the step and the seconds."""
    line = rescue_line(event)
    assert says in line
    assert "checkpoint.rescue" not in line


@pytest.mark.parametrize(("argv", "expected"), [
    (("train.py", "--enable_jit_checkpoint"), True),
    (("train.py", "--enable_jit_checkpoint", "--output_dir", "o"), True),
    (("train.py", "--enable_jit_checkpoint", "false"), False),
    (("train.py", "--enable-jit-checkpoint=True"), True),
    (("llamafactory-cli", "train", "sft.yaml", "enable_jit_checkpoint=true"), True),
    (("train.py", "--output_dir", "enable_jit_checkpoint"), False),
    (("train.py",), False),
])
def test_jit_checkpointing_is_read_from_the_command(argv: tuple[str, ...],
                                                    expected: bool) -> None:  # noqa: FBT001
    """A flag, a bare flag, a key=value override: the trainer saves on SIGTERM by itself."""
    assert rescue.jit_enabled(argv, None) is expected


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("sft.yaml", "model_name_or_path: m\nenable_jit_checkpoint: true\n", True),
    ("sft.yaml", "enable_jit_checkpoint: false\n", False),
    ("sft.yml", "# enable_jit_checkpoint: true\nstage: sft\n", False),
    ("args.json", '{"enable_jit_checkpoint": true}', True),
    ("broken.yaml", "enable_jit_checkpoint: [\n", False),
])
def test_jit_checkpointing_is_read_from_the_config_file(tmp_path: Path, name: str, text: str,
                                                        expected: bool) -> None:  # noqa: FBT001
    """The YAML (or JSON) key, relative to the command's folder; a broken file says no."""
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert rescue.jit_enabled(("llamafactory-cli", "train", name), str(tmp_path)) is expected


def test_the_console_says_each_rescue_in_a_sentence() -> None:
    """The live console's line for a rescue, a failed one and the wait: no event names."""
    console = Console(io.StringIO(), live=False, clock=lambda: 0.0)
    saved = console.line("checkpoint.rescued", {"attempt": 3, "step": 71, "why": "oom",
                                                "seconds": 2.5, "checkpoint": "/o/checkpoint-71"})
    assert saved == ("attempt 3 ran out of memory in the step after step 71, and first saved "
                     "`/o/checkpoint-71` (the last completed step) in 2.5 s")
    failed = console.line("checkpoint.rescue_failed", {"attempt": 3, "step": 71, "why": "oom",
                                                       "error": "OSError: disk full"})
    assert failed is not None
    assert failed.startswith("attempt 3 tried to save step 71 on its way out and could not")
    asked = console.line("rescue.requested", {"grace_s": 13.5})
    assert asked == "asked the trainer to save at its next step end and stop (waiting up to 14 s)"


def test_the_live_line_never_shows_the_hooks_own_line(tmp_path: Path) -> None:
    """The last line the trainer wrote, not the hook's `armed` line after it."""
    (tmp_path / "stderr.log").write_text(
        "loading\n 5%|5         | 2/40 [00:01<00:20]\n" + _lines("stop-saved.txt")[0] + "\n",
        encoding="utf-8")
    assert last_output_line(tmp_path) == "5%|5         | 2/40 [00:01<00:20]"
