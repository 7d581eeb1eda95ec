"""Importing the config is cheap: no docstring is parsed at import; they are read on demand, once, as pydantic would."""

from __future__ import annotations

import json
import subprocess
import sys

from pydantic import BaseModel, ConfigDict

import tltool.config as config
from tltool.config import Config, DataConfig, TrainConfig, field_docs, iter_fields


class Base(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    inherited: int = 0
    """From the base class."""


class Documented(Base):
    """The class's own docstring: no field's."""

    plain: int = 1
    """One line."""
    wrapped: str = "x"
    """First line,
        then an indented second one.

    A paragraph."""
    undocumented: int = 2
    after: int = 3
    # a comment between a field and its docstring is not a statement

    """Still the docstring of `after`."""

    def method(self) -> None:
        """A method's docstring: no field's."""

    last: float = 4.0
    """Last."""


def test_field_docs_read_what_pydantic_reads_from_the_source() -> None:
    """The oracle: these classes keep pydantic's `use_attribute_docstrings`, which the config leaves off."""
    docs = field_docs(Documented)
    assert docs == {name: info.description for name, info in Documented.model_fields.items() if info.description}
    assert docs["wrapped"] == "First line,\n    then an indented second one.\n\nA paragraph."
    assert "undocumented" not in docs and docs["inherited"] == "From the base class."


def test_a_model_without_source_has_no_field_docs() -> None:
    namespace: dict = {"BaseModel": BaseModel, "__name__": "built_in_memory"}
    exec('class Made(BaseModel):\n    x: int = 1\n    """Unreadable."""\n', namespace)
    assert field_docs(namespace["Made"]) == {}


def test_every_config_field_has_its_docstring_on_one_line() -> None:
    docs = {key: doc for key, _default, doc, _example in iter_fields()}
    assert docs["train.lr"] == "Peak learning rate (after warmup)."
    assert docs["data.train"].startswith(
        "Training images: a folder with one sub-folder per class (ImageFolder layout), a"
    )
    assert "\n" not in docs["data.train"] and "  " not in docs["data.train"]
    assert field_docs(Config)["run"] == "Name, directory, seed and device of the run."
    # The models carry no description: the docstrings are not parsed when a class is built.
    assert all(
        info.description is None for model in (Config, DataConfig, TrainConfig) for info in model.model_fields.values()
    )


PROBE = r"""
import ast, json, sys
parsed = []
parse = ast.parse
ast.parse = lambda source, *a, **k: (parsed.append(str(source)[:60]), parse(source, *a, **k))[1]
import tltool.config as config
counts = [len(parsed)]
config.load_config(None, ["train.epochs=2", "data.train=x"])
try:
    config.load_config(None, ["train.lrr=1"])
except Exception:
    pass
counts.append(len(parsed))
list(config.iter_fields()); list(config.iter_fields())
counts.append(len(parsed))
print(json.dumps(counts))
"""


def test_import_and_loading_parse_no_source_and_the_docs_parse_each_module_once() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    counts = json.loads(result.stdout)
    # import, then two load_configs (overrides, did-you-mean): nothing parsed; then the leaf fields' docstrings,
    # twice: their one source file (sections.py) parsed once. (With use_attribute_docstrings: 22 at import.)
    assert counts == [0, 0, 1], counts


def test_every_name_the_code_imports_from_tltool_config_is_there() -> None:
    names = {
        *("AdaptConfig", "CheckpointConfig", "Config", "DataConfig", "DistillConfig", "LogConfig", "ModelConfig"),
        *("ModelNames", "RunConfig", "SourceConfig", "TrainConfig", "all_keys", "build_config", "did_you_mean"),
        *("iter_fields", "load_config", "multilabel_refused", "parse_duration", "parse_overrides"),
        *("strict_scalar_problems", "weights_is_file", "WEIGHTS_FILE_SUFFIXES", "DURATION_GRAMMAR", "field_docs"),
    }
    assert names <= set(config.__all__) and all(hasattr(config, name) for name in names)
