"""The `--help` probe is an attempt in all but name (issue 16): real supervisors, real scripts.

Each script is asked for its `--help` before attempt 1. One ignores `--help` and trains (prints,
binary bytes included), one forks a child holding 200 MB, one leaves a daemon holding the
probe's pipe. After each: no process of the run or of its probe is left (every process the test
started carries a tag of its own in its environment), no secret anywhere under the home or
runtime folder the supervisor was given, no traceback, no hang.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from supervisor.cli import _rebuild
from supervisor.command import Command
from supervisor.journal import load
from supervisor.program import record_help, run_help
from tests.faults.conftest import events, wait_for

pytestmark = pytest.mark.process

SECRET = "hf_" + "Q" * 34
"""A token by its shape and its name (HF_TOKEN), in the supervisor's environment."""

TRAINS = """\
import os, sys, time
# Ignores its arguments, --help included: trains (prints) for a minute.
for step in range(600):
    print(f"step {step} loss 1.0", flush=True)
    token = os.environ["HF_TOKEN"].encode()
    sys.stdout.buffer.write(b"\\xff\\xfe\\x80 not utf-8 " + token + b"\\n")
    sys.stdout.flush()
    time.sleep(0.1)
"""

FORKS = """\
import os, time
# Forks before parsing anything: the child holds 200 MB, both sleep.
if os.fork() == 0:
    block = bytearray(200 * 1024 * 1024)
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""

DAEMON = """\
import argparse, os, sys, time
# A daemon that keeps the inherited stdout/stderr open, then the real parser.
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(120)
        os._exit(0)
    os._exit(0)
