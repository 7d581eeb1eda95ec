"""A config problem as one line: the dotted key, what is wrong, the value given and an example of a valid one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from tltool.config.keys import field_info, suggestion


def example_suffix(loc: Sequence[Any]) -> str:
    """ "; e.g. key: value" from the first example of the field at `loc` ("" when it has none): how a line ends."""
    info = field_info(loc)
    if info is None or not info.examples:
        return ""
    text = yaml.safe_dump(info.examples[0], default_flow_style=True).strip().removesuffix("\n...").removesuffix(" ...")
    return f"; e.g. {loc[-1]}: {text}"


def format_errors(error: ValidationError) -> list[str]:
    """One line per problem pydantic found (an unknown key: with did-you-mean)."""
    lines = []
    for item in error.errors():
        loc = [p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function")))]
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{dotted}: unknown key; {suggestion(loc)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{dotted}: {message}{got_text}{example_suffix(loc)}")
    return lines
