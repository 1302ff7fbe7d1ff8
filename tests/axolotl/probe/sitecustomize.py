"""Test-only, on PYTHONPATH in the axolotl tier's environment: after a model is loaded, say what
class its first `q_proj` is (`bitsandbytes.nn.modules.Linear4bit` when the base really is 4-bit,
`torch.nn.modules.linear.Linear` when it is not), one line on stderr.

Python imports `sitecustomize` at start-up; this one only hooks the import of
transformers.modeling_utils (wrapping `PreTrainedModel.from_pretrained`), so a process that never
loads a model is untouched.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

MARK = "oom-supervisor-probe:"  # tests/axolotl/test_axolotl.py looks for it
_TARGET = "transformers.modeling_utils"


def _report(model: Any) -> None:  # noqa: ANN401 - a transformers model, not imported here
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            kind = type(module)
            print(f"{MARK} {name} is {kind.__module__}.{kind.__qualname__}",  # noqa: T201
                  file=sys.stderr, flush=True)
            return


def _patch(module: ModuleType) -> None:
    cls = module.PreTrainedModel
    original = cls.from_pretrained.__func__

    def from_pretrained(klass: type, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        model = original(klass, *args, **kwargs)
        _report(model)
        return model

    cls.from_pretrained = classmethod(from_pretrained)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds transformers.modeling_utils as usual, then patches it once it has run."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        del path, target
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one patch per process; the usual finders do the finding
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader: Any = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _Finder())
