"""The stall watchdog counts bytes, not lines: a real HF Trainer whose only output is its tqdm
bar (redrawn with `\\r`, no newline until the end) is not ended as a hang."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from supervisor.classify import VerdictKind, classify
from supervisor.runner import AttemptSpec, run
from tests.faults.conftest import quiet_env

pytestmark = pytest.mark.process

STEPS = 16
STEP_S = 0.5
STALL_S = 4.0
# A real transformers.Trainer on a tiny Llama built from a config (no download). Each step is
# made slow with a callback, as a large model's step is; logging is off, so between the start
# and the end the only bytes written are tqdm's `\r` redraws, one per step.
SCRIPT = f"""
import threading, time
importing = threading.Event()
def heartbeat():  # the imports' silence (seconds on a busy machine) is not what is tested
    while not importing.wait(0.5):
        print("importing", flush=True)
threading.Thread(target=heartbeat, daemon=True).start()
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback,
                          TrainingArguments)
from transformers.utils import logging
logging.set_verbosity_error()
importing.set()
print("imported; training", flush=True)
class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep({STEP_S})
config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
data = [{{"input_ids": torch.arange(8) % 64, "labels": torch.arange(8) % 64}}] * {STEPS}
args = TrainingArguments(output_dir="out", per_device_train_batch_size=1, max_steps={STEPS},
                         logging_steps=10_000, save_strategy="no", report_to=[],
                         use_cpu=True, disable_tqdm=False)
Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=data,
        callbacks=[Slow()]).train()
"""


def test_tqdm_only_output_is_progress_not_a_stall(tmp_path: Path) -> None:
    """16 steps of 0.5 s under a 4 s stall limit: no newline for > 4 s, yet it fits."""
    (tmp_path / "train.py").write_text(SCRIPT, encoding="utf-8")
    outcome = run(AttemptSpec(argv=(sys.executable, "train.py"), env=quiet_env(),
                              cwd=str(tmp_path), log_dir=tmp_path / "logs", echo=False,
                              stall_s=STALL_S, grace_s=1.0))
    assert outcome.hung is None, outcome.tail[-5:]
    assert classify(outcome).kind is VerdictKind.FITS
    err = (tmp_path / "logs" / "stderr.log").read_bytes()
    # The bar really was the only output for longer than the stall limit: the frames between
    # the first and the last step are joined by \r, with no newline among them.
    frames = err.split(b"\r")
    bar = [f for f in frames if f"/{STEPS} [".encode() in f]
    assert len(bar) >= STEPS // 2
    first = err.index(bar[0])
    last = err.index(bar[-1])
    assert b"\n" not in err[first:last]
    assert outcome.duration_s > STALL_S + 1.0
