"""The config's documents, generated from its fields: the starter YAML, the reference table, the JSON Schema.

`tltool config init`, `tltool config keys` and `tltool config schema` print them; README.md and
configs/schema.json hold copies that tests compare with these. The fields and their docstrings live in
`tltool.config`; nothing here validates a config.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from tltool.config import Config, field_docs, iter_fields


def starter_yaml() -> str:
    """A commented config with every key at its default (`tltool config init`)."""
    lines = [
        "# tltool config: every key with its default and what it means.",
        "# Run it with: tltool finetune this.yaml   (override any key: train.epochs=3)",
    ]
    section = None
    for key, default, doc, _example in iter_fields():
        sec, name = key.split(".", 1)
        if sec != section:
            section = sec
            lines += ["", f"{sec}:"]
        if key == "data.train":
            default = "path/to/train"
        value = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...").strip()
        value = value.removesuffix("...").strip()
        lines.append(f"  # {doc}")
        lines.append(f"  {name}: {value}")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The config reference as a Markdown table (`tltool config keys`; the README holds the same)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc, _example in iter_fields():
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{key}` | `{shown}` | {doc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


class _DocumentedSchema(GenerateJsonSchema):
    """pydantic's JSON Schema with each field's docstring as its description (`keys.field_docs`: the models
    leave `use_attribute_docstrings` off, which would parse them at every import)."""

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        json_schema = super().model_schema(schema)
        properties = self.resolve_ref_schema(json_schema).get("properties", {})
        for name, doc in field_docs(schema["cls"]).items():
            if name in properties:
                properties[name].setdefault("description", doc)
        return json_schema


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a config file (`tltool config schema`, `configs/schema.json`), for editors.

    Pydantic's schema with the field docstrings as descriptions and `additionalProperties: false`
    everywhere (a typo is flagged as it is typed), tidied: a `$schema`/title header, and without the
    auto-generated per-field titles ("Val Split") that editors would show instead of the description.
    """

    def tidy(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                if key == "title" and isinstance(value, str):
                    continue
                # "properties" maps field names to schemas: a field may itself be called "title".
                out[key] = {k: tidy(v) for k, v in value.items()} if key in ("properties", "$defs") else tidy(value)
            return out
        if isinstance(node, list):
            return [tidy(item) for item in node]
        return node

    schema = tidy(Config.model_json_schema(schema_generator=_DocumentedSchema))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tltool config",
        "description": "A tltool run: `tltool finetune CONFIG.yaml`. Every key is optional; "
        "`tltool config keys` lists them with their defaults.",
        **{key: value for key, value in schema.items() if key != "description"},
    }
