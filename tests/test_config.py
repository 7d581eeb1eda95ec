"""Config: defaults, overrides, typos, types, YAML safety, all problems at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tltool.catalog import TORCHVISION_NAMES
from tltool.config import Config, all_keys, iter_fields, load_config, parse_overrides
from tltool.config_docs import starter_yaml
from tltool.errors import ConfigError

CONTRACT_KEYS = [
    *("run.name", "run.output_dir", "run.seed", "run.device"),
    *("data.train", "data.val", "data.val_split", "data.image_size", "data.batch_size", "data.num_workers"),
    *("data.augment", "model.backbone", "model.weights", "model.head_dropout", "train.epochs", "train.freeze"),
    *("train.optimizer", "train.lr", "train.weight_decay", "train.scheduler", "train.warmup_epochs"),
    *("train.label_smoothing", "train.grad_clip_norm", "train.accumulate_steps", "train.precision"),
    *("train.early_stopping_patience", "checkpoint.monitor"),
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems(exc: pytest.ExceptionInfo) -> str:
    return exc.value.message()


def test_contract_keys_exist_and_every_field_is_documented() -> None:
    keys = all_keys()
    assert set(CONTRACT_KEYS) <= set(keys)
    for key, _default, doc, example in iter_fields():
        assert doc, f"{key} has no docstring"
        assert example is not None, f"{key} has no example"


def test_defaults_validate_and_are_frozen() -> None:
    cfg = load_config(None)
    assert cfg.train.optimizer == "adamw" and cfg.data.batch_size == 32
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_yaml_scientific_notation_is_a_float(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML) reads 1e-4 as a string; the config coerces it.
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"
    cfg = load_config(write(tmp_path / "c.yaml", "train:\n  lr: 1e-4\n"))
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        None, ["train.epochs=3", "train.lr=3e-4", "train.freeze=[backbone.layer1, backbone.layer2]", "run.name=2024"]
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.freeze == ["backbone.layer1", "backbone.layer2"]
    assert cfg.run.name == "2024"
    assert parse_overrides(["data.val=null"]) == {"data": {"val": None}}


def test_override_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "train: {epochs: 9, lr: 0.5}\n")
    cfg = load_config(path, ["train.epochs=2"])
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.5


def test_all_problems_reported_at_once_with_key_value_and_example(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "data: {batch_size: -1}\ntrain: {epochs: ten, optimzer: sgd, lr: 0}\nmodel: {backbone: resnet81}\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path, names=TORCHVISION_NAMES)
    text = problems(exc)
    assert "5 problems" in text
    assert "data.batch_size" in text and "-1" in text and "e.g. batch_size: 64" in text
    assert "train.epochs" in text and "'ten'" in text
    assert "train.optimzer: unknown key; did you mean 'train.optimizer'?" in text
    assert "train.lr" in text
    assert "model.backbone" in text and "resnet18" in text


def test_key_in_the_wrong_section_suggests_the_right_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", "model: {lr: 0.1}\n"))
    assert "did you mean 'train.lr'?" in problems(exc)


def test_unknown_override_key_and_malformed_override() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["trian.lr=3", "epochs"])
    text = problems(exc)
    assert "trian.lr: unknown key; did you mean 'train.lr'?" in text
    assert "KEY=VALUE" in text


def test_python_tag_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(tmp_path / "c.yaml", f"run: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "python" in problems(exc)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "not a mapping"),
        ("train: 5\n", "train"),
    ],
)
def test_bad_yaml_shapes(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", text))
    assert expected in problems(exc)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in problems(exc)


def test_weights_name_is_checked_against_the_backbone() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.backbone=resnet18", "model.weights=IMAGENET9K"], names=TORCHVISION_NAMES)
    text = problems(exc)
    assert "model.weights" in text and "IMAGENET1K_V1" in text
    assert load_config(None, ["model.weights=none"], names=TORCHVISION_NAMES).model.weights == "none"
    assert load_config(None, ["model.weights=some/file.pt"], names=TORCHVISION_NAMES).model.weights == "some/file.pt"


@pytest.mark.parametrize(
    "override",
    ["run.device=gpu", "train.freeze=everything", "data.augment=heavy", "train.precision=fp8", "data.val_split=1.5"],
)
def test_invalid_values(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert key in problems(exc)


def test_starter_yaml_is_valid_and_lists_every_key() -> None:
    text = starter_yaml()
    data = yaml.safe_load(text)
    cfg = Config.model_validate(data)
    assert cfg.data.train == "path/to/train"
    for key in all_keys():
        section, name = key.split(".", 1)
        assert name in data[section]


def test_resolved_yaml_round_trips() -> None:
    cfg = load_config(None, ["train.lr=0.25", "data.train=x"])
    assert load_config(None, []).model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_validating_a_config_imports_neither_torch_nor_torchvision() -> None:
    code = (
        "import sys; from tltool.config import load_config; "
        "load_config(None, ['model.backbone=resnet81', 'model.weights=IMAGENET9K', 'run.device=cuda:1']); "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_backbone_names_are_checked_with_the_rest_and_suggest_the_closest() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["model.backbone=resnet81", "train.lr=0"], names=TORCHVISION_NAMES)
    text = problems(exc)
    assert "2 problems" in text and "train.lr" in text
    assert "model.backbone: unknown torchvision classification model; did you mean resnet18" in text
    assert "(got 'resnet81')" in text
    cfg = load_config(
        None, ["model.backbone=mobilenet_v3_small", "model.weights=IMAGENET1K_V1"], names=TORCHVISION_NAMES
    )
    assert cfg.model.backbone == "mobilenet_v3_small"


# --- YAML that silently changes or floods a config is refused -------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epochs: 3\nmodel:\n  backbone: resnet18\ntrain:\n  lr: 0.1\n", "(line 5): duplicate key 'train' "
         "(first given on line 1)"),
        ("train:\n  epochs: 3\n  lr: 0.1\n  epochs: 30\n", "(line 4): duplicate key 'epochs' (first given on line 2)"),
        ("run: &r [*r]\n", "(line 1): an alias refers to the node that contains it"),
    ],
)  # fmt: skip
def test_duplicate_keys_and_recursive_aliases_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", text))
    assert expected in problems(exc) and len(problems(exc).splitlines()) == 1, problems(exc)


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path: Path) -> None:
    """Nine levels of nine aliases: 9**9 (387 million) values once expanded; refused in milliseconds."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="aliases expand to more than 10000 values"):
        load_config(write(tmp_path / "bomb.yaml", "\n".join(lines) + "\n"))


