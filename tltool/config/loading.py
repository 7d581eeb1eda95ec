"""From a YAML file and KEY=VALUE overrides to a validated Config, every problem reported at once.

The file is read by `tltool.config_yaml` (strict safe loader); the overrides are YAML values under known
dotted keys; `build_config` validates the merged dict: strict scalars (strict.py), pydantic, the model
names given, each problem one line (messages.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tltool.config.keys import all_keys, suggestion
from tltool.config.messages import example_suffix, format_errors
from tltool.config.root import Config
from tltool.config.strict import strict_scalar_problems
from tltool.config.values import ModelNames
from tltool.config_yaml import read_yaml, yaml_text
from tltool.errors import ConfigError


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn `a.b=value` strings into a nested dict; values are read as YAML (`3`, `1e-4`, `[a, b]`, `null`)."""
    known = set(all_keys())
    tree: dict[str, Any] = {}
    problems = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"{text!r}: an override is KEY=VALUE, e.g. train.epochs=3")
            continue
        if key not in known:
            problems.append(f"{key}: unknown key; {suggestion(key.split('.'))}")
            continue
        try:
            value = yaml_text(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if problems:
        raise ConfigError(f"{len(problems)} bad override(s)", "fix them and run again", details=problems)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(data: dict[str, Any], source: str = "config", names: ModelNames | None = None) -> Config:
    """Validate a plain dict into a Config, reporting every problem at once (the model names too, given `names`).

    Booleans and numbers are strict (`strict_scalar_problems`): `epochs: true` is refused, not read as 1.
    """
    strict = strict_scalar_problems(data)
    lines = [f"{dotted}: {problem}{example_suffix(dotted.split('[')[0].split('.'))}" for dotted, problem in strict]
    try:
        config = Config.model_validate(data, context={"model_names": names})
    except ValidationError as exc:
        flagged = tuple(f"{dotted}:" for dotted, _ in strict)  # one line per key: the strict one
        lines += [line for line in format_errors(exc) if not line.startswith(flagged)]
    if not lines:
        return config
    raise ConfigError(
        f"{source} has {len(lines)} problem{'s' if len(lines) > 1 else ''}", "fix them and run again", details=lines
    )


def load_config(path: str | Path | None, overrides: Sequence[str] = (), names: ModelNames | None = None) -> Config:
    """Load a YAML file (or only defaults when `path` is None), apply dotted overrides and validate.

    With `names` (e.g. `tltool.catalog.TORCHVISION_NAMES`) the backbone and weights names are checked too,
    among the other problems; without, they are left to whoever builds the model.
    """
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, parse_overrides(overrides))
    return build_config(data, source=str(path) if path is not None else "config", names=names)
