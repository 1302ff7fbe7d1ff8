"""What the program will train: a rendered command read back through its dialect.

Every attempt's argv (and the config copies it points at) is read again as the program would
read it; the knobs it gives must be the knobs the run reports, plans and predicts for. A
mismatch stops the run with a line naming each knob, never an attempt that trains something
else than the report says.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from supervisor.command import Command, CommandError
from supervisor.dialects._read import to_write
from supervisor.knobs import KNOB_NAMES, Knobs, Reading, Source

if TYPE_CHECKING:
    from supervisor.dialects import Dialect

NOT_COMPARED = frozenset({"world_size", "output_dir", "model", "precision",
                          "resume_from_checkpoint", "lora_target"})
"""Read from the command, never set by a rung (the output folder and the checkpoint to resume
are the dialect's own output hygiene: LLaMA-Factory moves another parameter set aside; a LoRA
rung may spell out the program's own all-linear target, axolotl's `lora_target_linear`)."""


class RenderMismatchError(CommandError):
    """The rendered command, read back, gives other knobs than the run reports."""


def render_checked(dialect: Dialect, command: Command, knobs: Knobs, workdir: Path) -> Command:
    """`dialect.render`, then the result read back: it must train `knobs` (RenderMismatchError)."""
    before = dialect.read_sourced(command)
    rendered = dialect.render(command, knobs, workdir)
    check(dialect, before, rendered, knobs)
    return rendered


def check(dialect: Dialect, before: Reading, rendered: Command, knobs: Knobs) -> Reading:
    """The reading of `rendered`; RenderMismatchError when it is not `knobs`.

    Compared: every knob a rung can set. A knob the change put to use (the LoRA rank when
    LoRA starts) must also be said by the rendered command itself, not assumed again.
    """
    after = dialect.read_sourced(rendered)
    wrong = [f"{k} = {_show(getattr(after.knobs, k))} (the run says {_show(getattr(knobs, k))})"
             for k in KNOB_NAMES
             if k not in NOT_COMPARED and getattr(after.knobs, k) != getattr(knobs, k)]
    put_to_use = set(to_write(before, knobs)) - set(before.knobs.diff(knobs))
    wrong += [f"{k} = {_show(getattr(knobs, k))} is still only assumed"
              for k in sorted(put_to_use) if after.source(k) is Source.ASSUMED]
    if wrong:
        msg = (f"the command as rewritten for this attempt would train {'; '.join(wrong)}, "
               f"read back as {dialect.name}; nothing was run. Declare where the program "
               "keeps these settings with --knobs FILE (docs/dialects.md), or use a policy "
               "without that rung")
        raise RenderMismatchError(msg)
    return after


def _show(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "-" if value is None else str(value)
