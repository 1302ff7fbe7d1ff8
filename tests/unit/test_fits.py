"""The remembered-fit store: keys, upserts, forgetting, damage, and several writers at once."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from supervisor.cli import build_parser, main
from supervisor.fits import (
    Fit,
    FitStore,
    FitStoreError,
    default_path,
    fit_key,
    render_entries,
    render_fit,
)

TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
               "num_hidden_layers": 2, "vocab_size": 32000, "_name_or_path": "/models/tiny"}
START = {"per_device_batch": 8, "grad_accum": 1, "cutoff_len": 512, "finetuning_type": "full"}


def key(**changes: object) -> str:
    parts: dict[str, object] = {
        "model_config": TINY_CONFIG, "model": "/models/tiny", "device_name": "NVIDIA H200",
        "device_total_mib": 143771.0, "dialect": "hf-args", "start_knobs": START,
        "policy": "default@3f2a"}
    parts.update(changes)
    return fit_key(**parts)  # type: ignore[arg-type]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# --- where and under what key -------------------------------------------------------------------

def test_default_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$XDG_DATA_HOME when absolute, else ~/.local/share (the XDG spec ignores relative ones)."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_path() == tmp_path / "oom-supervisor" / "fits.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    assert default_path() == Path.home() / ".local/share/oom-supervisor/fits.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_path() == Path.home() / ".local/share/oom-supervisor/fits.sqlite3"


def test_fit_key_is_pinned() -> None:
    """The key is sha256 of a canonical JSON: pinned, so a refactor cannot orphan old stores."""
    document = (
        '{"device":{"name":"NVIDIA H200","total_mib":143771},"dialect":"hf-args",'
        '"model":{"config":{"architectures":["LlamaForCausalLM"],"hidden_size":64,'
        '"num_hidden_layers":2,"vocab_size":32000}},"policy":"default@3f2a",'
        '"start":{"cutoff_len":512,"finetuning_type":"full","grad_accum":1,'
        '"per_device_batch":8},"v":1}')
    assert key() == hashlib.sha256(document.encode()).hexdigest()
    assert key() == "f81b2fe63568c67286b1e8c764b480ffa580f108db88a541c94be4a9980e121b"


def test_fit_key_ignores_order_and_naming() -> None:
    """Dict order, the model's path and config fields that only name it do not change the key."""
    shuffled = dict(reversed(list(START.items())))
    renamed = {**TINY_CONFIG, "_name_or_path": "/elsewhere/tiny", "_commit_hash": "abc"}
    assert key(start_knobs=shuffled) == key()
    assert key(model_config=renamed, model="/elsewhere/tiny") == key()
    assert key(device_total_mib=143771.4) == key()  # whole MiB


@pytest.mark.parametrize("change", [
    {"model_config": {**TINY_CONFIG, "num_hidden_layers": 4}},
    {"model_config": None},  # falls back to the name: a different key
    {"device_name": "NVIDIA A100-SXM4-80GB"},
    {"device_total_mib": 81920.0},
    {"dialect": "llamafactory"},
    {"start_knobs": {**START, "per_device_batch": 16}},
    {"policy": "quality-first@9c1e"},
])
def test_fit_key_changes_with_what_decides_memory(change: dict[str, object]) -> None:
    """Model, device, dialect, starting config and policy each change the key."""
    assert key(**change) != key()


def test_fit_key_without_config_uses_the_name() -> None:
    """With no config.json the model's name is the model's identity."""
    assert key(model_config=None, model="a") != key(model_config=None, model="b")


def test_fit_key_rejects_what_json_cannot_hold() -> None:
    """A value that has no canonical JSON form is an error, not a repr in the key."""
    with pytest.raises(ValueError, match="plain JSON data"):
        key(start_knobs={"x": object()})


# --- remembering and forgetting -----------------------------------------------------------------

def test_remember_lookup_and_upsert(tmp_path: Path) -> None:
    """A second remember under a key replaces the fit and its run, keeping when it was first."""
    clock = Clock()
    with FitStore.open(tmp_path / "fits.sqlite3", clock=clock) as store:
        assert store.lookup(key()) is None
        first = store.remember(key(), knobs={"per_device_batch": 4, "grad_accum": 2},
                               run_id="run-1", summary={"attempts": 2})
        clock.now += 60
        second = store.remember(key(), knobs={"per_device_batch": 2, "grad_accum": 4},
                                run_id="run-2", summary={"attempts": 1})
        assert store.lookup(key()) == second
        assert second == Fit(key=key(), knobs={"per_device_batch": 2, "grad_accum": 4},
                             run_id="run-2", summary={"attempts": 1},
                             created_at=first.created_at, updated_at=first.updated_at + 60)
        assert len(store.entries()) == 1


