"""The config: a tree of frozen, validated pydantic models, loaded from YAML plus dotted overrides.

Every field has a default that works and a docstring; the docstrings are the reference that
`tltool config init`, `tltool config keys` and the README print. All problems of a config are
reported at once, each with its dotted key, the bad value and an example of a valid one.

One job per module; every name the rest of tltool uses is imported from here (`tltool.config`):

- values.py    durations (`run.time_limit`), `ModelNames` (the backbone/weights name checks), `weights_is_file`
- sections.py  one model per section (`RunConfig`, `DataConfig`, ..., `LogConfig`): fields, defaults, docstrings
- root.py      `Config`, the whole run: the sections and the rules across them (`multilabel_refused`)
- keys.py      the dotted keys (`all_keys`, `iter_fields`), the field docstrings read on demand, did-you-mean
- strict.py    booleans and numbers checked strictly before pydantic's lax conversion
- messages.py  a pydantic error as one line: key, problem, value, example
- loading.py   `load_config`: YAML (`tltool.config_yaml`) + `parse_overrides` -> `build_config`

Importing it is cheap: the docstrings are parsed only when a document asks for them (keys.field_docs).
Validating a config imports neither torch nor torchvision (values.py says how the model names are checked).
"""

from tltool.config.keys import all_keys, did_you_mean, field_docs, iter_fields
from tltool.config.loading import build_config, load_config, parse_overrides
from tltool.config.root import Config, multilabel_refused
from tltool.config.sections import (
    AdaptConfig,
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LogConfig,
    ModelConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
)
from tltool.config.strict import strict_scalar_problems
from tltool.config.values import DURATION_GRAMMAR, WEIGHTS_FILE_SUFFIXES, ModelNames, parse_duration, weights_is_file

__all__ = [
    "DURATION_GRAMMAR",
    "WEIGHTS_FILE_SUFFIXES",
    "AdaptConfig",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "LogConfig",
    "ModelConfig",
    "ModelNames",
    "RunConfig",
    "SourceConfig",
    "TrainConfig",
    "all_keys",
    "build_config",
    "did_you_mean",
    "field_docs",
    "iter_fields",
    "load_config",
    "multilabel_refused",
    "parse_duration",
    "parse_overrides",
    "strict_scalar_problems",
    "weights_is_file",
]
