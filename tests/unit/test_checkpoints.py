"""What a checkpoint must be to be resumed, on real checkpoint files: one written by the
reference trainer (the real HF Trainer) once per module, then damaged copies of it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from supervisor import checkpoints
from supervisor.checkpoints import OutputFolderBusyError, OutputLock, credit, verify
from supervisor.events import Checkpoint
from supervisor.knobs import Knobs
from supervisor.trainer_output import step_of

pytestmark = pytest.mark.process  # the fixture runs the real trainer once (about 6 s)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`checkpoint-2` of a 4-step full fine-tune of the tiny model (saves every 2 steps)."""
    out = tmp_path_factory.mktemp("real") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "supervisor.reference_trainer",  # noqa: S603
                    "--per_device_train_batch_size", "1", "--cutoff_len", "32",
                    "--max_steps", "4", "--save_steps", "2", "--output_dir", str(out)],
                   check=True, env=env, capture_output=True, timeout=600)
    return out / "checkpoint-2"


def copy(real: Path, tmp_path: Path, name: str = "checkpoint-2") -> Path:
    """A copy of the real checkpoint to damage (times kept, as a copy would)."""
    return Path(shutil.copytree(real, tmp_path / "out" / name))


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def test_the_real_checkpoint_is_whole(real: Path) -> None:
    """The HF Trainer's own layout passes every check, within the run's 4 steps."""
    assert sorted(p.name for p in real.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "optimizer.pt",
        "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin"]
    assert verify(real, max_steps=4) is None


