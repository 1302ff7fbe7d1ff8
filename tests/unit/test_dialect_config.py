"""The YAML/JSON round trip the config dialects share: untouched bytes stay untouched."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.dialects._config import ConfigFile, format_scalar, parse_scalar

STYLES = {
    "lf.yaml": "### model\nmodel_name_or_path: m  # note\n\nlearning_rate: 1.0e-4\nbatch: 4\n",
    "nested-offset.yml": ("datasets:\n  - path: a.jsonl\n    type: alpaca\n  - path: b\n"
                          'special_tokens:\n  pad_token: "<pad>"\nbatch: 4\n'),
    "nested-flat.yml": "datasets:\n- path: a.jsonl\n  type: alpaca\nbatch: 4\n",
    "flow.yaml": "targets: [q_proj, v_proj]\nextra: {a: 1, b: 'x'}\nbatch: 4\n",
    "long.yaml": "prompt: " + "word " * 60 + "end\nbatch: 4\n",
    "args.json": '{\n  "output_dir": "out",\n  "batch": 4\n}\n',
    "args4.json": '{\n    "nested": {\n        "x": 1\n    },\n    "batch": 4\n}\n',
}


@pytest.mark.parametrize("name", STYLES)
def test_rewriting_a_value_to_itself_gives_the_same_bytes(name: str, tmp_path: Path) -> None:
    """read -> write back with the same value: byte for byte, whatever the file's style."""
    path = tmp_path / name
    path.write_text(STYLES[name], encoding="utf-8")
    config = ConfigFile.load(path, what="config")
    assert config.render({"batch": 4}) == STYLES[name]


@pytest.mark.parametrize("name", STYLES)
def test_a_change_touches_only_its_own_line(name: str, tmp_path: Path) -> None:
    """Changing one value changes exactly that line (comments, order and quotes kept)."""
    path = tmp_path / name
    path.write_text(STYLES[name], encoding="utf-8")
    out = ConfigFile.load(path, what="config").render({"batch": 2})
    before, after = STYLES[name].splitlines(), out.splitlines()
    assert len(before) == len(after)
    assert [(b, a) for b, a in zip(before, after, strict=True) if b != a] == [
        (line, line.replace("4", "2")) for line in before if "batch" in line]


@pytest.mark.parametrize(("text", "value"), [
    ("4", 4), ("true", True), ("False", False), ("null", None), ("saves/x-lora-r8",
                                                                  "saves/x-lora-r8"),
    ("1.0e-4", 1.0e-4), ("'4'", "4"),
])
def test_override_scalars_parse_as_omegaconf_reads_them(text: str, value: object) -> None:
    """`key=value` overrides are YAML scalars."""
    assert parse_scalar(text) == value


@pytest.mark.parametrize("value", [4, True, None, "saves/x", "4", "true", "a: b"])
def test_formatted_scalars_parse_back(value: object) -> None:
    """What the dialect writes after `key=` reads back as the same value."""
    assert parse_scalar(format_scalar(value)) == value
