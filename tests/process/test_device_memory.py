"""`--device-memory`: an unmodified script, run under the injected sitecustomize, OOMs for real."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.classify import is_oom_line
from supervisor.device_memory import (
    ENV_VAR,
    INJECT_DIR,
    device_memory_argv,
    device_memory_env,
    read_inject_lines,
)

pytestmark = pytest.mark.process

# Knows nothing of oom-supervisor: plain torch, ~8.4M parameters (32 MiB), AdamW (64 MiB).
SCRIPT = textwrap.dedent("""\
    import os
    import torch

    print("chained:", os.environ.get("CHAINED_SITECUSTOMIZE"), flush=True)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1024))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(256, 1024)
    for _ in range(2):
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print("trained", flush=True)
""")


def _run(tmp_path: Path, env: dict[str, str], code: str = SCRIPT,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([*prefix, sys.executable, str(script)], capture_output=True,  # noqa: S603
                          text=True, env=env, cwd=tmp_path, check=False, timeout=300)


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose PYTHONPATH already has a sitecustomize of its own."""
    existing = tmp_path / "theirs"
    existing.mkdir()
    (existing / "sitecustomize.py").write_text(
        'import os\nos.environ["CHAINED_SITECUSTOMIZE"] = "ran"\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(existing)})
    return env


def test_unmodified_script_ooms_on_a_small_device_and_fits_on_a_larger_one(
        tmp_path: Path, base_env: dict[str, str]) -> None:
    """64 MiB: a real OOM raised by torch (exit 1); 512 MiB: trains. Theirs still runs."""
    small = _run(tmp_path, device_memory_env(base_env, 64))
    assert small.returncode == 1, small.stderr[-2000:]
    assert any(is_oom_line(line) for line in small.stderr.splitlines()), small.stderr[-2000:]
    assert "chained: ran" in small.stdout

    large = _run(tmp_path, device_memory_env(base_env, 512))
    assert large.returncode == 0, large.stderr[-2000:]
    assert large.stdout.splitlines() == ["chained: ran", "trained"]


def test_the_injected_code_announces_itself_and_reports_its_peak(
        tmp_path: Path, base_env: dict[str, str]) -> None:
    """One inject line at start, one peak line at exit, also when the program OOMs.

    The script holds ~8.4M fp32 parameters (32 MiB), gradients (32) and AdamW state (64):
    the live-bytes peak is over 128 MiB; on a 64 MiB device the peak stops under 64 MiB.
    """
    large = _run(tmp_path, device_memory_env(base_env, 512))
    lines = large.stderr.splitlines()
    assert sum(line.startswith("oom-supervisor.inject {") for line in lines) == 1, lines
    assert sum(line.startswith("oom-supervisor.peak {") for line in lines) == 1, lines
    report = read_inject_lines(lines)
    assert report.announced
    assert (report.limit_mib, report.device) == (512, "cpu")
    assert report.peak_mib is not None
    assert 128 < report.peak_mib < 512

    small = _run(tmp_path, device_memory_env(base_env, 64))
    assert small.returncode == 1
    report = read_inject_lines(small.stderr.splitlines())
    assert report.announced
    assert report.peak_mib is not None
    assert report.peak_mib <= 64


@pytest.mark.parametrize("prefix", [
    ("env", "PYTHONPATH=elsewhere"),
    ("env", "-i", "PATH=/usr/bin:/bin", "OMP_NUM_THREADS=1"),
    ("env", "-u", "PYTHONPATH", "env", "--unset=OOM_SUPERVISOR_DEVICE_MIB", "A=1"),
])
def test_a_command_that_sets_its_own_environment_is_still_limited(
        tmp_path: Path, base_env: dict[str, str], prefix: tuple[str, ...]) -> None:
    """`env PYTHONPATH=x python ...` (issue 9: a 594 MiB config "fitted" 70 MiB): still OOMs.

    Without the rewrite the same command trains unlimited and announces nothing, which
    read_inject_lines reports as not announced: the supervisor's cue that it is an error.
    """
    env = device_memory_env(base_env, 64)
    unguarded = _run(tmp_path, env, prefix=prefix)
    assert unguarded.returncode == 0, unguarded.stderr[-2000:]
    assert not read_inject_lines(unguarded.stderr.splitlines()).announced

    guarded = _run(tmp_path, env, prefix=device_memory_argv(prefix, 64))
    assert guarded.returncode == 1, guarded.stderr[-2000:]
    assert any(is_oom_line(line) for line in guarded.stderr.splitlines())
    assert read_inject_lines(guarded.stderr.splitlines()).announced


def test_device_memory_argv_rewrites_only_env_prefixes() -> None:
    """PYTHONPATH assignments get ours first; -i/-u add what they dropped; others unchanged."""
    ours = str(INJECT_DIR)
    assert device_memory_argv(("python", "t.py", "PYTHONPATH=x"), 8) == (
        "python", "t.py", "PYTHONPATH=x")
    assert device_memory_argv(("/usr/bin/env", "PYTHONPATH=x", "A=1", "python"), 8) == (
        "/usr/bin/env", f"PYTHONPATH={ours}{os.pathsep}x", "A=1", "python")
    assert device_memory_argv(("env", "-i", "python"), 8) == (
        "env", "-i", f"PYTHONPATH={ours}", f"{ENV_VAR}=8", "python")
    assert device_memory_argv(("env", "-C", "/srv", "--", "A=1", "torchrun", "x.py"), 8) == (
        "env", "-C", "/srv", "--", "A=1", "torchrun", "x.py")


def test_without_the_variable_nothing_is_limited_and_torch_is_not_imported(
        tmp_path: Path, base_env: dict[str, str]) -> None:
    """The injected directory alone changes nothing; a torch-free program never loads torch."""
    env = device_memory_env(base_env, 64)
    del env[ENV_VAR]
    assert _run(tmp_path, env).returncode == 0
    probe = _run(tmp_path, device_memory_env(base_env, 64),
                 code="import sys\nprint('torch' in sys.modules)\n")
    assert probe.stdout.strip() == "False"


def test_device_memory_env_puts_ours_first_once() -> None:
    """Ours first, theirs kept in order, never twice; a bad size is refused."""
    env = device_memory_env({"PYTHONPATH": os.pathsep.join(["/a", str(INJECT_DIR), "/b"])}, 24)
    assert env["PYTHONPATH"].split(os.pathsep) == [str(INJECT_DIR), "/a", "/b"]
    assert env[ENV_VAR] == "24"
    assert device_memory_env({}, 1)["PYTHONPATH"] == str(INJECT_DIR)
    with pytest.raises(ValueError, match="positive"):
        device_memory_env({}, 0)


def test_a_bad_size_in_the_variable_is_said_and_ignored(tmp_path: Path,
                                                        base_env: dict[str, str]) -> None:
    """OOM_SUPERVISOR_DEVICE_MIB=lots: one line on stderr, the program runs unlimited."""
    env = device_memory_env(base_env, 64)
    env[ENV_VAR] = "lots"
    result = _run(tmp_path, env)
    assert result.returncode == 0
    assert "OOM_SUPERVISOR_DEVICE_MIB='lots' is not a positive number of MiB" in result.stderr



def test_a_script_that_imports_transformers_before_torch_is_limited(
        tmp_path: Path, base_env: dict[str, str]) -> None:
    """transformers asks `importlib.util.find_spec("torch")` before the program's own import:
    that lookup must not use up the hook (it did: the limit silently did nothing)."""
    code = "import transformers  # noqa: F401\n" + SCRIPT
    small = _run(tmp_path, device_memory_env(base_env, 64), code=code)
    assert small.returncode == 1, small.stderr[-2000:]
    assert read_inject_lines(small.stderr.splitlines()).announced
    assert any(is_oom_line(line) for line in small.stderr.splitlines()), small.stderr[-2000:]
