"""`tltool models`: torchvision's backbones and weights with their records, filtered, as a table or JSON."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import torchvision
from typer.testing import CliRunner

import tltool.models
import tltool.stages
from tltool.catalog import catalog, family_of, format_catalog, model_names
from tltool.cli import app


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table fits the terminal; the tests read every column."""
    monkeypatch.setenv("COLUMNS", "200")


def test_table_lists_resnet18_with_torchvision_records(cli: CliRunner) -> None:
    result = cli.invoke(app, ["models", "resnet18"])
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()[:2]
    assert header.split() == [
        "model", "weights", "params", "GFLOPS", "size", "acc@1", "acc@5", "MB", "family", "head", "stages"
    ]  # fmt: skip
    assert re.match(
        r"resnet18\s+IMAGENET1K_V1 \*\s+11\.7M\s+1\.81\s+224\s+69\.758\s+89\.078\s+44\.7\s+ResNet\s+yes", row
    )
    assert "1 model, 1 weights" in result.stdout


def test_pattern_glob_substring_and_case() -> None:
    assert model_names("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert "wide_resnet50_2" in model_names("resnet") and "resnext50_32x4d" not in model_names("resnet")
    assert model_names("ResNet1?") == ["resnet18"]
    assert model_names("vit_?_16") == ["vit_b_16", "vit_l_16"]
    assert len(model_names()) == len(torchvision.models.list_models(module=torchvision.models))


def test_json_covers_every_model_and_weights_quickly(cli: CliRunner) -> None:
    start = time.perf_counter()
    entries = catalog()
    assert time.perf_counter() - start < 5
    result = cli.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == len(entries)
    names = [row["model"] for row in rows]
    assert names == sorted(names) and set(names) == set(torchvision.models.list_models(module=torchvision.models))
    expected_weights = sum(len(torchvision.models.get_model_weights(name)) for name in set(names))
    assert len(rows) == expected_weights
    resnet18 = next(row for row in rows if row["model"] == "resnet18")
    stage_table = tltool.stages.STAGE_TABLE
    assert resnet18 | {"file_size_mb": None} == {
        "model": "resnet18", "family": "ResNet", "weights": "IMAGENET1K_V1", "default": True,
        "num_params": 11_689_512, "gflops": 1.814, "acc1": 69.758, "acc5": 89.078, "image_size": 224,
        "min_size": 1, "file_size_mb": None, "head": "fc", "stages": "ResNet" in stage_table,
    }  # fmt: skip
    defaults = [row["model"] for row in rows if row["default"]]
    assert sorted(defaults) == sorted(set(names))  # exactly one DEFAULT per model
    # Every family tltool's head table knows is marked supported, and only those.
    assert all((row["head"] is not None) == (row["family"] in tltool.models.HEAD_TABLE) for row in rows)
    assert all(row["stages"] == (row["family"] in stage_table or row["model"] in stage_table) for row in rows)
    # Weights never evaluated as a classifier record nan in torchvision: null here, valid JSON.
    assert next(r for r in rows if r["weights"] == "IMAGENET1K_FEATURES")["acc1"] is None


def test_unknown_pattern_is_one_line_error(cli: CliRunner) -> None:
    result = cli.invoke(app, ["models", "resnt50"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no torchvision model matches 'resnt50'"), result.stderr
    assert "resnet50" in lines[0]  # did you mean
    assert cli.invoke(app, ["models", "zz*"]).exit_code == 2


def test_head_and_stage_support_follow_tltool_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tltool.stages, "STAGE_TABLE", {"ResNet": ["layer1", "layer2"]})
    monkeypatch.delitem(tltool.models.HEAD_TABLE, "MobileNetV3")
    by_model = {entry.model: entry for entry in catalog("resnet18") + catalog("mobilenet_v3_small")}
    assert by_model["resnet18"].stages and by_model["resnet18"].head == "fc"
    assert not by_model["mobilenet_v3_small"].stages and by_model["mobilenet_v3_small"].head is None
    table = format_catalog(list(by_model.values()), width=200)
    assert re.search(r"mobilenet_v3_small .* no\s+no$", table, flags=re.MULTILINE)


def test_family_from_annotation_matches_the_built_class() -> None:
    for name in ("resnet18", "mobilenet_v3_small", "vit_b_16", "squeezenet1_1"):
        with torch.device("meta"):
            built = torchvision.models.get_model(name, weights=None)
        assert family_of(name) == type(built).__name__


def test_table_fits_a_narrow_terminal() -> None:
    entries = catalog()
    narrow = format_catalog(entries, width=80).splitlines()
    table = narrow[: len(entries) + 1]
    assert max(len(line) for line in table) <= 80
    assert "family" not in table[0] and {"model", "weights", "params", "GFLOPS", "acc@1", "head"} <= set(
        table[0].split()
    )
    assert "family" in format_catalog(entries, width=200).splitlines()[0]
