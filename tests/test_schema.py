"""Editor support and shell completion: `tltool config schema`, configs/schema.json, Typer completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from tltool.cli import app
from tltool.config import all_keys
from tltool.config_docs import json_schema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELINE = "# yaml-language-server: $schema=schema.json"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else node


def schema_keys(schema: dict[str, Any]) -> list[str]:
    """Every dotted leaf key the schema allows."""
    keys = []
    for section, node in schema["properties"].items():
        for name in _resolve(schema, node)["properties"]:
            keys.append(f"{section}.{name}")
    return keys


def test_command_prints_the_schema_with_descriptions_and_no_extra_keys() -> None:
    result = CliRunner().invoke(app, ["config", "schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema == json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/") and schema["additionalProperties"] is False
    assert sorted(schema_keys(schema)) == sorted(all_keys())
    for section in schema["properties"].values():
        assert "description" in section
        definition = _resolve(schema, section)
        assert definition["additionalProperties"] is False
        for field in definition["properties"].values():
            assert field.get("description") and "title" not in field
    train = _resolve(schema, schema["properties"]["train"])["properties"]
    assert set(train["optimizer"]["enum"]) == {"sgd", "adam", "adamw"} and train["epochs"]["default"] == 10


def test_committed_schema_is_current() -> None:
    committed = json.loads((CONFIGS / "schema.json").read_text(encoding="utf-8"))
    assert committed == json_schema(), "run `tltool config schema > configs/schema.json`"


def test_every_config_points_editors_at_the_schema_and_uses_known_keys() -> None:
    known = set(schema_keys(json_schema()))
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert text.splitlines()[0] == MODELINE, f"{path.name} must start with {MODELINE!r}"
        data = yaml.safe_load(text) or {}
        used = {f"{section}.{key}" for section, values in data.items() for key in (values or {})}
        assert used <= known, (path.name, used - known)


def test_shell_completion_completes_commands_and_options() -> None:
    """What `tltool --install-completion` installs: the shell asks tltool itself for the candidates."""
    tltool = Path(sys.executable).parent / "tltool"
    for words, cword, expected in (("tltool do", "1", "doctor"), ("tltool config sc", "2", "schema")):
        env = {**os.environ, "_TLTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": cword}
        done = subprocess.run([str(tltool)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and expected in done.stdout.split(), (done.stdout, done.stderr)