def test_entries_newest_first_and_forget(tmp_path: Path) -> None:
    """entries() lists the latest first; forget takes a hex prefix; forget_all empties it."""
    clock = Clock()
    keys = [key(policy=f"p{i}") for i in range(3)]
    with FitStore.open(tmp_path / "fits.sqlite3", clock=clock) as store:
        for k in keys:
            clock.now += 1
            store.remember(k, knobs={}, run_id=k[:4], summary={})
        assert [f.key for f in store.entries()] == keys[::-1]
        assert store.forget(keys[0][:8].upper()) == 1
        assert store.lookup(keys[0]) is None
        assert store.forget("ffff" if not keys[1].startswith("ffff") else "0000") in (0, 1)
        with pytest.raises(ValueError, match="hex digits"):
            store.forget("")
        with pytest.raises(ValueError, match="hex digits"):
            store.forget("not-hex")
        left = len(store.entries())
        assert store.forget_all() == left
        assert store.entries() == []


def test_store_survives_reopening(tmp_path: Path) -> None:
    """What one process remembered, the next one finds."""
    path = tmp_path / "fits.sqlite3"
    with FitStore.open(path) as store:
        store.remember(key(), knobs={"per_device_batch": 1}, run_id="r", summary={})
    with FitStore.open(path) as store:
        fit = store.lookup(key())
        assert fit is not None
        assert fit.knobs == {"per_device_batch": 1}
        assert store.integrity_ok()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- damage -------------------------------------------------------------------------------------