p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--per_device_train_batch_size", type=int, default=8, help="batch")
p.add_argument("--hub_token", default=os.environ.get("HF_TOKEN"), help="token")
p.add_argument("--output_dir", default="out", help="where")
p.parse_args()
"""


class Env:
    """The supervisor's own home, cache and runtime folders, and a tag only this test carries."""

    def __init__(self, root: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.home = root / "home"
        self.runtime = root / "runtime"
        for folder in (self.home, self.runtime):
            folder.mkdir(mode=0o700)
        self.env = {**os.environ, "HOME": str(self.home),
                    "XDG_CACHE_HOME": str(self.home / ".cache"),
                    "XDG_DATA_HOME": str(self.home / ".local" / "share"),
                    "XDG_RUNTIME_DIR": str(self.runtime), "HF_TOKEN": SECRET,
                    "OOM_SUPERVISOR_TEST_TAG": self.tag, "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"}

    def tagged(self) -> list[psutil.Process]:
        """Live processes carrying this test's tag (the supervisor, its probe, its attempts)."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("OOM_SUPERVISOR_TEST_TAG") == self.tag \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def secret_files(self, *more: Path) -> list[str]:
        """Files under home, runtime and `more` that hold the secret in clear."""
        return [str(path) for root in (self.home, self.runtime, *more)
                for path in root.rglob("*")
                if path.is_file() and SECRET.encode() in path.read_bytes()]

    def start(self, root: Path, run_id: str, script: str, *argv: str) -> subprocess.Popen[bytes]:
        (root / f"{run_id}.py").write_text(script, encoding="utf-8")
        command = [sys.executable, "-m", "supervisor", "--log-format", "plain", "run", "--quiet",
                   "--no-estimate", "--runs-dir", str(root / "runs"), "--run-id", run_id,
                   "--", sys.executable, f"{run_id}.py", "--per_device_train_batch_size", "4",
                   *argv]
        return subprocess.Popen(command, cwd=root, env=self.env, stdout=subprocess.PIPE,  # noqa: S603
                                stderr=subprocess.PIPE)


def _end(proc: subprocess.Popen[bytes], env: Env) -> tuple[int, str]:
    """SIGTERM the supervisor (if still running); its exit code and output; nothing left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # reaped here, not garbage-collected in a later test
        out, err = proc.communicate()
        pytest.fail(f"the supervisor did not end within 60 s of its SIGTERM: {err[-2000:]!r}")
    wait_for(lambda: env.tagged() == [], timeout_s=15)
    return proc.returncode, (out + err).decode("utf-8", errors="replace")


def _started_after_s(run_dir: Path, began: float) -> float:
    """Seconds from the supervisor's start to attempt 1's start (journal's own clock)."""
    wait_for(lambda: any(e["event"] == "attempt.started" for e in events(run_dir)), 120)
    first = next(e for e in events(run_dir) if e["event"] == "attempt.started")
    return float(first["ts"]) - began


def test_a_script_that_trains_on_help_is_ended_fast_and_said(tmp_path: Path) -> None:
    """No usage, output for 3 s: ended, read by its family's defaults, said in the journal;
    attempt 1 starts a few seconds after the supervisor, not after a 20 s timeout."""
    env = Env(tmp_path)
    began = time.time()
    proc = env.start(tmp_path, "trains", TRAINS)
    run_dir = tmp_path / "runs" / "trains"
    delay_s = _started_after_s(run_dir, began)
    config = events(run_dir)[0]["config"]
    code, output = _end(proc, env)
    assert code == 130
    assert "Traceback" not in output
    assert "ignores --help" in (config["program_help"] or "")
    assert config["program_help_text"] is None
    # Measured 4.2 s (1.9 s for a program that answers its --help): 3 s of the probe.
    assert delay_s < 12, f"attempt 1 started {delay_s:.1f} s after the supervisor"
    assert env.secret_files(tmp_path / "runs") == []


def test_a_script_that_forks_on_help_leaves_nothing(tmp_path: Path) -> None:
    """A child holding 200 MB, forked before the arguments are read: ended with the probe."""
    env = Env(tmp_path)
    proc = env.start(tmp_path, "forks", FORKS)
    run_dir = tmp_path / "runs" / "forks"
    wait_for(lambda: any(e["event"] == "attempt.spawned" for e in events(run_dir)), 120)
    # The attempt itself forks the same child: the probe's must be gone by now.
    probes = [p for p in env.tagged()
              if p.environ().get("OOM_SUPERVISOR_ATTEMPT", "").startswith("probe:")]
    assert probes == []
    code, output = _end(proc, env)
    assert code == 130
    assert "Traceback" not in output
    assert "ignores --help" in (events(run_dir)[0]["config"]["program_help"] or "")


def test_a_daemon_holding_the_pipe_does_not_hold_the_probe(tmp_path: Path) -> None:
    """The help is read as soon as the program exits, the daemon is ended by its marker, and
    the cache keeps only the parsed flags, the token's default redacted, 0600 in 0700."""
    env = Env(tmp_path)
    began = time.time()
    proc = env.start(tmp_path, "daemon", DAEMON)
    run_dir = tmp_path / "runs" / "daemon"
    delay_s = _started_after_s(run_dir, began)
    proc.wait(timeout=120)  # the attempt fits: the run ends by itself
    code, output = _end(proc, env)
    assert code == 0, output
    assert "Traceback" not in output
    config = events(run_dir)[0]["config"]
    assert "its --help lists 4 options" in config["program_help"]
    assert "<redacted:HUB_TOKEN>" in config["program_help_text"]
    cache = env.home / ".cache" / "oom-supervisor" / "help.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    entries = json.loads(cache.read_text(encoding="utf-8"))["help"]
    assert list(entries.values()) == [config["program_help_text"]]
    assert delay_s < 12, f"attempt 1 started {delay_s:.1f} s after the supervisor"
    assert env.secret_files(tmp_path / "runs") == []


def test_sigterm_during_the_probe_ends_it_and_the_supervisor(tmp_path: Path) -> None:
    """A Slurm cancel while the program is asked (it trains on --help): exit 130, one line, no
    traceback, no run folder, the probe's tree gone."""
    env = Env(tmp_path)
    proc = env.start(tmp_path, "cancel", FORKS)

    def probing() -> bool:
        return any(p.environ().get("OOM_SUPERVISOR_ATTEMPT", "").startswith("probe:")
                   for p in env.tagged())

    wait_for(probing, 60)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, output = _end(proc, env)
    assert time.monotonic() - sent < 15
    assert code == 130
    assert "Traceback" not in output
    assert "interrupted before the run started" in output
    assert not (tmp_path / "runs" / "cancel" / "journal.jsonl").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_at_start_up_is_a_clean_exit(tmp_path: Path, signum: signal.Signals) -> None:
    """Before the CLI has even been imported: 130 and one line, never 143 or a traceback."""
    env = Env(tmp_path)
    proc = env.start(tmp_path, "early", FORKS)
    time.sleep(0.3)
    proc.send_signal(signum)
    code, output = _end(proc, env)
    assert code == 130, output
    assert "Traceback" not in output


def test_resume_never_asks_the_program_again(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the first run's probe parsed is journaled; resume's rebuild reads the command from
    it without running the program again (the program counts its own starts)."""
    script = tmp_path / "count.py"
    script.write_text("import argparse, pathlib\n"
                      "with open(pathlib.Path(__file__).with_name('starts.log'), 'a') as f:\n"
                      "    f.write('start\\n')\n"
                      "p = argparse.ArgumentParser()\n"
                      "p.add_argument('--per_device_train_batch_size', type=int, default=8)\n"
                      "p.add_argument('--gradient_checkpointing', action='store_true')\n"
                      "p.parse_args()\n", encoding="utf-8")
    env = Env(tmp_path)
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "supervisor", "run", "--quiet", "--no-estimate", "--runs-dir",
         str(tmp_path / "runs"), "--run-id", "r", "--", sys.executable, "count.py",
         "--per_device_train_batch_size", "4"], cwd=tmp_path, env=env.env, capture_output=True,
        timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    starts = tmp_path / "starts.log"
    assert starts.read_text(encoding="utf-8").count("start") == 2  # the probe, attempt 1
    config = load(tmp_path / "runs" / "r")[0].config
    assert config.program_help_text is not None
    monkeypatch.setenv("HF_TOKEN", SECRET)  # resume's shell has the run's secrets
    rebuilt = _rebuild(config)
    reading = rebuilt.dialect.read_sourced(rebuilt.command)
    assert reading.can_set("gradient_checkpointing")  # from the journaled help
    assert starts.read_text(encoding="utf-8").count("start") == 2  # never asked again
    # Without a journaled help (a journal from before): read by family, still never asked.
    record_help(Command(argv=rebuilt.command.argv, cwd=rebuilt.command.cwd), None)
    assert run_help(rebuilt.command) is None
    assert starts.read_text(encoding="utf-8").count("start") == 2


def test_a_program_that_closes_its_output_is_still_timed(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No output, no exit (its pipes closed, asleep): ended at the timeout, nothing left."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tag = uuid.uuid4().hex
    monkeypatch.setenv("OOM_SUPERVISOR_TEST_TAG", tag)
    (tmp_path / "closes.py").write_text("import os, time\nos.close(1)\nos.close(2)\n"
                                        "time.sleep(120)\n", encoding="utf-8")
    command = Command(argv=(sys.executable, "closes.py"), cwd=str(tmp_path))
    started = time.monotonic()
    assert run_help(command, timeout_s=3.0) is None
    assert time.monotonic() - started < 15
    env = Env(tmp_path)
    env.tag = tag
    assert env.tagged() == []


SLOW_HONEST = """\
import argparse, time
# Starting up for 30 s (busy, as an import of torch on a loaded node is), printing nothing.
end = time.monotonic() + 30
while time.monotonic() < end:
    sum(range(10000))
p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--per_device_train_batch_size", type=int, default=8, help="batch")
p.add_argument("--gradient_checkpointing", action="store_true", help="recompute")
p.add_argument("--model_name_or_path", default="tiny", help="model")
p.add_argument("--cutoff_len", type=int, default=512, help="tokens")
p.parse_args()
"""


def test_a_script_that_takes_30_s_to_answer_is_read_from_its_help(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Silent and busy for 30 s, then an honest help: waited for and read from it (not taken for
    training), the console said it was reading it, and the next run asks nothing."""
    env = Env(tmp_path)
    script = tmp_path / "slow.py"
    script.write_text(SLOW_HONEST, encoding="utf-8")
    command = [sys.executable, "-m", "supervisor", "--log-format", "plain", "plan",
               "--method", "analytic", "--device-memory", "1GiB", "--", sys.executable,
               "slow.py", "--per_device_train_batch_size", "4", "--model_name_or_path", "tiny",
               "--cutoff_len", "256"]
    began = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env.env, capture_output=True,  # noqa: S603
                          timeout=400, check=False)
    first_s = time.monotonic() - began
    output = (done.stdout + done.stderr).decode("utf-8", errors="replace")
    assert done.returncode == 0, output
    assert first_s >= 30  # it did wait for the answer
    assert "reading slow.py --help (imports take a while)" in output
    assert "ignores --help" not in output
    assert "program.help" not in output  # sentences, never event names
    monkeypatch.setenv("XDG_CACHE_HOME", env.env["XDG_CACHE_HOME"])
    again = time.monotonic()
    done = subprocess.run(command, cwd=tmp_path, env=env.env, capture_output=True,  # noqa: S603
                          timeout=400, check=False)
    assert done.returncode == 0
    assert time.monotonic() - again < first_s - 20  # the cache answered: no 30 s probe
    assert b"reading slow.py" not in done.stdout + done.stderr
    assert env.tagged() == []


SILENT = """\
import time
# Prints nothing and starts nothing for two minutes: starting up, as far as anyone can tell.
time.sleep(120)
"""
ANSWERS = """\
import argparse
p = argparse.ArgumentParser()
p.add_argument("--per_device_train_batch_size", type=int, default=8)
p.parse_args()
"""


def _probes(env: Env) -> list[psutil.Process]:
    return [p for p in env.tagged()
            if p.environ().get("OOM_SUPERVISOR_ATTEMPT", "").startswith("probe:")]


def test_a_probe_left_by_a_killed_supervisor_is_ended_by_the_next_run(tmp_path: Path) -> None:
    """SIGKILL of the supervisor while it waits on a silent --help leaves the probe running (on
    a GPU it would hold memory): the next run finds it by its marker, ends it, and journals it."""
    env = Env(tmp_path)
    first = env.start(tmp_path, "silent", SILENT)
    wait_for(lambda: _probes(env) != [], 60)
    left = {p.pid for p in _probes(env)}
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    time.sleep(1.0)
    assert {p.pid for p in _probes(env)} == left  # nobody else would end it
    # A run of another supervisor home (its own cache folder: another checkout, a container,
    # a test beside this one) leaves it alone.
    (tmp_path / "other").mkdir()
    other = Env(tmp_path / "other")
    finished = other.start(tmp_path / "other", "other", ANSWERS)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, (out + err)[-2000:]
    assert not any(e["event"] == "probe.leftovers_ended"
                   for e in events(tmp_path / "other" / "runs" / "other"))
    assert {p.pid for p in _probes(env)} == left
    second = env.start(tmp_path, "next", ANSWERS)
    run_dir = tmp_path / "runs" / "next"
    wait_for(lambda: any(e["event"] == "probe.leftovers_ended" for e in events(run_dir)), 120)
    ended = next(e for e in events(run_dir) if e["event"] == "probe.leftovers_ended")
    assert set(ended["pids"]) == left
    wait_for(lambda: _probes(env) == [], 15)
    _end(second, env)
