"""report.md and the console's words, from journals recorded from real demo runs."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from supervisor import report
from supervisor.events import RunState
from supervisor.journal import load

RUNS = Path(__file__).parent.parent / "data" / "runs"


def state_of(name: str) -> RunState:
    state, torn = load(RUNS / name)
    assert torn is None
    return state


def test_full_run_report_shows_times_memory_and_only_changed_knobs() -> None:
    """A full fit: local start/end, a human total, memory beside the device, no LoRA rows."""
    data = report.build(state_of("demo-150"))
    text = report.render_markdown(data)
    assert re.search(r"- Started: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)
    assert re.search(r"- Ended: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)
    assert "- Total time: 1 min 4 s" in text
    assert "- Device: 150 MiB (--device-memory)" in text
    assert "lora_rank" not in text  # unchanged knobs (and LoRA's rank on a full run) are left out
    assert "| gradient_checkpointing | off | on |" in text
    # OOM figures and the fitted peak, beside the device size
    assert "tried 10.8 MiB, allocated 144 MiB, capacity 150 MiB" in text
    assert "peak 95.5 MiB of 150 MiB (64%)" in text
    assert "Given up: speed (per_device_batch 4 -> 1, gradient_checkpointing off -> on)." in text
    assert "The model will be written to `/tmp/d/runs/p1/trainer-output`." in text
    assert "learning rate" not in text  # full stayed full
    assert "21600.123" not in text
    assert not re.search(r"\| \d+\.\d{3} \|", text)
    assert data["notified"][0]["exit_code"] == 0


def test_lora_fit_says_what_else_changed_and_keeps_the_evidence_whole() -> None:
    """Full -> LoRA: the learning-rate note, the adapter, and each OOM line uncut."""
    data = report.build(state_of("demo-70"))
    text = report.render_markdown(data)
    assert "| finetuning_type | full | lora | quality:" in text
    assert "learning rate and other hyper-parameters chosen for full fine-tuning were kept" in text
    assert "the result is a LoRA adapter" in text
    evidence = [a["evidence"] for a in data["attempts"] if a["evidence"]]
    assert len(evidence) == 9
    for line in evidence:
        assert f"`{line}`" in text  # the whole line, not cut at 160 characters
    assert "| 10 | shorter-cutoff | LoRA r8 b1x4 cut 512 ckpt | fits | peak 47.9 MiB" in text
    assert "- Total time: 4 min 24 s" in text


def test_assumed_start_values_are_marked() -> None:
    """A start value nothing confirmed is listed as assumed."""
    state = state_of("demo-150")
    config = dataclasses.replace(state.config, start_sources={
        "per_device_batch": "command_line", "cutoff_len": "assumed"})
    text = report.render_markdown(report.build(dataclasses.replace(state, config=config)))
    assert ("- Assumed (nothing in the command or the program confirmed them): "
            "cutoff_len = 1024") in text


def test_evidence_is_cut_only_after_the_allocated_by_pytorch_figure() -> None:
    """A long CUDA message keeps its 'allocated by PyTorch' figure."""
    line = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
            "total capacity of 79.15 GiB of which 1.05 GiB is free. Including non-PyTorch memory, "
            "this process has 78.09 GiB memory in use. Of the allocated memory 75.50 GiB is "
            "allocated by PyTorch, and 1.98 GiB is reserved by PyTorch but unallocated. "
            + "x" * 500)
    cut = report._evidence(line)  # noqa: SLF001 - the cutting rule itself
    assert "75.50 GiB is allocated by PyTorch" in cut
    assert cut.endswith(" ...")
    assert len(cut) < len(line)


@pytest.mark.parametrize(("seconds", "words"), [
    (7.145, "7.1 s"), (81.742, "1 min 22 s"), (21600.123, "6 h 0 min"), (None, "-")])
def test_durations_read_as_people_say_them(seconds: float | None, words: str) -> None:
    """Seconds become s / min / h."""
    assert report.human_duration(seconds) == words


def test_write_puts_memory_png_beside_report_md(tmp_path: Path) -> None:
    """report.write draws memory.png (matplotlib is in the dev group) and report.md embeds it."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    shutil.copytree(RUNS / "demo-70", run)
    data = report.write(run, load(run)[0])
    assert (run / "memory.png").stat().st_size > 1000
    assert data["plot"] == "memory.png"
    assert "![memory per attempt](memory.png)" in (run / "report.md").read_text()


