"""Command: the user's training command, and launcher parsing shared by all dialects."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A training command as the user wrote it: argv plus the environment it adds."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation:
    """Where the training program sits in argv, behind any launchers."""

    program: str
    """The script path or `-m` module that trains (e.g. `src/train_bash.py`)."""
    args_start: int
    """Index in argv of the program's first own argument."""
    launchers: tuple[str, ...] = ()
    world_size: int = 1
    world_size_known: bool = True
    env_assignments: tuple[tuple[str, str], ...] = field(default=())


class CommandError(ValueError):
    """The command cannot be understood; the message says what to change."""


_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
# Interpreter options that take a separate value (CPython's `-W arg`, `-X opt`, `-c cmd`).
_PYTHON_VALUE_OPTS = frozenset({"-W", "-X", "-Q"})


@dataclass(frozen=True, slots=True)
class _Launcher:
    """How to skip one launcher's own options: which take no value, and world-size flags."""

    bare: frozenset[str]
    nproc: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    total: tuple[str, ...] = ()
    positional: int = 0
    """Positional arguments the launcher takes before the program (taskset's mask)."""
    config_decides: bool = False
    """Without its world-size flags, the launcher's own config file decides (accelerate)."""


_LAUNCHERS: dict[str, _Launcher] = {
    # torch/distributed/run.py: every option takes a value except these switches.
    "torchrun": _Launcher(
        bare=frozenset({"--standalone", "--no_python", "--no-python", "-m", "--module",
                        "--run_path", "--run-path", "--no-spawn"}),
        nproc=("--nproc_per_node", "--nproc-per-node"),
        nodes=("--nnodes",),
    ),
    # accelerate/commands/launch.py switches (store_true).
    "accelerate launch": _Launcher(
        bare=frozenset({"--cpu", "--multi_gpu", "--tpu", "--use_deepspeed", "--use_fsdp",
                        "--use_megatron_lm", "--use_xpu", "-q", "--quiet", "--debug", "-m",
                        "--module", "--no_python", "--same_network", "--downcast_bf16",
                        "--dynamo_use_fullgraph", "--dynamo_use_dynamic",
                        "--enable_cpu_affinity", "--tpu_use_cluster", "--tpu_use_sudo"}),
        total=("--num_processes", "--num-processes"),
        config_decides=True,
    ),
    "deepspeed": _Launcher(
        bare=frozenset({"--no_python", "--module", "--no_local_rank", "--force_multi",
                        "--save_pid", "--enable_each_rank_log", "--bind_cores_to_rank",
                        "--no_ssh_check", "--no_ssh"}),
        nproc=("--num_gpus",),
        nodes=("--num_nodes",),
    ),
    "srun": _Launcher(
        bare=frozenset({"--exclusive", "-l", "--label", "-u", "--unbuffered", "-v",
                        "--verbose", "-Q", "--quiet", "--overlap", "-k", "--no-kill"}),
        nproc=("--ntasks-per-node",),
        nodes=("-N", "--nodes"),
        total=("-n", "--ntasks"),
    ),
    "env": _Launcher(bare=frozenset({"-i", "--ignore-environment", "-0", "--null"})),
    "prlimit": _Launcher(bare=frozenset({"--noheadings", "--raw", "--verbose"})),
    "nice": _Launcher(bare=frozenset()),
    "numactl": _Launcher(bare=frozenset({"-l", "--localalloc", "-a", "--all"})),
    "taskset": _Launcher(bare=frozenset({"-a", "--all-tasks", "-c", "--cpu-list"}),
                         positional=1),
}
# prlimit's resource options take their value only with `=` (`--as=1000`): they are switches here.
_PRLIMIT_RESOURCES = re.compile(r"^--(as|core|cpu|data|fsize|locks|memlock|msgqueue|nice|"
                                r"nofile|nproc|rss|rtprio|rttime|sigpending|stack)$")
_PYTHON_LAUNCH_MODULES = {
    "torch.distributed.run": "torchrun",
    "torch.distributed.launch": "torchrun",
    "accelerate.commands.launch": "accelerate launch",
    "deepspeed.launcher.runner": "deepspeed",
}


