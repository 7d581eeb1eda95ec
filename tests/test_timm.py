"""timm backbones (`model.backbone: timm/<name>`): building, weights from the local caches only, preprocessing,
stages from timm's grouping, freezing, the feature cache, export parity, exact resume, `tltool models 'timm/*'`.

All offline and tiny: timm's own test architectures (`test_resnet`, `test_convnext`, `test_vit` at 32 px,
the hybrid `test_coatnet`), whose pretrained weights the tests write into a Hugging Face cache themselves.
"""

from __future__ import annotations

import json
import math
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import run_overrides
from tltool import timm_models
from tltool.catalog import BACKBONE_NAMES, TORCHVISION_NAMES, catalog
from tltool.checkpoint import load_checkpoint
from tltool.cli import app
from tltool.config import load_config
from tltool.errors import ConfigError, ModelError
from tltool.features import cache_applies
from tltool.models import build_model, model_from_arch
from tltool.stages import backbone_stages
from tltool.train import finetune
from tltool.transfer import UnfreezePlan, freeze_modules, set_train_mode

timm = pytest.importorskip("timm")
import huggingface_hub.constants  # noqa: E402  (timm's dependency)
from safetensors.torch import save_file  # noqa: E402

import tltool.session as session_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (backbone, overrides): a CNN, a ConvNeXt, a ViT at 32 px (2x2 patches of 16) and a conv+attention hybrid.
FAMILIES = {
    "timm/test_resnet": ("data.image_size=32", "data.resize_size=32"),
    "timm/test_convnext": ("data.image_size=32", "data.resize_size=32"),
    "timm/test_vit": ("data.image_size=32", "data.resize_size=32"),
    "timm/test_coatnet": ("data.image_size=32", "data.resize_size=32"),
}


@pytest.fixture(autouse=True)
def _empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test has its own empty Hugging Face hub cache (torch hub's is conftest's), and no network."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def hf_cache_file(repo: str, state_dict: dict[str, torch.Tensor], revision: str = "0123abcd") -> Path:
    """Write `state_dict` where huggingface_hub looks for `repo`'s model.safetensors offline."""
    root = Path(huggingface_hub.constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    path = root / "snapshots" / revision / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def built(backbone: str, *overrides: str, classes: int = 3):
    cfg = load_config(None, [f"model.backbone={backbone}", *overrides], names=BACKBONE_NAMES)
    return build_model(cfg.model, cfg.data, classes, [f"c{i}" for i in range(classes)])


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- building ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", list(FAMILIES))
def test_builds_with_a_new_head_and_rebuilds_from_its_arch(backbone: str) -> None:
    result = built(backbone, "model.weights=none", *FAMILIES[backbone])
    model = result.model
    net = model.backbone
    assert type(net).__module__.startswith("timm.models.") and net.num_classes == 0  # timm's classifier removed
    features = model.features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, result.arch["in_features"]) and model.head[1].out_features == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    if backbone in ("timm/test_vit", "timm/test_coatnet"):  # input size fixed by the architecture
        assert result.arch["kwargs"] == {"img_size": 32}
    rebuilt = model_from_arch(result.arch)
    rebuilt.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(images), model(images))


def test_preprocessing_is_resolve_data_config_with_the_config_overrides() -> None:
    from timm.data import resolve_data_config

    for name in ("test_vit", "resnet10t"):
        expected = resolve_data_config({}, model=timm.create_model(name, pretrained=False))
        result = built(f"timm/{name}", "model.weights=none")
        pre = result.preprocess
        assert (pre.image_size, pre.mean, pre.std, pre.interpolation) == (
            expected["input_size"][-1],
            expected["mean"],
            expected["std"],
            expected["interpolation"],
        )
        assert pre.resize_size == int(expected["input_size"][-1] / expected["crop_pct"])  # timm's floor(size / crop)
    # timm's eval resize is floor(size / crop_pct): 224 / 0.9 = 248.9 -> 248 (this tag's own config, not the default's).
    vit_tiny = timm_models.preset("timm/vit_tiny_patch16_224.augreg_in21k")[0]
    assert (vit_tiny.image_size, vit_tiny.resize_size, vit_tiny.mean) == (224, 248, (0.5, 0.5, 0.5))
    # resnet10t: 176 px, crop 0.875 -> resize 201, bicubic; the config's keys win over the preset.
    pre = built("timm/resnet10t", "model.weights=none", "data.image_size=64", "data.mean=[0.1,0.2,0.3]").preprocess
    assert (pre.image_size, pre.resize_size, pre.mean, pre.interpolation) == (64, 73, (0.1, 0.2, 0.3), "bicubic")


