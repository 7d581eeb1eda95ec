"""The config's keys: the dotted leaf keys, each field's docstring (read on demand), did-you-mean for a typo.

The docstrings are read from the sections' source with `ast` the first time a document asks (`iter_fields`:
`tltool config init|keys|schema`, the README table, configs/schema.json), once per class. pydantic's
`use_attribute_docstrings` reads the same docstrings, but at import, ~50 ms of every tltool command.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tltool.config.root import Config


@functools.cache
def _class_nodes(module: str) -> dict[str, ast.ClassDef]:
    """The top-level class definitions of a module's source, by name (the source parsed once); none when the
    source cannot be read (no .py file: the docstrings are then empty, as pydantic leaves them)."""
    try:
        source = inspect.getsource(sys.modules[module])
    except (KeyError, OSError, TypeError):
        return {}
    return {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}


@functools.cache
def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """{field name: docstring} of a config model: the string literal right after each annotated field in the
    class body (its own and its base classes'), cleaned as `inspect.cleandoc` does (pydantic's rule too)."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (issubclass(cls, BaseModel) and cls is not BaseModel):
            continue
        node = _class_nodes(cls.__module__).get(cls.__name__)
        body = node.body if node is not None else []
        for field, after in zip(body, body[1:], strict=False):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(field.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[field.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _leaves(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel], str, FieldInfo]]:
    """(dotted key, model, field name, FieldInfo) of every leaf field, in declaration order."""
    for name, info in model.model_fields.items():
        if _is_section(info.annotation):
            yield from _leaves(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", model, name, info


def iter_fields(model: type[BaseModel] = Config, prefix: str = "") -> Iterator[tuple[str, Any, str, Any]]:
    """Yield (dotted key, default, docstring, example) for every leaf field of the config."""
    for key, owner, name, info in _leaves(model, prefix):
        example = info.examples[0] if info.examples else None
        doc = " ".join(field_docs(owner).get(name, "").split())  # (a docstring over several lines: one line)
        yield key, info.get_default(call_default_factory=True), doc, example


@functools.cache
def _all_keys() -> tuple[str, ...]:
    return tuple(key for key, *_ in _leaves(Config))


def all_keys() -> list[str]:
    """Every dotted leaf key of the config, in declaration order (`train.lr`, ...)."""
    return list(_all_keys())


def field_info(loc: Sequence[Any]) -> FieldInfo | None:
    """The FieldInfo of a (section, field) location, or None (the deepest one found: a list index is skipped)."""
    model: type[BaseModel] = Config
    info = None
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return info
        info = model.model_fields[part]
        if _is_section(info.annotation):
            model = info.annotation
    return info


# The names other tools give tltool's keys (timm's train.py, Lightning, Keras, torchvision's references): an
# unknown key close to one of them is pointed at tltool's (learning_rate -> train.lr, not train.calibrate).
ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "max_lr": "lr", "init_lr": "lr",
    "num_epochs": "epochs", "max_epochs": "epochs", "n_epochs": "epochs",
    "lr_scheduler": "scheduler", "sched": "scheduler", "optim": "optimizer", "opt": "optimizer",
    "wd": "weight_decay", "batchsize": "batch_size", "workers": "num_workers",
    "img_size": "image_size", "input_size": "image_size", "arch": "backbone", "model_name": "backbone",
    "pretrained": "weights", "clip_grad": "grad_clip_norm", "gradient_clip_val": "grad_clip_norm",
    "smoothing": "label_smoothing", "warmup": "warmup_epochs", "accumulate_grad_batches": "accumulate_steps",
    "patience": "early_stopping_patience", "model_ema_decay": "ema_decay", "amp": "precision",
}  # fmt: skip


def suggestion(loc: Sequence[Any]) -> str:
    """Suggestion for an unknown key at `loc` (another tool's name for a key first, then the same section, then
    the same leaf name elsewhere)."""
    keys = all_keys()
    dotted = ".".join(str(p) for p in loc)
    alias = difflib.get_close_matches(str(loc[-1]), list(ALIASES), n=1, cutoff=0.8)
    if alias:
        leaf = "." + ALIASES[alias[0]]
        section = str(loc[0]) + "." if len(loc) > 1 else ""
        named = [k for k in keys if k.endswith(leaf)]
        named = [k for k in named if k.startswith(section)] or named
        if named:
            return f"did you mean '{named[0]}'?"
    if len(loc) == 1:
        candidates = list(Config.model_fields)
    else:
        parent = ".".join(str(p) for p in loc[:-1]) + "."
        candidates = [k for k in keys if k.startswith(parent)]
    close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.6)
    if not close:
        leaf = str(loc[-1])
        close = [k for k in keys if k.endswith("." + leaf)] or difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else "see `tltool config init` for every key"


def did_you_mean(key: str) -> str:
    """The suggestion for an unknown dotted key, e.g. "did you mean 'train.lr'?" (as the config's own errors say)."""
    return suggestion(key.split("."))