def locate(argv: tuple[str, ...], env: Mapping[str, str] | None = None) -> Invocation:
    """Find the training program behind launchers (env, prlimit, torchrun, python -m, ...).

    `env` (default: this process's) is read only for what srun itself reads from it: inside
    an allocation an `srun` without task-count flags starts the allocation's tasks
    (SLURM_NTASKS / SLURM_NPROCS, else one per node, SLURM_NNODES).
    """
    allocation = os.environ if env is None else env
    i = 0
    launchers: list[str] = []
    world = 1
    known = True
    assignments: list[tuple[str, str]] = []
    while i < len(argv):
        token = argv[i]
        name = PurePath(token).name
        if "=" in token and not token.startswith("-") and re.match(r"^[A-Za-z_]\w*=", token):
            key, _, value = token.partition("=")
            assignments.append((key, value))
            i += 1
            continue
        launcher_key = _launcher_key(argv, i)
        if launcher_key is not None:
            spec = _LAUNCHERS[launcher_key]
            i += len(launcher_key.split())
            i, size, size_known = _skip_launcher(argv, i, launcher_key, spec, allocation)
            launchers.append(launcher_key)
            world *= size
            known = known and size_known
            continue
        if _PYTHON.match(name):
            i += 1
            while i < len(argv) and argv[i].startswith("-") and argv[i] != "-m":
                i += 2 if argv[i] in _PYTHON_VALUE_OPTS else 1
            if i < len(argv) and argv[i] == "-m":
                if i + 1 >= len(argv):
                    msg = "`python -m` has no module name after it; put the training module there."
                    raise CommandError(msg)
                module = argv[i + 1]
                if module in _PYTHON_LAUNCH_MODULES:
                    key = _PYTHON_LAUNCH_MODULES[module]
                    i, size, size_known = _skip_launcher(argv, i + 2, key, _LAUNCHERS[key])
                    launchers.append(key)
                    world *= size
                    known = known and size_known
                    continue
                return Invocation(program=module, args_start=i + 2,
                                  launchers=(*launchers, "python"), world_size=world,
                                  world_size_known=known, env_assignments=tuple(assignments))
            launchers.append("python")
            continue
        return Invocation(program=token, args_start=i + 1, launchers=tuple(launchers),
                          world_size=world, world_size_known=known,
                          env_assignments=tuple(assignments))
    msg = ("No training program found in the command after its launchers "
           f"({' '.join(launchers) or 'none'}); put the script after `--`, "
           "e.g. `oom-supervisor run -- python train.py --per_device_train_batch_size 8`.")
    raise CommandError(msg)


def _launcher_key(argv: tuple[str, ...], i: int) -> str | None:
    name = PurePath(argv[i]).name
    if name == "accelerate" and argv[i + 1:i + 2] == ("launch",):
        return "accelerate launch"
    if name in _LAUNCHERS and name != "accelerate launch":
        return name
    return None


def _skip_launcher(argv: tuple[str, ...], i: int, key: str, spec: _Launcher,
                   allocation: Mapping[str, str] | None = None) -> tuple[int, int, bool]:
    """Skip a launcher's options; return the program's index and the world size they give."""
    values: dict[str, str] = {}
    positional = spec.positional
    while i < len(argv):
        token = argv[i]
        if token == "--":
            i += 1
            break
        if not token.startswith("-") or token == "-":
            if positional:
                positional -= 1
                i += 1
                continue
            break
        if key == "nice" and re.match(r"^-\d+$", token):
            i += 1
            continue
        option, eq, value = token.partition("=")
        if eq:
            values[option] = value
            i += 1
        elif (token in spec.bare
              or (key == "prlimit" and _PRLIMIT_RESOURCES.match(token))
              or (key == "srun" and _is_glued_short(token))):
            if key == "srun" and _is_glued_short(token):  # `-N2` is `-N 2`
                values[token[:2]] = token[2:]
            i += 1
        else:
            if i + 1 < len(argv):
                values[option] = argv[i + 1]
            i += 2
    if key == "srun" and allocation is not None:
        values = _srun_defaults(values, allocation)
    size, known = _world_size(values, spec)
    return i, size, known


def _srun_defaults(values: dict[str, str], allocation: Mapping[str, str]) -> dict[str, str]:
    """srun's own flags, completed from the allocation's variables as srun itself does.

    srun reads SLURM_NTASKS (SLURM_NPROCS) as its default `-n`, and a task count overrides
    `--ntasks-per-node` (srun warns and ignores it); measured on Slurm 22.05 (docs/slurm.md).
    """
    if "-n" in values or "--ntasks" in values:
        return values
    out = dict(values)
    tasks = allocation.get("SLURM_NTASKS") or allocation.get("SLURM_NPROCS")
    if tasks:
        out["--ntasks"] = tasks
        return out
    nodes = allocation.get("SLURM_NNODES") or allocation.get("SLURM_JOB_NUM_NODES")
    if nodes and "-N" not in values and "--nodes" not in values:
        out["--nodes"] = nodes
    return out


def _is_glued_short(token: str) -> bool:
    return not token.startswith("--") and len(token) > len("-N")


def _world_size(values: dict[str, str], spec: _Launcher) -> tuple[int, bool]:
    def first(names: tuple[str, ...]) -> str | None:
        return next((values[n] for n in names if n in values), None)

    total, nproc, nodes = first(spec.total), first(spec.nproc), first(spec.nodes)
    if total is not None:
        return (int(total), True) if total.isdigit() else (1, False)
    if spec.config_decides:
        return 1, False  # accelerate's config file (or its default one) says, at launch
    size, known = 1, True
    for value in (nproc, nodes):
        if value is None:
            continue
        # `--nnodes 1:4` is an elastic range: the lower bound is what is guaranteed.
        head = value.split(":")[0]
        if head.isdigit():
            size *= int(head)
        else:  # `--nproc_per_node gpu|auto`: decided by the machine at launch
            known = False
    return size, known


def environment(command: Command) -> dict[str, str]:
    """The environment the command runs with: ours plus what it adds."""
    env = dict(os.environ)
    env.update(command.env)
    return env
