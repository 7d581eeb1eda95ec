"""Strict booleans and numbers: what pydantic's lax mode would silently convert (`epochs: true` read as 1)."""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from tltool.config.root import Config


def _value_kinds(annotation: Any) -> set[str]:
    """What a field's annotation accepts, coarsely: bool, number, str, none, literal, list, dict, model, any."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return set().union(*(_value_kinds(arg) for arg in get_args(annotation)))
    if origin is Literal:
        return {"literal"}
    if origin in (list, tuple):
        return {"list"}
    if origin is dict:
        return {"dict"}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"model"}
    return {bool: {"bool"}, int: {"number"}, float: {"number"}, str: {"str"}, type(None): {"none"}}.get(
        annotation, {"any"}
    )


def _element_annotations(annotation: Any, value: Any) -> list[tuple[str, Any, Any]]:
    """(index or key, annotation, item) of a list/tuple/dict value under a list/tuple/dict annotation."""
    for member in get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,):
        origin, args = get_origin(member), get_args(member)
        if origin is list and isinstance(value, list) and args:
            return [(f"[{i}]", args[0], item) for i, item in enumerate(value)]
        if origin is tuple and isinstance(value, list | tuple) and args:
            items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            return [(f"[{i}]", item_type, item) for i, (item_type, item) in enumerate(zip(items, value, strict=False))]
        if origin is dict and isinstance(value, dict) and len(args) == 2:
            return [(f"[{k}]", args[1], item) for k, item in value.items()]
    return []


def strict_scalar_problems(data: Any, model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, problem) for booleans where numbers belong and numbers or strings where booleans belong.

    pydantic's lax mode would take `epochs: true` as 1 and `save_best: 0` or `"no"` as false: a typo or a
    YAML 1.1 surprise (`on`, `yes`) would run silently with a value nobody wrote.
    """
    if not isinstance(data, dict):
        return []
    problems: list[tuple[str, str]] = []
    for name, info in model.model_fields.items():
        if name in data:
            problems += _scalar_problems(data[name], info.annotation, f"{prefix}{name}")
    return problems


def _scalar_problems(value: Any, annotation: Any, dotted: str) -> list[tuple[str, str]]:
    kinds = _value_kinds(annotation)
    if "any" in kinds:
        return []
    if "model" in kinds:
        model = next(a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel))
        return strict_scalar_problems(value, model, dotted + ".")
    if isinstance(value, bool) and "bool" not in kinds and "number" in kinds:
        return [(dotted, f"must be a number, not {str(value).lower()} (a YAML boolean)")]
    if "bool" in kinds and kinds <= {"bool", "none"} and not isinstance(value, bool) and value is not None:
        return [(dotted, f"must be true or false, not {value!r}")]
    problems = []
    for index, item_annotation, item in _element_annotations(annotation, value):
        problems += _scalar_problems(item, item_annotation, f"{dotted}{index}")
    return problems