def _one_line(exc: pytest.ExceptionInfo[FitStoreError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """Garbage at the store's path is a one-line FitStoreError naming the file."""
    path = tmp_path / "fits.sqlite3"
    path.write_bytes(b"this is not sqlite\n" * 200)
    with pytest.raises(FitStoreError) as exc:
        FitStore.open(path)
    assert str(path) in _one_line(exc)
    assert "not a database" in str(exc.value)


def test_a_truncated_database(tmp_path: Path) -> None:
    """A store cut short mid-file is reported, not a traceback."""
    path = tmp_path / "fits.sqlite3"
    with FitStore.open(path) as store:
        for i in range(200):
            store.remember(key(policy=str(i)), knobs={"x": "y" * 200}, run_id="r", summary={})
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\0" * 50 + data[150:len(data) // 2])
    for name in ("fits.sqlite3-wal", "fits.sqlite3-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(FitStoreError) as exc, FitStore.open(path) as store:
        store.entries()
    _one_line(exc)


def test_a_folder_that_cannot_be_made(tmp_path: Path) -> None:
    """A store under a regular file cannot have its folder made: FitStoreError, one line."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FitStoreError, match="cannot create the folder") as exc:
        FitStore.open(blocker / "sub" / "fits.sqlite3")
    _one_line(exc)


def test_a_folder_at_the_path(tmp_path: Path) -> None:
    """A directory where the file should be is named as such."""
    with pytest.raises(FitStoreError, match="is a folder"):
        FitStore.open(tmp_path)


def test_someone_elses_fits_table(tmp_path: Path) -> None:
    """A SQLite file with an unrelated `fits` table is refused, not written into."""
    path = tmp_path / "other.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE fits (name TEXT)")
    with pytest.raises(FitStoreError, match="not oom-supervisor's"):
        FitStore.open(path)


def test_a_newer_schema(tmp_path: Path) -> None:
    """A store from a newer version is left alone."""
    path = tmp_path / "fits.sqlite3"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(FitStoreError, match="newer oom-supervisor"):
        FitStore.open(path)


def test_a_damaged_row(tmp_path: Path) -> None:
    """A row whose JSON was damaged by hand names the key to forget."""
    path = tmp_path / "fits.sqlite3"
    with FitStore.open(path) as store:
        store.remember(key(), knobs={}, run_id="r", summary={})
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE fits SET knobs = '{broken'")
    with FitStore.open(path) as store, pytest.raises(FitStoreError, match="fits forget") as exc:
        store.lookup(key())
    _one_line(exc)


# --- several writers ----------------------------------------------------------------------------

WRITERS, WRITES = 4, 50


def _write_many(path: str, writer: int) -> None:
    with FitStore.open(path) as store:
        for i in range(WRITES):
            store.remember(key(policy=f"{writer}-{i}"), knobs={"writer": writer, "i": i},
                           run_id=f"w{writer}", summary={"i": i})
            store.lookup(key(policy=f"{(writer + 1) % WRITERS}-{i}"))


@pytest.mark.process
def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    """4 processes x 50 upserts at once: every row is there and SQLite finds no damage."""
    path = str(tmp_path / "shared" / "fits.sqlite3")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(path, w)) for w in range(WRITERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * WRITERS
    with FitStore.open(path) as store:
        fits = {f.key: f for f in store.entries()}
        assert len(fits) == WRITERS * WRITES
        for w in range(WRITERS):
            for i in range(WRITES):
                assert fits[key(policy=f"{w}-{i}")].knobs == {"writer": w, "i": i}
        assert store.integrity_ok()


# --- the table ----------------------------------------------------------------------------------

def test_render_entries_wraps_the_knobs_never_cuts_them() -> None:
    """Long run ids are cut, knobs never: they wrap under their fit, no line past 100."""
    knobs = {f"knob_{i}": "x" * 10 for i in range(12)}
    fits = [Fit(key="a" * 64, knobs=knobs, run_id="r" * 40, summary={}, created_at=0.0,
                updated_at=0.0),
            Fit(key="b" * 64, knobs={"per_device_batch": 2, "lora": True}, run_id="short",
                summary={"model": "tiny", "program": "train.py"}, created_at=0.0,
                updated_at=3600.0 * 5)]
    table = render_entries(fits, now=3600.0 * 6)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert all(f"knob_{i}=xxxxxxxxxx" in table for i in range(12))
    assert "~" not in table.replace("r" * 21 + "~", "")
    row = lines.index(next(line for line in lines if line.startswith("bbbbbbbbbbbb")))
    assert lines[row] == "bbbbbbbbbbbb    1h  short                   tiny, train.py"
    assert lines[row + 1] == "    per_device_batch=2 lora=true"
    assert render_entries([], now=0.0) == "no remembered fits"


def _fit(key: str, cwd: str | None, **about: str) -> Fit:
    summary = {"cwd": cwd, **about} if cwd else dict(about)
    return Fit(key=key * 64, knobs={"per_device_batch": 1}, run_id=f"run-{key}",
               summary=summary, created_at=0.0, updated_at=0.0)


def test_fits_are_grouped_by_project_this_one_first() -> None:
    """This project's fits first, then those of no recorded project; other projects' only with
    every=True (`--all`), each under its folder, else counted in one line."""
    fits = [_fit("a", "/other"), _fit("b", "/work/proj", model="tiny", program="train.py"),
            _fit("c", None), _fit("d", "/third")]
    mine = render_entries(fits, now=0.0, project="/work/proj", every=False)
    assert mine.splitlines()[0] == "this project (/work/proj):"
    assert "bbbbbbbbbbbb" in mine
    assert "cccccccccccc" in mine
    assert "aaaaaaaaaaaa" not in mine
    assert "2 more fits of 2 other projects: `oom-supervisor fits list --all`" in mine
    every = render_entries(fits, now=0.0, project="/work/proj", every=True)
    assert every.index("bbbbbbbbbbbb") < every.index("project /other:") < every.index(
        "aaaaaaaaaaaa")
    assert "project /third:" in every


def test_show_prints_one_fit_whole_with_its_run() -> None:
    """Every knob, the model, the program, the project and the run folder it came from."""
    fit = Fit(key="e" * 64, knobs={"per_device_batch": 1, "output_dir": "out",
                                   "gradient_checkpointing": True},
              run_id="night-1", summary={"model": "tiny", "program": "train.py",
                                         "cwd": "/work/proj", "run_dir": "/work/runs/night-1",
                                         "attempts": 3},
              created_at=0.0, updated_at=0.0)
    shown = render_fit(fit, now=60.0)
    assert f"key      {'e' * 64}" in shown
    assert "from run night-1 (/work/runs/night-1)" in shown
    assert "  per_device_batch = 1" in shown
    assert "  output_dir = out" in shown
    assert "  gradient_checkpointing = true" in shown
    assert "project  /work/proj" in shown
    old = render_fit(dataclasses.replace(fit, summary={}), now=60.0)
    assert "model    not recorded" in old


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_lists_and_forgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fits list` shows the table; `fits forget PREFIX` and `--all` say how many went."""
    db = tmp_path / "fits.sqlite3"
    assert main(["fits", "--fits-db", str(db)]) == 0
    assert capsys.readouterr().out.strip() == "no remembered fits"
    with FitStore.open(db) as store:
        store.remember(key(), knobs={"per_device_batch": 2}, run_id="run-a", summary={})
        store.remember(key(policy="x"), knobs={"per_device_batch": 1}, run_id="run-b",
                       summary={})
    assert main(["fits", "--fits-db", str(db), "list"]) == 0
    out = capsys.readouterr().out
    assert key()[:12] in out
    assert "per_device_batch=2" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    assert main(["fits", "--fits-db", str(db), "forget", key()[:6]]) == 0
    assert capsys.readouterr().out.startswith("forgot 1 fit in ")
    assert main(["fits", "--fits-db", str(db), "forget", "--all"]) == 0
    assert capsys.readouterr().out.startswith("forgot 1 fit in ")


@pytest.mark.parametrize("argv", [
    ["forget"], ["forget", "abc", "--all"], ["forget", "xyz"],
])
def test_cli_bad_forget_is_one_line_exit_2(argv: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """forget needs exactly one of KEY_PREFIX and --all, and a hex prefix."""
    code = _exit_code(["fits", "--fits-db", str(tmp_path / "f.sqlite3"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_cli_bad_store_is_one_line_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged store: exit 2 and one line naming the file."""
    db = tmp_path / "fits.sqlite3"
    db.write_bytes(b"garbage" * 500)
    assert main(["fits", "--fits-db", str(db)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(db) in err


def test_run_takes_fits_options_and_the_demo_does_not() -> None:
    """`--fits-db PATH` and `--fresh` land on args as fits_db and fresh; the demo never uses
    the store, so it offers neither (and its args say so)."""
    args = build_parser().parse_args(["run", "--fits-db", "/x/f.db", "--fresh", "--", "true"])
    assert (args.fits_db, args.fresh) == (Path("/x/f.db"), True)
    args = build_parser().parse_args(["demo"])
    assert (args.fits_db, args.fresh) == (None, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--fresh"])


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors exit through parser.exit
        return int(exc.code or 0)


def test_render_entries_puts_method_and_batch_first() -> None:
    """What decides memory first (method, batch, accumulation, cutoff), not alphabetical."""
    knobs = {"cutoff_len": 512, "deepspeed_stage": None, "expandable_segments": False,
             "finetuning_type": "lora", "grad_accum": 4, "output_dir": "out",
             "per_device_batch": 2, "world_size": 1}
    fit = Fit(key="c" * 64, knobs=knobs, run_id="r1", summary={}, created_at=0.0,
              updated_at=0.0)
    line = render_entries([fit], now=60.0, width=200).splitlines()[2]
    assert line.endswith("finetuning_type=lora per_device_batch=2 grad_accum=4 cutoff_len=512 "
                         "world_size=1 expandable_segments=false")  # output_dir, None left out
    wrapped = render_entries([fit], now=60.0, width=60).splitlines()[2:]  # wrapped, not cut
    assert " ".join(w.strip() for w in wrapped) == line.strip()
    assert max(len(w) for w in wrapped) <= 60


def test_cli_show_and_list_by_project(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`fits list` shows this project's fits (`--all`: every project's); `fits show KEY`
    prints one fit; a key that matches none is one line, exit 2. (A store on a read-only
    mount: tests/faults/test_hostile_files.py.)"""
    db = tmp_path / "fits.sqlite3"
    with FitStore.open(db) as store:
        store.remember(key(), knobs={"per_device_batch": 2}, run_id="run-a",
                       summary={"cwd": str(tmp_path), "model": "tiny", "program": "train.py",
                                "run_dir": str(tmp_path / "runs" / "run-a")})
        store.remember(key(policy="x"), knobs={"per_device_batch": 1}, run_id="run-b",
                       summary={"cwd": "/elsewhere"})
    monkeypatch.chdir(tmp_path)
    assert main(["fits", "--fits-db", str(db), "list"]) == 0
    out = capsys.readouterr().out
    assert key()[:12] in out
    assert key(policy="x")[:12] not in out
    assert "tiny, train.py" in out
    assert main(["fits", "--fits-db", str(db), "list", "--all"]) == 0
    assert key(policy="x")[:12] in capsys.readouterr().out
    assert main(["fits", "--fits-db", str(db), "show", key()[:8]]) == 0
    shown = capsys.readouterr().out
    assert "from run run-a" in shown
    assert "  per_device_batch = 2" in shown
    assert main(["fits", "--fits-db", str(db), "show", "0123"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "no remembered fit has a key starting with 0123" in err[0]