def test_default_weights_come_from_the_hugging_face_cache() -> None:
    source = timm.create_model("test_resnet", pretrained=False)  # 1000 classes, like the hub's file
    torch.nn.init.normal_(source.fc.weight)
    path = hf_cache_file("timm/test_resnet.r160_in1k", source.state_dict())
    result = built("timm/test_resnet", "model.weights=DEFAULT", "data.image_size=32")
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert same(result.model.backbone.state_dict(), expected)
    assert str(path) in result.weights_source and "test_resnet.r160_in1k" in result.weights_source


def test_default_vit_weights_are_resampled_to_the_image_size() -> None:
    source = timm.create_model("test_vit", pretrained=False)  # 160 px: 10x10 patches + class token
    hf_cache_file("timm/test_vit.r160_in1k", source.state_dict())
    model = built("timm/test_vit", "model.weights=DEFAULT", *FAMILIES["timm/test_vit"]).model
    assert model.backbone.pos_embed.shape == (1, 1 + 2 * 2, 64)  # timm's filter: resampled to 2x2 patches
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_default_weights_from_the_torch_hub_cache() -> None:
    """resnet10t's tag also has a release URL: its file in the torch hub cache (TORCH_HOME) is used."""
    source = timm.create_model("resnet10t", pretrained=False)
    url = timm.models.get_pretrained_cfg("resnet10t").url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rpartition("/")[2]
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    result = built("timm/resnet10t", "model.weights=DEFAULT", "data.image_size=32")
    assert torch.equal(result.model.backbone.conv1[0].weight, source.conv1[0].weight) and str(path) in (
        result.weights_source
    )


def test_weights_files(tmp_path: Path) -> None:
    source = timm.create_model("test_convnext", pretrained=False, num_classes=7)  # a fine-tuned timm model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    result = built("timm/test_convnext", f"model.weights={tmp_path / 'w.safetensors'}", "data.image_size=32")
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc.")}
    assert same(result.model.backbone.state_dict(), expected)
    # Another architecture's file: one line naming the file and the backbone.
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(
        ModelError,
        match=r"resnet\.pth does not fit timm/test_convnext: \d+ missing \(head\.norm\.bias, .*; \d+ unexpected \(bn1",
    ):
        built("timm/test_convnext", f"model.weights={tmp_path / 'resnet.pth'}", "data.image_size=32")


def test_offline_and_absent_weights_are_one_line(tmp_path: Path, dataset: Path, cli: CliRunner) -> None:
    overrides = run_overrides(tmp_path / "run", dataset, "model.backbone=timm/test_convnext", "model.weights=DEFAULT")
    result = cli.invoke(app, ["finetune", str(write_empty(tmp_path)), *overrides, "--dry-run"])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert "cannot download timm/test_convnext.r160_in1k (HF_HUB_OFFLINE is set)" in line and "hf download" in line
    assert not (tmp_path / "run").exists()


def test_absent_weights_are_downloaded_when_online_and_offline_is_found_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    # No network here: a host that does not resolve is "offline" at once (the hub client would retry ~20 s).
    def unresolvable(host, port, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(timm_models.socket, "getaddrinfo", unresolvable)
    with pytest.raises(
        ModelError, match=r"cannot download timm/test_resnet.r160_in1k \(huggingface.co does not resolve"
    ):
        built("timm/test_resnet", "model.weights=DEFAULT", "data.image_size=32")
    # Online: the repository's model.safetensors comes through huggingface_hub into its cache, then loads.
    source = timm.create_model("test_resnet", pretrained=False)
    torch.nn.init.normal_(source.fc.weight)
    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename))
        return str(hf_cache_file(repo_id, source.state_dict()))

    monkeypatch.setattr(timm_models.socket, "getaddrinfo", lambda *a, **k: [])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    result = built("timm/test_resnet", "model.weights=DEFAULT", "data.image_size=32")
    assert asked == [("timm/test_resnet.r160_in1k", "model.safetensors")]
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert same(result.model.backbone.state_dict(), expected)


