"""Distinct secrets planted in every channel reach no file under the run folder and no console.

Channels: the environment, argv (`--flag VALUE`, `env NAME=VALUE`), a URL's password in argv,
an HF args JSON (`"hub_token"`, a URL in a value), values the command prints whose names are
unknown (`DATABASE_URL=postgres://u:PASS@h`, `GH_PAT=ghp_...`), values it prints under a name
that says secret (`MY_DB_PASSWORD=`, `"apiKey":`, `Bearer`, `?token=`), and a multi-line PEM key.
The run walks one rung (a real OOM), so a rewritten args copy is written too; then
final-command.sh runs again with the secrets in the environment and the real values reach the
command.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.command import Command
from supervisor.dialects.llamafactory import LlamaFactoryDialect
from supervisor.knobs import Knobs
from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

S = {
    "env": "hf_" + "EnvPlanted" * 3 + "Tok1",        # HF_TOKEN in the environment
    "env_argv": "wandbPlantedInEnvArgv0002",         # env WANDB_API_KEY=... in argv
    "json": "jsonHubTokenPlanted0003",               # "hub_token" in the args JSON
    "json_url": "jsonUrlPassword0004",               # https://user:PASS@host in the JSON
    "pg": "pgPasswordPlanted0005",                   # printed: DATABASE_URL=postgres://u:PASS@h
    "ghp": "ghp_" + "G" * 30 + "000006",             # printed: GH_PAT=ghp_...
    "pem": "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7planted07",  # PEM body line
    "argv_flag": "flagTokenPlanted0008",              # --hub_token VALUE (argv dialect run)
    "argv_url": "argvUrlPassword0009",                # --mlflow_uri=https://u:PASS@h
    "argv_shape": "hf_" + "ArgvShape" * 4 + "0010",   # a bare hf_... token in argv
    "printed_name": "printedPassword0011",            # printed: MY_DB_PASSWORD=...
    "printed_json": "printedApiKey0012",              # printed: {"apiKey": "..."}
    "printed_bearer": "eyJhbGciOi.printedBearer0013",  # printed: Authorization: Bearer ...
    "printed_query": "printedQueryToken0014",         # printed: https://h/x?token=...
}

LEAKY = """\
import json, os, runpy, sys
if "--help" in sys.argv:
    print("usage: leaky.py ARGS.json"); sys.exit(0)
args = json.load(open(sys.argv[1]))
print("HF_TOKEN", os.environ.get("HF_TOKEN"), "WANDB", os.environ.get("WANDB_API_KEY"))
print("argv", sys.argv, "args", json.dumps(args), flush=True)
print("DATABASE_URL=postgres://u:%s@db.example:5432/x" % os.environ["PLANT_PG"])
print("GH_PAT=%s" % os.environ["PLANT_GHP"], file=sys.stderr)
print("-----BEGIN RSA PRIVATE KEY-----\\n%s\\nAAAA\\n-----END RSA PRIVATE KEY-----"
      % os.environ["PLANT_PEM"], file=sys.stderr, flush=True)
print("MY_DB_PASSWORD=%s" % os.environ["PLANT_NAME"])
print(json.dumps({"apiKey": os.environ["PLANT_JSON"], "eos_token": "</s>"}), file=sys.stderr)
print("Authorization: Bearer %s" % os.environ["PLANT_BEARER"])
print("GET https://hub.example/api?token=%s&page=2" % os.environ["PLANT_QUERY"], flush=True)
print("secret seen by the command:", args["hub_token"] == os.environ["WANT_JSON"])
sys.argv = ["reference_trainer", "--model_name_or_path", "tiny", "--finetuning_type", "full",
            "--per_device_train_batch_size", str(args["per_device_train_batch_size"]),
            "--gradient_accumulation_steps", str(args["gradient_accumulation_steps"]),
            "--cutoff_len", str(args["cutoff_len"]), "--max_steps", "1", "--output_dir", "out"]
