"""When a program's --help is taken as ignored: evidence of training, never silence alone."""

from __future__ import annotations

import pytest

from supervisor.program import HELP_TIMEOUT_S, ProbeSeen, judge_probe

USAGE = "usage: train.py [-h] [--per_device_train_batch_size N]\n"


@pytest.mark.parametrize("seen", [
    ProbeSeen(elapsed_s=30.0),  # importing on a loaded node: no output, no children
    ProbeSeen(elapsed_s=HELP_TIMEOUT_S - 1),
    ProbeSeen(elapsed_s=40.0, stdout=USAGE, first_output_s=39.0),
    ProbeSeen(elapsed_s=40.0, stdout="loading...\n", first_output_s=38.0),  # 2 s: wait on
    ProbeSeen(elapsed_s=5.0, stdout=USAGE + "{'loss': 1.0}", training_line="{'loss': 1.0}"),
])
def test_a_program_still_starting_up_is_waited_for(seen: ProbeSeen) -> None:
    """Silence, however long within the allowance, or a usage text: not taken for training."""
    assert judge_probe(seen) is None


@pytest.mark.parametrize(("seen", "said"), [
    (ProbeSeen(elapsed_s=2.0, training_line="step 3 loss 2.1"), "printed a training step"),
    (ProbeSeen(elapsed_s=9.0, checkpoints=("out/checkpoint-2",)), "wrote checkpoint folders"),
    (ProbeSeen(elapsed_s=9.0, gpu_mib=1200), "took 1200 MiB of GPU memory"),
    (ProbeSeen(elapsed_s=9.0, stdout="epoch 0\n", first_output_s=5.0), "printed other output"),
    (ProbeSeen(elapsed_s=9.0, lasting_children=2), "started other processes"),
])
def test_evidence_of_training_ends_it(seen: ProbeSeen, said: str) -> None:
    """A step's line, checkpoints, GPU memory, workers or non-usage output: it ignores --help."""
    note = judge_probe(seen)
    assert note is not None
    assert said in note
    assert "ignores --help" in note


def test_the_start_up_allowance_ends_a_silent_program() -> None:
    """Silent past the allowance: ended, and said as silence, not as training."""
    note = judge_probe(ProbeSeen(elapsed_s=HELP_TIMEOUT_S + 1))
    assert note is not None
    assert "printed nothing" in note
    assert "training" not in note