def write_empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def test_names_are_checked_against_timm_with_did_you_mean() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.backbone=timm/convnext_atoo"], names=BACKBONE_NAMES)
    assert "did you mean timm/convnext_atto" in str(info.value)
    with pytest.raises(ConfigError, match=r"no pretrained tag 'bogus' for resnet10t; its tags: c3_in1k"):
        load_config(None, ["model.backbone=timm/resnet10t.bogus"], names=BACKBONE_NAMES)
    with pytest.raises(ConfigError, match=r"a timm backbone takes none, DEFAULT"):
        load_config(None, ["model.backbone=timm/resnet10t", "model.weights=IMAGENET1K_V1"], names=BACKBONE_NAMES)
    with pytest.raises(ConfigError, match=r"timm/test_coatnet has no pretrained weights"):
        load_config(None, ["model.backbone=timm/test_coatnet"], names=BACKBONE_NAMES)
    tagged = "timm/vit_tiny_patch16_224.augreg_in21k"
    assert load_config(None, [f"model.backbone={tagged}"], names=BACKBONE_NAMES).model.backbone == tagged
    with pytest.raises(ConfigError, match="unknown torchvision"):  # torchvision's check alone knows no timm
        load_config(None, [f"model.backbone={tagged}"], names=TORCHVISION_NAMES)


def test_missing_timm_is_one_line_with_the_install(monkeypatch: pytest.MonkeyPatch, cli: CliRunner) -> None:
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ConfigError, match=re.escape("timm is not installed; pip install 'tltool[timm]'")):
        load_config(None, ["model.backbone=timm/resnet10t"], names=BACKBONE_NAMES)
    cfg = load_config(None, ["model.backbone=timm/resnet10t"])
    with pytest.raises(ModelError, match=re.escape("pip install 'tltool[timm]'")):
        build_model(cfg.model, cfg.data, 3)
    result = cli.invoke(app, ["models", "timm/resnet*"])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "pip install 'tltool[timm]'" in result.stderr


def test_timm_is_imported_only_for_timm_backbones() -> None:
    """No tltool module imports timm (or timm_models) at its top level: `import tltool...` stays as fast as before."""
    import ast

    for path in sorted((Path(__file__).resolve().parents[1] / "tltool").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "timm" or n.startswith(("timm.", "tltool.timm_models")) for n in names), path


# --- stages and freezing ----------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["timm/test_resnet", "timm/test_vit", "timm/test_convnext"])
def test_stages_are_timms_own_groups(backbone: str) -> None:
    from timm.models import group_parameters

    net = built(backbone, "model.weights=none", *FAMILIES[backbone]).model.backbone
    groups = group_parameters(net, net.group_matcher(coarse=True))
    stages = backbone_stages(net)
    params = dict(net.named_parameters())
    assert len(stages) == len(groups)
    for stage, (_, names) in zip(stages, sorted(groups.items()), strict=True):
        covered = set()
        for path in stage.paths:
            covered |= (
                {f"{path}.{n}" for n, _ in net.get_submodule(path).named_parameters()} if path not in params else {path}
            )
        assert covered == set(names), stage.name
    names = [stage.name for stage in stages]
    expected = {
        "timm/test_resnet": ["stem", "layer1", "layer2", "layer3", "layer4"],
        "timm/test_vit": ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5+norm"],
        "timm/test_convnext": ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "pre_logits"],
    }[backbone]
    assert names == expected


def test_freezing_keeps_batch_norm_in_eval_and_gradual_unfreezing_opens_timm_stages() -> None:
    overrides = ["model.weights=none", "train.unfreeze_schedule={2: 1}", "train.layer_lr_decay=0.5"]
    cfg = load_config(None, ["model.backbone=timm/test_resnet", *overrides])
    model = build_model(cfg.model, cfg.data, 3).model
    frozen = freeze_modules(model, "backbone")
    assert not any(p.requires_grad for p in model.backbone.parameters()) and model.frozen_backbone
    plan = UnfreezePlan(cfg.train, model, frozen)
    assert [p.name for p in plan.parts][-2:] == ["backbone.layer3", "backbone.layer4"]
    assert plan.parts[-2].lr == pytest.approx(plan.parts[-1].lr * 0.5)
    optimizer = torch.optim.SGD(plan.initial_groups(), lr=cfg.train.lr)
    set_train_mode(model, plan.frozen_modules())
    batch_norms = {n: m for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert batch_norms and not any(m.training for m in batch_norms.values())
    before = {n: m.running_mean.clone() for n, m in batch_norms.items()}
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[n], m.running_mean) for n, m in batch_norms.items())
    plan.open(plan.due(1), optimizer, step=10, epoch=1)  # epoch 2: the last stage opens
    set_train_mode(model, plan.frozen_modules())
    for name, module in batch_norms.items():
        assert module.training == name.startswith("layer4."), name
    assert {n for n, p in model.backbone.named_parameters() if p.requires_grad} == {
        n for n, _ in model.backbone.named_parameters() if n.startswith("layer4.")
    }