runpy.run_module("supervisor.reference_trainer", run_name="__main__")
"""
ECHO = """\
import sys
print("argv", sys.argv, flush=True)
"""


def _env() -> dict[str, str]:
    # PLANT_* hold what the script prints: names no env or argv rule knows; the output is searched.
    return {**quiet_env(), "HF_TOKEN": S["env"], "PLANT_PG": S["pg"], "PLANT_GHP": S["ghp"],
            "PLANT_PEM": S["pem"], "WANT_JSON": S["json"], "PLANT_NAME": S["printed_name"],
            "PLANT_JSON": S["printed_json"], "PLANT_BEARER": S["printed_bearer"],
            "PLANT_QUERY": S["printed_query"]}


def _cli(tmp_path: Path, run_id: str, *argv: str, device: str | None = None,
         ) -> subprocess.CompletedProcess[str]:
    extra = ["--device-memory", device, "--no-estimate"] if device else []
    return subprocess.run(  # noqa: S603 - the real CLI, echoing the command's output
        [sys.executable, "-m", "supervisor", "--log-format", "json", "run", *extra,
         "--runs-dir", str(tmp_path / "runs"), "--run-id", run_id, "--", *argv],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600, check=False)


def _leaks(run_dir: Path, console: str) -> list[str]:
    found = [f"{name} in the console" for name, value in S.items() if value in console]
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{name} in {path}" for name, value in S.items() if value.encode() in data]
    return found


def test_secrets_in_every_channel_reach_no_file_and_no_console(tmp_path: Path) -> None:
    """An HF args run that walks one rung, then an argv run: zero hits; final-command.sh runs."""
    (tmp_path / "leaky.py").write_text(LEAKY, encoding="utf-8")
    (tmp_path / "echo.py").write_text(ECHO, encoding="utf-8")
    (tmp_path / "args.json").write_text(json.dumps({
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "cutoff_len": 1024,
        "hub_token": S["json"], "use_auth_token": True,
        "mlflow_uri": f"https://trainer:{S['json_url']}@mlflow.example/x"}), encoding="utf-8")
    # b2 x 1024 peaks at ~289 MiB (a real OOM under 220 MiB); b1 x GA2 fits (~175 MiB).
    first = _cli(tmp_path, "json", "env", f"WANDB_API_KEY={S['env_argv']}", sys.executable,
                 "leaky.py", "args.json", device="220MiB")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _cli(tmp_path, "argv", sys.executable, "echo.py", "--per_device_train_batch_size",
                  "2", "--hub_token", S["argv_flag"], f"--mlflow_uri=https://u:{S['argv_url']}@h",
                  "--use_auth_token", "True", "--push_to_hub_token_from", S["argv_shape"])
    assert second.returncode == 0, second.stderr[-3000:]
    runs = tmp_path / "runs"
    console = first.stdout + first.stderr + second.stdout + second.stderr
    assert _leaks(runs, console) == []
    # The planted values were really there to leak: the logs show their placeholders.
    logs = "".join(p.read_text() for p in (runs / "json" / "attempts").rglob("std*.log"))
    for mark in ("<redacted:HF_TOKEN>", "<redacted:URL_PASSWORD>", "<redacted:GITHUB_TOKEN>",
                 "<redacted:PRIVATE_KEY>", "<redacted:HUB_TOKEN>", "<redacted:WANDB_API_KEY>"):
        assert mark in logs, mark
    assert "secret seen by the command: True" in logs  # the command read the real value
    copy = json.loads((runs / "json" / "attempts" / "02" / "args.json").read_text())
    assert copy["hub_token"] == "<redacted:HUB_TOKEN>"
    assert copy["per_device_train_batch_size"] == 1
    assert copy["use_auth_token"] is True  # a boolean is never a secret
    argv_script = (runs / "argv" / "final-command.sh").read_text()
    assert "True" in argv_script
    assert "USE_AUTH_TOKEN" not in argv_script
    # final-command.sh runs with the secrets in the environment, by name.
    script = runs / "json" / "final-command.sh"
    env = {**_env(), "WANDB_API_KEY": S["env_argv"], "HUB_TOKEN": S["json"],
           "URL_PASSWORD": S["json_url"]}
    rerun = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env,  # noqa: S603, S607
                           cwd=tmp_path, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "secret seen by the command: True" in rerun.stdout
    assert "reference-trainer.result" in rerun.stdout
    # Without them it stops at once and names the variable.
    missing = subprocess.run(["sh", str(script)], capture_output=True, text=True,  # noqa: S603, S607
                             env={k: v for k, v in env.items() if k != "HUB_TOKEN"},
                             cwd=tmp_path, timeout=60, check=False)
    assert missing.returncode != 0
    assert "HUB_TOKEN" in missing.stderr


def test_llamafactory_final_yaml_holds_placeholders_for_yaml_and_override_tokens(
        tmp_path: Path) -> None:
    """`hub_token:` in the YAML and a `hub_token=` override: final.yaml names the variable."""
    (tmp_path / "sft.yaml").write_text(
        "model_name_or_path: tiny\nhub_token: yamlHubTokenPlanted11\n"
        "per_device_train_batch_size: 4\ncutoff_len: 1024\n", encoding="utf-8")
    command = Command(argv=("llamafactory-cli", "train", "sft.yaml",
                            "hf_hub_token=overrideTokenPlanted12"), cwd=str(tmp_path))
    dialect = LlamaFactoryDialect()
    start = dialect.read(command)
    (tmp_path / "run").mkdir()
    files = dialect.finalize(command, _half(start), tmp_path / "run")
    text = files[0].read_text()
    assert "yamlHubTokenPlanted11" not in text
    assert "overrideTokenPlanted12" not in text
    assert "hub_token: <redacted:HUB_TOKEN>" in text
    assert "<redacted:HF_HUB_TOKEN>" in text


def _half(knobs: Knobs) -> Knobs:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(knobs, per_device_batch=2, grad_accum=2)
