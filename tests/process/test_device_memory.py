"""`--device-memory`: an unmodified script, run under the injected sitecustomize, OOMs for real."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.classify import is_oom_line
from supervisor.device_memory import ENV_VAR, INJECT_DIR, device_memory_env

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


def _run(tmp_path: Path, env: dict[str, str],
         code: str = SCRIPT) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(code, encoding="utf-8")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,  # noqa: S603
                          env=env, cwd=tmp_path, check=False, timeout=300)


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