# --- runs: feature cache, resume, export --------------------------------------------------------------


def vit_run(run_dir: Path, dataset: Path, *extra: str, backbone: str = "timm/test_vit") -> dict:
    overrides = run_overrides(run_dir, dataset, f"model.backbone={backbone}", "train.optimizer=sgd", *extra)
    return finetune(load_config(None, overrides), quiet=True)


@pytest.mark.parametrize("backbone", ["timm/test_resnet", "timm/test_vit", "timm/test_coatnet"])
def test_cached_features_equal_the_uncached_forward(tmp_path: Path, dataset: Path, backbone: str) -> None:
    extra = ("train.epochs=2", "model.head_dropout=0.3")
    assert cache_applies(load_config(None, run_overrides(tmp_path, dataset, *extra)))
    cached = vit_run(tmp_path / "cached", dataset, *extra, backbone=backbone)
    plain = vit_run(tmp_path / "plain", dataset, *extra, "train.feature_cache=off", backbone=backbone)
    assert cached["feature_cache"] is not None and plain["feature_cache"] is None
    a = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.pt").model
    b = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.pt").model
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # The run's checkpoint as model.weights of a new run: backbone and head reused (same classes), its preprocessing.
    checkpoint = load_checkpoint(tmp_path / "cached" / "checkpoints" / "last.pt")
    cfg = load_config(None, [f"model.backbone={backbone}", f"model.weights={tmp_path / 'cached/checkpoints/last.pt'}"])
    reused = build_model(cfg.model, cfg.data, 3, checkpoint.class_names)
    assert same(reused.model.state_dict(), checkpoint.model) and reused.preprocess.to_dict() == checkpoint.preprocess
    assert reused.arch["kwargs"] == checkpoint.arch["kwargs"]  # (fixed-size families: img_size 32)