def test_final_command_runs_the_final_config_the_report_names() -> None:
    """An axolotl/args-file argv naming attempts/NN/oom.yml (or final/oom.yml) runs final.yml
    instead; a copy outside the run folder (private, holding secrets) and other words stay."""
    state = state_of("demo-150")
    assert state.final is not None
    argv = ("axolotl", "train", "/runs/r1/attempts/03/oom.yml", "--micro-batch-size", "2",
            "/runs/r1/final/args.json", "/home/u/.cache/private-xyz/oom.yml", "attempts/03/oom.yml")
    final = dataclasses.replace(state.final, fresh_argv=argv,
                                files=("final.yml", "final-ds.json", "final.json"))
    data = report.build(dataclasses.replace(state, final=final))
    assert data["final_command"] == [
        "axolotl", "train", "/runs/r1/final.yml", "--micro-batch-size", "2",
        "/runs/r1/final.json", "/home/u/.cache/private-xyz/oom.yml", "attempts/03/oom.yml"]
    assert "exec axolotl train /runs/r1/final.yml" in report.final_command_script(data)


def test_a_deepspeed_run_says_in_one_line_whether_its_ladder_walks_zero() -> None:
    """ZeRO-2 under the default ladder: the report names `--policy multi-gpu`; under
    multi-gpu it says the ZeRO rungs are walked; no line without DeepSpeed."""
    state = state_of("demo-150")
    assert report.deepspeed_note(state.config) is None
    zero2 = dataclasses.replace(state.config,
                                start=dataclasses.replace(state.config.start, deepspeed_stage=2))
    note = report.deepspeed_note(zero2)
    assert note == ("DeepSpeed ZeRO-2: the ZeRO rungs (ZeRO-2, ZeRO-3, optimizer offload) are in "
                    "`--policy multi-gpu`, not in the 'default' ladder this run walks")
    md = report.render_markdown(report.build(dataclasses.replace(state, config=zero2)))
    assert f"; {note}" in md
    multi = (Path(__file__).parents[2] / "policies" / "multi-gpu.toml").read_text(encoding="utf-8")
    walked = dataclasses.replace(zero2, policy_name="multi-gpu", policy_text=multi)
    assert report.deepspeed_note(walked) == (
        "DeepSpeed ZeRO-2: the 'multi-gpu' ladder walks the ZeRO rungs (ZeRO-2, ZeRO-3, "
        "optimizer offload) before any cut in cutoff or method")


def test_a_no_data_attempt_is_reported_with_its_verdict_and_evidence() -> None:
    """Recorded run (no-data-70): attempt 4 is `no_data` with the trainer's line, not counted
    as an OOM; the run walked on and fitted at LoRA with the full cutoff."""
    data = report.build(state_of("no-data-70"))
    assert [a["verdict"] for a in data["attempts"]] == [
        "oom", "oom", "oom", "no_data", "oom", "fits"]
    assert data["oom_verdicts"] == 4
    assert data["attempts"][3]["rung"] == "shorter-cutoff"
    assert data["final_knobs"]["cutoff_len"] == 512
    assert data["final_knobs"]["finetuning_type"] == "lora"
    md = report.render_markdown(data)
    assert ("attempt 4: `ValueError: num_samples should be a positive integer value, but got "
            "num_samples=0`") in md


def test_lora_learning_rate_advice_only_where_the_rate_is_below_the_lora_range() -> None:
    """A LoRA result at the command's 2e-4 gets no 'raise it' advice; at 1e-5 it does."""
    from supervisor.knobs import FinetuningType, Knobs  # noqa: PLC0415
    from supervisor.report import _other_changes  # noqa: PLC0415

    start = Knobs(per_device_batch=8)
    final = Knobs(per_device_batch=8, finetuning_type=FinetuningType.LORA, lora_rank=8)
    high = _other_changes(start, final, ["train.py", "--learning_rate", "2e-4"])
    low = _other_changes(start, final, ["train.py", "--learning_rate=1e-5"])
    assert any("already in the range adapters usually train at" in n for n in high)
    assert not any("usually wants a higher learning rate" in n for n in high)
    assert any("learning rate (1e-05) and other" in n and "higher learning rate" in n
               for n in low)


@pytest.mark.parametrize(("numbers", "expected"), [
    ({"tried_mib": 20.0, "allocated_mib": 60.0}, ">= 80.0 MiB of 70.0 MiB"),
    ({"tried_mib": 20.0}, "tried 20.0 MiB of 70.0 MiB"),
    ({"capacity_mib": 70.0, "free_mib": 1.0}, "capacity 70.0 MiB of 70.0 MiB"),
])
def test_status_gives_the_figures_report_md_gives(numbers: dict[str, float],
                                                  expected: str) -> None:
    """status's short memory words carry the OOM's figures wherever report.md shows some."""
    from supervisor.report import memory_words, need_mib  # noqa: PLC0415

    row = {"verdict": "oom", "numbers": numbers, "need_mib": need_mib(numbers, None)}
    assert memory_words(row, 70.0, short=True) == expected
    assert memory_words(row, 70.0, short=True) != "oom"
