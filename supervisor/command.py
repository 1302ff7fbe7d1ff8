"""Command: the user's training command, and launcher parsing shared by all dialects."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath


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
    world_size_from_config: bool = False
    """The world size was read from a launcher's config file (accelerate's)."""
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


def locate(argv: tuple[str, ...], env: Mapping[str, str] | None = None, *,
           cwd: str | None = None) -> Invocation:
    """Find the training program behind launchers (env, prlimit, torchrun, python -m, ...).

    `env` (default: this process's) is read only for what the launchers themselves read from
    it: inside an allocation an `srun` without task-count flags starts the allocation's tasks
    (SLURM_NTASKS / SLURM_NPROCS, else one per node, SLURM_NNODES); `accelerate launch` finds
    its default config under HF_HOME and counts the visible GPUs (CUDA_VISIBLE_DEVICES). `cwd`
    (default: this process's) resolves a relative `--config_file`.
    """
    allocation = os.environ if env is None else env
    i = 0
    launchers: list[str] = []
    world = 1
    known = True
    from_config = False
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
            i, size, size_known, read = _skip_launcher(
                argv, i, launcher_key, spec, allocation={**allocation, **dict(assignments)},
                cwd=cwd)
            launchers.append(launcher_key)
            world *= size
            known = known and size_known
            from_config = from_config or read
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
                    # (srun's allocation defaults apply to the srun program only)
                    i, size, size_known, read = _skip_launcher(
                        argv, i + 2, key, _LAUNCHERS[key],
                        allocation=None if key == "srun" else {**allocation,
                                                               **dict(assignments)},
                        cwd=cwd)
                    launchers.append(key)
                    world *= size
                    known = known and size_known
                    from_config = from_config or read
                    continue
                return Invocation(program=module, args_start=i + 2,
                                  launchers=(*launchers, "python"), world_size=world,
                                  world_size_known=known, world_size_from_config=from_config,
                                  env_assignments=tuple(assignments))
            launchers.append("python")
            continue
        return Invocation(program=token, args_start=i + 1, launchers=tuple(launchers),
                          world_size=world, world_size_known=known,
                          world_size_from_config=from_config,
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


def _skip_launcher(argv: tuple[str, ...], i: int, key: str, spec: _Launcher, *,  # noqa: PLR0913
                   allocation: Mapping[str, str] | None = None,
                   cwd: str | None = None) -> tuple[int, int, bool, bool]:
    """Skip a launcher's options; return the program's index, the world size they give,
    whether it is known, and whether a launcher config file said it."""
    values: dict[str, str] = {}
    switches: set[str] = set()
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
            switches.add(token)
            i += 1
        else:
            if i + 1 < len(argv):
                values[option] = argv[i + 1]
            i += 2
    if key == "srun" and allocation is not None:
        values = _srun_defaults(values, allocation)
    if key == "accelerate launch":
        return (i, *_accelerate_world(values, switches,
                                      os.environ if allocation is None else allocation, cwd))
    size, known = _world_size(values, spec)
    return i, size, known, False


# accelerate's DistributedType values that make `accelerate launch` start one process per
# device through torchrun (accelerate/commands/launch.py, _validate_launch_command: multi_gpu
# for MULTI_*; use_deepspeed, use_fsdp, use_megatron_lm for the others).
_ACCELERATE_DISTRIBUTED = frozenset({
    "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_XPU",
    "MULTI_HPU", "MULTI_NEURON", "DEEPSPEED", "FSDP", "MEGATRON_LM"})
_ACCELERATE_DISTRIBUTED_FLAGS = frozenset({"--multi_gpu", "--use_deepspeed", "--use_fsdp",
                                           "--use_megatron_lm"})


def _accelerate_world(values: Mapping[str, str], switches: set[str],
                      env: Mapping[str, str], cwd: str | None) -> tuple[int, bool, bool]:
    """How many processes `accelerate launch` really starts: (count, known, from its config).

    As accelerate 1.15's launch.py decides (_validate_launch_command, launch_command):
    `--cpu` always takes the simple launcher (one process, no RANK/WORLD_SIZE), and then no
    default config is read. Otherwise the config file (`--config_file`, else
    $HF_HOME/accelerate/default_config.yaml when it exists) gives the distributed type,
    `num_processes` and `num_machines` the command line does not; without a config,
    `--num_processes N` (N > 1) without `--multi_gpu` is multi-GPU only when the host has more
    than one GPU, else the simple launcher runs one process. A distributed launch starts
    num_processes in all (num_processes // num_machines per machine).
    """
    if "--cpu" in switches:
        return 1, True, False
    path = values.get("--config_file") or values.get("--config-file")
    if path is None:
        default = _accelerate_default_config(env)
        path = str(default) if default.is_file() else None
    flags = switches & _ACCELERATE_DISTRIBUTED_FLAGS
    total = values.get("--num_processes") or values.get("--num-processes")
    machines = values.get("--num_machines") or values.get("--num-machines")
    if "--tpu" in switches:
        return 1, False, False  # a TPU pod: decided on the TPU VM
    if path is not None:
        config = _accelerate_config(path, cwd)
        if config is None or "distributed_type" not in config:
            return 1, False, True  # accelerate itself refuses it at launch, and says why
        if str(config.get("compute_environment", "LOCAL_MACHINE")) != "LOCAL_MACHINE":
            return 1, False, True  # SageMaker: the job, not this host, decides
        kind = str(config.get("distributed_type", "NO"))
        distributed = bool(flags) or kind in _ACCELERATE_DISTRIBUTED
        if kind == "XLA" and not flags:
            return 1, False, True
        if total is None:
            total = str(config.get("num_processes", 1 if kind == "NO" else -1))
        if machines is None:
            machines = str(config.get("num_machines", 1))
        from_config = True
    else:
        from_config = False
        distributed = bool(flags)
        if total is None:
            return 1, False, False  # accelerate counts the devices at launch
        gpus = visible_gpus(env)
        if not distributed and total.isdigit() and int(total) > 1:
            if gpus is None:
                return int(total), False, False  # multi-GPU only if the host has 2+ GPUs
            distributed = gpus > 1
    if not distributed:
        return 1, True, from_config
    if not total.lstrip("-").isdigit() or int(total) < 1:
        return 1, False, from_config  # `num_processes: -1`: accelerate asks for --num_processes
    count, nodes = int(total), int(machines) if machines and machines.isdigit() else 1
    return (count // nodes * nodes if nodes > 1 else count), True, from_config


def _accelerate_default_config(env: Mapping[str, str]) -> Path:
    """accelerate/commands/config/config_args.py: $HF_HOME (else $XDG_CACHE_HOME/huggingface,
    else ~/.cache/huggingface) / accelerate / default_config.yaml."""
    home = env.get("HF_HOME") or str(Path(env.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(home).expanduser() / "accelerate" / "default_config.yaml"


def _accelerate_config(path: str, cwd: str | None) -> Mapping[str, object] | None:
    """The accelerate config file's top-level keys (YAML, or JSON, which YAML reads too);
    None when it cannot be read as a mapping."""
    from ruamel.yaml import YAML  # noqa: PLC0415 - only for commands that use accelerate
    from ruamel.yaml.error import YAMLError  # noqa: PLC0415

    full = Path(cwd or Path.cwd()) / Path(path).expanduser()
    try:
        with full.open(encoding="utf-8") as handle:
            data = YAML(typ="safe", pure=True).load(handle)
    except (OSError, YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def visible_gpus(env: Mapping[str, str]) -> int | None:
    """How many CUDA devices a process started with `env` sees; None when it cannot be told.

    CUDA_VISIBLE_DEVICES when set (torch stops at the first invalid id, e.g. -1); else the
    NVIDIA device nodes of this host (/dev/nvidia0, ...). A ROCm host (/dev/kfd) is not told.
    """
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for item in visible.split(","):
            if not item.strip() or item.strip().startswith("-"):
                break
            count += 1
        return count
    if Path("/dev/kfd").exists():
        return None
    try:
        return sum(1 for n in Path("/dev").iterdir() if re.fullmatch(r"nvidia\d+", n.name))
    except OSError:
        return None


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


def locate_command(command: Command) -> Invocation:
    """`locate` for a whole command: its environment and directory decide what launchers read
    (srun's allocation, accelerate's config file and visible GPUs)."""
    return locate(command.argv, environment(command), cwd=command.cwd)


def environment(command: Command) -> dict[str, str]:
    """The environment the command runs with: ours plus what it adds."""
    env = dict(os.environ)
    env.update(command.env)
    return env


def address_space_cap(argv: tuple[str, ...]) -> int | None:
    """The address-space limit in bytes a `prlimit --as=SOFT[:HARD]` launcher in `argv` sets
    for the program (its soft limit, the one that fails allocations); None when none does."""
    try:
        invocation = locate(argv, {})
    except CommandError:
        return None
    if "prlimit" not in invocation.launchers:
        return None
    for token in argv[:invocation.args_start]:
        name, eq, value = token.partition("=")
        if name == "--as" and eq:
            soft = value.split(":")[0].strip()
            if soft.isdigit():
                return int(soft)
    return None