@pytest.mark.slow
def test_cli_resume_is_bitwise_and_the_checkpoint_keeps_timms_preprocessing(
    tmp_path: Path, dataset: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through the CLI: timm's preprocessing recorded, eval reads it, a resumed run equals a straight one."""
    source = timm.create_model("test_convnext", pretrained=False)
    hf_cache_file("timm/test_convnext.r160_in1k", source.state_dict())
    extra = ["model.backbone=timm/test_convnext", "model.weights=DEFAULT", "train.freeze=none",
             "train.optimizer=sgd", "data.augment=light", "model.head_dropout=0.2"]  # fmt: skip
    config = write_empty(tmp_path)
    straight = cli.invoke(app, ["finetune", str(config), *run_overrides(tmp_path / "a", dataset, *extra), "-q"])
    assert straight.exit_code == 0, straight.output
    real_evaluate = session_module.evaluate
    calls = []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # (after epoch 1's checkpoint)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(session_module, "evaluate", crash_in_second_epoch)
    crashed = cli.invoke(app, ["finetune", str(config), *run_overrides(tmp_path / "b", dataset, *extra), "-q"])
    assert crashed.exit_code == 130 and load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt").epoch == 1
    monkeypatch.setattr(session_module, "evaluate", real_evaluate)
    torch.manual_seed(12345)  # the resumed run's randomness comes from the checkpoint
    resumed = cli.invoke(
        app, ["finetune", str(config), *run_overrides(tmp_path / "b", dataset, *extra), "--resume", "auto", "-q"]
    )
    assert resumed.exit_code == 0, resumed.output
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a.epoch == b.epoch == 2 and same(a.model, b.model) and same(a.optimizer["state"][0], b.optimizer["state"][0])
    assert not torch.equal(a.model["backbone.stem.0.weight"], source.stem[0].weight)  # the backbone trained
    # The preprocessing is timm's (mean/std/interpolation of test_convnext's tag) at the run's 32 px.
    expected = timm.data.resolve_data_config({}, model=source)
    assert a.preprocess["mean"] == list(expected["mean"]) and a.preprocess["interpolation"] == expected["interpolation"]
    evaluated = cli.invoke(app, ["eval", str(tmp_path / "a" / "checkpoints" / "last.pt"), "--data", str(dataset)])
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.slow  # (the ONNX export of a ViT takes ~30 s on 2 loaded cores)
@pytest.mark.parametrize("backbone", ["timm/test_resnet", "timm/test_vit", "timm/test_coatnet"])
def test_onnx_export_parity(tmp_path: Path, dataset: Path, cli: CliRunner, backbone: str) -> None:
    pytest.importorskip("onnxruntime")
    vit_run(tmp_path / "run", dataset, "train.epochs=1", backbone=backbone)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    result = cli.invoke(app, ["export", str(checkpoint), "--format", "onnx"])
    assert result.exit_code == 0, result.output
    parity = re.findall(
        r"parity onnx batch \d+.*: max abs diff (\S+) \(logits\), top-1 agreement ([\d.]+)%", result.output
    )
    assert len(parity) == 2 and all(float(diff) <= 1e-4 and agreement == "100.0" for diff, agreement in parity)


# --- the catalogue ----------------------------------------------------------------------------------


def test_models_lists_timm_tags_and_parameter_counts(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    result = cli.invoke(app, ["models", "timm/test_vi*", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(row["model"], row["weights"]): row for row in json.loads(result.stdout)}
    vit = rows[("timm/test_vit", "r160_in1k")]
    assert vit["default"] and vit["image_size"] == 160 and vit["family"] == "VisionTransformer" and vit["stages"]
    assert vit["num_params"] == sum(p.numel() for p in timm.create_model("test_vit", num_classes=0).parameters())
    assert rows[("timm/test_vit4", "none")]["default"] is False  # an architecture without pretrained weights
    assert vit["acc1"] is None and vit["gflops"] is None  # not in timm's wheel: not invented
    table = cli.invoke(app, ["models", "timm/test_vit"])
    assert table.exit_code == 0 and "timm's wheel ships no GFLOPS or ImageNet accuracy" in table.stdout
    assert re.search(r"timm/test_vit\s+r160_in1k \*\s+0\.3M\s+160\s+VisionTransformer\s+yes\s+yes", table.stdout)
    assert {e.model for e in catalog("resnet1*")} == {"resnet101", "resnet152", "resnet18"}  # torchvision's, as before
    unknown = cli.invoke(app, ["models", "timm/convnxt_atto"])
    assert unknown.exit_code == 2 and "did you mean timm/convnext_atto" in unknown.stderr


@pytest.mark.parametrize("backbone", ["timm/test_convnext", "timm/test_vit"])
def test_cotuning_keeps_timms_pretrained_classifier_as_its_source_head(backbone: str, tmp_path: Path) -> None:
    """Co-Tuning on a timm backbone: the weights' own classifier is the source head, and on the backbone's
    features (timm's pre-logits) it gives the pretrained model's logits; without a classifier, one line."""
    source = timm.create_model(backbone.removeprefix("timm/"), pretrained=False, num_classes=7)
    torch.nn.init.normal_(source.get_classifier().weight)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    cfg = load_config(None, [f"model.backbone={backbone}", f"model.weights={path}", "data.image_size=32",
                             "data.resize_size=32"], names=BACKBONE_NAMES)  # fmt: skip
    result = build_model(cfg.model, cfg.data, 3, keep_source_head=True)
    head = result.source_head
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    assert torch.equal(head.weight, source.get_classifier().weight)
    assert not any(p is q for p in result.model.parameters() for q in head.parameters())
    source.eval(), result.model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(result.model.backbone(images)), source(images), rtol=1e-4, atol=1e-5)
    for weights, message in (("none", "model.weights is none"),):
        cfg = load_config(None, [f"model.backbone={backbone}", f"model.weights={weights}", "data.image_size=32"],
                          names=BACKBONE_NAMES)  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            build_model(cfg.model, cfg.data, 3, keep_source_head=True)
    headless = timm.create_model(backbone.removeprefix("timm/"), pretrained=False, num_classes=0)
    torch.save(headless.state_dict(), tmp_path / "headless.pth")
    cfg = load_config(None, [f"model.backbone={backbone}", f"model.weights={tmp_path / 'headless.pth'}",
                             "data.image_size=32"], names=BACKBONE_NAMES)  # fmt: skip
    with pytest.raises(ConfigError, match="the file has no classifier"):
        build_model(cfg.model, cfg.data, 3, keep_source_head=True)


def test_a_cotuning_run_on_a_timm_backbone_trains(tmp_path: Path, dataset: Path) -> None:
    source = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    overrides = run_overrides(tmp_path / "run", dataset, "model.backbone=timm/test_resnet",
                              f"model.weights={tmp_path / 'w.pth'}", "train.freeze=none", "train.cotuning_weight=2",
                              "data.image_size=32")  # fmt: skip
    summary = finetune(load_config(None, overrides, names=BACKBONE_NAMES), quiet=True)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["loss_terms"]) == {"ce", "cotuning"} and math.isfinite(record["loss_terms"]["cotuning"])
    assert summary["final"]["val_acc1"] is not None