def test_aliases_and_merge_keys_within_the_limit_still_work(tmp_path: Path) -> None:
    text = "data:\n  train: &images data/flowers\n  val: *images\ntrain: {<<: {epochs: 4}, lr: 0.01}\n"
    cfg = load_config(write(tmp_path / "c.yaml", text))
    assert (cfg.data.train, cfg.data.val, cfg.train.epochs, cfg.train.lr) == ("data/flowers",) * 2 + (4, 0.01)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train:\n  epochs: true\n", "train.epochs: must be a number, not true (a YAML boolean); e.g. epochs: 20"),
        ("data:\n  num_workers: off\n", "data.num_workers: must be a number, not false"),
        ("data:\n  mean: [0.5, yes, 0.5]\n", "data.mean[1]: must be a number, not true"),
        ("checkpoint:\n  save_best: 0\n", "checkpoint.save_best: must be true or false, not 0"),
        ("log:\n  progress: 'no'\n", "log.progress: must be true or false, not 'no'"),
    ],
)
def test_booleans_and_numbers_are_strict(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path / "c.yaml", text))
    assert expected in problems(exc) and "problem " in problems(exc).splitlines()[0], problems(exc)
    assert len(problems(exc).splitlines()) == 2  # the summary line and this one problem, once


def test_strict_checks_are_reported_with_the_other_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.epochs=true", "train.lr=-1", "train.feature_cache=on", "run.compile=false"])
    text = problems(exc)
    assert "has 2 problems" in text and "train.epochs: must be a number" in text and "train.lr:" in text


def test_a_fifo_as_config_is_named_as_such(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.yaml")
    with pytest.raises(ConfigError, match=r"pipe.yaml is a FIFO \(named pipe\), not a file"):
        load_config(tmp_path / "pipe.yaml")


def test_another_tools_name_for_a_key_points_at_tltools() -> None:
    """timm / Lightning / Keras names (and typos of them) are pointed at tltool's key, not at the nearest string."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.learnign_rate=0.1", "train.max_epochs=3", "data.img_size=64", "model.pretrained=x"])
    text = problems(exc)
    assert "train.learnign_rate: unknown key; did you mean 'train.lr'?" in text  # (not train.calibrate)
    assert "did you mean 'train.epochs'?" in text and "did you mean 'data.image_size'?" in text
    assert "did you mean 'model.weights'?" in text
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.optimzer=sgd"])
    assert "did you mean 'train.optimizer'?" in problems(exc)  # (a plain typo still finds its key)