def _half(folder: Path, name: str) -> None:
    truncate(folder / name, (folder / name).stat().st_size // 2)


def _torn_state(folder: Path) -> None:
    (folder / "trainer_state.json").write_text('{"global_st', encoding="utf-8")


def _other_step(folder: Path) -> None:
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    state["global_step"] = 3
    (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")


def _appended(folder: Path) -> None:
    with (folder / "model.safetensors").open("ab") as handle:
        handle.write(b"\0" * 16)


def _huge_header(folder: Path) -> None:
    with (folder / "model.safetensors").open("r+b") as handle:
        handle.write((10**12).to_bytes(8, "little"))


def _index_without_shard(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


DAMAGE = [
    ("torn model.safetensors", lambda f: _half(f, "model.safetensors"),
     "model.safetensors is cut short"),
    ("model.safetensors longer than its header", _appended,
     "model.safetensors is longer than its header says"),
    ("a header length past the file", _huge_header, "model.safetensors is cut short"),
    ("torn trainer_state.json", _torn_state, "trainer_state.json does not parse"),
    ("no trainer_state.json", lambda f: (f / "trainer_state.json").unlink(),
     "it has no trainer_state.json"),
    ("a state naming another step", _other_step,
     "its trainer_state.json says step 3, its name step 2"),
    ("transformers 5's incomplete-save sentinel",
     lambda f: (f / "checkpoint-is-incomplete.txt").write_text("", encoding="utf-8"),
     "it holds checkpoint-is-incomplete.txt"),
    ("torn optimizer.pt", lambda f: _half(f, "optimizer.pt"),
     "optimizer.pt is cut short or damaged"),
    ("torn rng_state.pth", lambda f: _half(f, "rng_state.pth"),
     "rng_state.pth is cut short or damaged"),
    ("no weights at all", lambda f: (f / "model.safetensors").unlink(),
     "it holds no weight files"),
    ("a scheduler without its optimizer", lambda f: (f / "optimizer.pt").unlink(),
     "optimizer.pt is missing"),
    ("an index naming a shard that is not there", _index_without_shard,
     "names a shard that is not there (model-00001-of-00002.safetensors)"),
]


@pytest.mark.parametrize(("what", "damage", "said"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_copy_is_not_whole_and_says_why(real: Path, tmp_path: Path, what: str,
                                                  damage: object, said: str) -> None:
    """Each damage is found by the cheap checks (no tensor loaded), named in the reason."""
    folder = copy(real, tmp_path)
    assert verify(folder) is None, what
    damage(folder)  # type: ignore[operator]
    reason = verify(folder)
    assert reason is not None
    assert said in reason


def test_a_step_past_the_run_or_its_own_plan_is_not_resumed(real: Path, tmp_path: Path) -> None:
    """A checkpoint beyond the run's max_steps (a planted folder) is passed over."""
    assert verify(real, max_steps=1) == "step 2 is past the run's 1 steps"
    folder = copy(real, tmp_path, "checkpoint-9")
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    state["global_step"] = 9
    (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    assert verify(folder) == "step 9 is past the 4 steps its own trainer_state.json plans"


@pytest.mark.parametrize("name", ["checkpoint-0002", "checkpoint-2.bak", "checkpoint-", "ckpt-2",
                                  "checkpoint-٢"])
def test_only_checkpoint_and_a_positive_number_is_a_name(real: Path, tmp_path: Path,
                                                         name: str) -> None:
    folder = copy(real, tmp_path, name)
    assert "its name is not checkpoint-<number>" in str(verify(folder))


def test_a_damaged_member_inside_a_whole_zip_passes_the_cheap_checks(real: Path,
                                                                     tmp_path: Path) -> None:
    """What only loading finds (tests/data/tails/ckpt_unusable_bad_member.txt): the supervisor
    resumes it, the trainer fails to load it, and that verdict passes it over."""
    folder = copy(real, tmp_path)
    with zipfile.ZipFile(folder / "optimizer.pt") as archive:
        biggest = max(archive.infolist(), key=lambda i: i.file_size)
    with (folder / "optimizer.pt").open("r+b") as handle:
        handle.seek(biggest.header_offset)
        handle.write(b"\0\0\0\0")
    assert verify(folder) is None


# --- own: written by an attempt of this run -----------------------------------------------------

KNOBS = Knobs(per_device_batch=1, max_steps=4)


def test_an_attempts_checkpoint_is_credited_with_its_fingerprint(real: Path,
                                                                 tmp_path: Path) -> None:
    started = time.time()
    folder = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(real, folder, copy_function=shutil.copy)  # written now, as a save would
    after = checkpoints.listing(str(tmp_path / "out"), None)
    got = credit({}, after, since_s=started, max_steps=4)
    assert got.wrote == [(str(folder), 2)]
    assert got.foreign == []
    assert sorted(got.fingerprints[str(folder)]) == sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    size, _ = got.fingerprints[str(folder)]["model.safetensors"]
    assert size == (folder / "model.safetensors").stat().st_size


def test_a_folder_copied_in_or_planted_during_an_attempt_is_not_credited(
        real: Path, tmp_path: Path) -> None:
    """Its files older than the attempt (copied with their times), or a step past the run."""
    started = time.time()
    copied = copy(real, tmp_path)  # copytree keeps the times: older than the attempt
    # `real` may have been saved a moment ago (the fixture runs at the module's first use):
    # the copy's files are dated as an old checkpoint's would be, well past the 2 s slack.
    for path in (copied, *copied.rglob("*")):
        os.utime(path, (started - 3600, started - 3600))
    planted = tmp_path / "out" / "checkpoint-99999999"
    planted.mkdir()
    (planted / "trainer_state.json").write_text('{"global_step": 99999999}', encoding="utf-8")
    after = checkpoints.listing(str(tmp_path / "out"), None)
    got = credit({}, after, since_s=started, max_steps=4)
    assert got.wrote == []
    assert dict(got.foreign) == {
        str(copied): "its files are older than the attempt (copied in, not written by it)",
        str(planted): "step 99999999 is past the run's 4 steps"}


def _written_now(real: Path, tmp_path: Path, step: int, plan: int = 4) -> Path:
    """A copy of the real checkpoint as checkpoint-<step>, written now (new times)."""
    folder = tmp_path / "out" / f"checkpoint-{step}"
    shutil.copytree(real, folder, copy_function=shutil.copy)
    state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    state.update(global_step=step, max_steps=plan)
    (folder / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    return folder


def test_another_runs_checkpoint_in_a_shared_folder_is_not_credited(real: Path,
                                                                    tmp_path: Path) -> None:
    """With --share-output-dir another run writes beside this one: a step the attempt's own
    trainer never reached, before its resume point, or of another plan is not this attempt's."""
    started = time.time()
    ahead = _written_now(real, tmp_path, 60, plan=400)
    behind = _written_now(real, tmp_path, 10, plan=400)
    other_plan = _written_now(real, tmp_path, 30, plan=300)
    mine = _written_now(real, tmp_path, 20, plan=400)
    after = checkpoints.listing(str(tmp_path / "out"), None)
    got = credit({}, after, since_s=started, max_steps=400,
                 seen=checkpoints.Seen(resumed=12, reached=31, total=400))
    assert got.wrote == [(str(mine), 20)]
    assert dict(got.foreign) == {
        str(ahead): "step 60 is past the step the attempt's trainer reached (31)",
        str(behind): "step 10 is before the step the attempt resumed from (12)",
        str(other_plan): "it plans 300 steps, the attempt's trainer 400"}
    # a bar drawn at most every 0.1 s may trail fast steps: a few steps past it are the trainer's
    lagging = credit({}, after, since_s=started, max_steps=400,
                     seen=checkpoints.Seen(resumed=0, reached=52, total=None))
    assert (str(ahead), 60) in lagging.wrote


def _own(path: Path, attempt: int = 1) -> Checkpoint:
    return Checkpoint(path=str(path), step=step_of(str(path)), knobs=KNOBS,
                      attempt=attempt, fingerprint=checkpoints.fingerprint(path))


def test_the_newest_whole_unchanged_checkpoint_is_chosen(real: Path, tmp_path: Path) -> None:
    """checkpoint-4 changed after its attempt wrote it: passed over with the reason; the run
    goes on from checkpoint-2."""
    two = copy(real, tmp_path)
    four = copy(real, tmp_path, "checkpoint-4")
    state = json.loads((four / "trainer_state.json").read_text(encoding="utf-8"))
    state["global_step"] = 4
    (four / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    records = [_own(two), _own(four)]
    assert checkpoints.choose(records, KNOBS, max_steps=4).checkpoint == records[1]
    with (four / "optimizer.pt").open("ab") as handle:
        handle.write(b"x")
    choice = checkpoints.choose(records, KNOBS, max_steps=4)
    assert choice.checkpoint == records[0]
    assert [(c.path, why.split(" (")[0]) for c, why in choice.unusable] == [
        (str(four), "it changed after attempt 1 wrote it")]


def test_a_torn_newest_checkpoint_of_this_run_is_passed_over(real: Path, tmp_path: Path) -> None:
    """Torn before its fingerprint was taken (the save never reached the disk): own, not whole."""
    two = copy(real, tmp_path)
    four = copy(real, tmp_path, "checkpoint-4")
    _other_step(four)  # step 3 in a folder named 4
    records = [_own(two), _own(four)]
    choice = checkpoints.choose(records, KNOBS, max_steps=4)
    assert choice.checkpoint == records[0]
    assert choice.unusable[0][1] == "its trainer_state.json says step 3, its name step 4"


def test_strays_name_every_folder_this_run_did_not_write(real: Path, tmp_path: Path) -> None:
    two = copy(real, tmp_path)
    copy(real, tmp_path, "checkpoint-0007")
    (tmp_path / "out" / "checkpoint-3").mkdir()
    (tmp_path / "out" / "not-a-checkpoint").mkdir()
    found = dict(checkpoints.strays(tmp_path / "out", [str(two)]))
    assert found == {
        str(tmp_path / "out" / "checkpoint-0007"):
            "its name is not checkpoint-<number> (a positive number, no leading zeros)",
        str(tmp_path / "out" / "checkpoint-3"): "it has no trainer_state.json"}


# --- one output folder, one run -----------------------------------------------------------------

def test_a_second_run_on_the_output_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(run_dir=tmp_path / "runs" / "first") as first:
        first.take(out)
        assert first.held(out)
        with pytest.raises(OutputFolderBusyError) as refused:
            OutputLock(run_dir=tmp_path / "runs" / "second").take(out)
        message = str(refused.value)
        assert "\n" not in message
        assert f"pid {os.getpid()}, run folder {tmp_path / 'runs' / 'first'}" in message
        assert "--share-output-dir" in message
        OutputLock(run_dir=tmp_path / "runs" / "shared", share=True).take(out)  # the user said
    OutputLock(run_dir=tmp_path / "runs" / "third").take(out)  # the first let go


def test_the_lock_file_is_never_followed_as_a_link(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere"
    target.write_text("keep\n", encoding="utf-8")
    (out / checkpoints.OUTPUT_LOCK).symlink_to(target)
    with pytest.raises(OutputFolderBusyError, match=r"a link named \.oom-supervisor\.lock"):
        OutputLock(run_dir=tmp_path / "run").take(out)
    assert target.read_text(encoding="utf-8") == "keep\n"
