"""timm backbones: `model.backbone: timm/<name>` (e.g. `timm/convnext_atto`, `timm/vit_tiny_patch16_224.augreg_in21k`).

timm is an optional extra (`pip install 'tltool[timm]'`) and is imported only here, only when a backbone or
a `tltool models` pattern starts with `timm/` (importing it costs seconds). The model keeps TransferModel's
contract: `.backbone` is the timm network with its classifier removed (`num_classes=0`, so its forward is
timm's `forward_features` + `forward_head(pre_logits=True)`: the pooled, normed features), `.head` is
tltool's own dropout + Linear. Freezing, the feature cache, exports and resume need nothing else.

Everything comes from timm's own records: the names (`timm.list_models`, `list_pretrained`), the
preprocessing (`timm.data.resolve_data_config` of the weights' `pretrained_cfg`), the loading of weights
(timm's `load_pretrained` with the weights' filter, e.g. a ViT's position embedding resampled to
`data.image_size`), and the stages (`stages.py`, from the model's `group_matcher`).

Pretrained weights (`model.weights: DEFAULT`, the backbone's tag or timm's default tag) are read from the local
caches: the Hugging Face hub cache (`$HF_HOME/hub/models--timm--<name>.<tag>/...`), then the torch hub cache
(timm's older release URLs); absent from both, downloaded into the Hugging Face cache when online. Offline,
the error names the repository and the command that puts the file there.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from tltool.checkpoint import Checkpoint, as_checkpoint, is_tltool_checkpoint, safe_load, state_dict_mismatch
from tltool.config import DataConfig, ModelConfig, weights_is_file
from tltool.data import Preprocess
from tltool.errors import CheckpointError, ConfigError, ModelError
from tltool.models import BuiltModel, TransferModel, hub_file, make_head

PREFIX = "timm/"
INSTALL = "pip install 'tltool[timm]'"
# The files a timm repository on the Hugging Face hub holds its weights in, the safe format first (as timm reads).
_HF_FILES = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def is_timm(backbone: str) -> bool:
    return backbone.startswith(PREFIX)


def timm_name(backbone: str) -> str:
    """`timm/convnext_atto.d2_in1k` -> `convnext_atto.d2_in1k` (timm's own name, with its tag if given)."""
    return backbone.removeprefix(PREFIX)


def import_timm() -> Any:
    """The timm module, or a one-line ModelError with the install command."""
    try:
        import timm
        import timm.data
        import timm.models
    except ImportError:
        raise ModelError("timm backbones need the timm package, which is not installed", INSTALL) from None
    return timm


# --- names ------------------------------------------------------------------------------------------


def backbone_problem(backbone: str) -> str | None:
    """Why `timm/<name>[.tag]` is not a timm model (with timm's closest names), or None."""
    try:
        timm = import_timm()
    except ModelError:
        return f"timm is not installed; {INSTALL}"
    name = timm_name(backbone)
    arch, _, tag = name.partition(".")
    if arch in timm.list_models() and (not tag or name in timm.list_pretrained(arch + ".*")):
        return None
    if arch in timm.list_models():
        tags = [n.partition(".")[2] for n in timm.list_pretrained(arch + ".*")]
        return f"timm has no pretrained tag {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'}"
    candidates = timm.list_models() + timm.list_pretrained()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "see `tltool models 'timm/*'`"
    return f"unknown timm model; {hint}"


def weights_problem(backbone: str, weights: str) -> str | None:
    """Why `model.weights` is wrong for a timm backbone (DEFAULT without pretrained weights, a torchvision name)."""
    if weights == "DEFAULT":
        timm = import_timm()
        if not timm.models.is_model_pretrained(timm_name(backbone)):
            return f"{backbone} has no pretrained weights in timm; set model.weights: none"
        return None
    return (
        "a timm backbone takes none, DEFAULT (its tag's weights: choose the tag in the name, "
        f"e.g. {PREFIX}vit_tiny_patch16_224.augreg_in21k), or a path to a .pt/.pth/.safetensors file"
    )


# --- preprocessing ----------------------------------------------------------------------------------


def pretrained_cfg(backbone: str) -> dict[str, Any]:
    """timm's pretrained_cfg of the backbone's tag (timm's default tag when the name has none)."""
    timm = import_timm()
    cfg = timm.models.get_pretrained_cfg(timm_name(backbone))
    if cfg is None:
        raise ModelError(f"timm has no config for {backbone}", "check model.backbone with `tltool models 'timm/*'`")
    return cfg.to_dict()


def preset(backbone: str) -> tuple[Preprocess, list[str]]:
    """The weights' preprocessing from `timm.data.resolve_data_config`, and notes on what tltool cannot copy.

    timm's eval transform resizes the shorter side to floor(size / crop_pct) and centre-crops `size`, which
    is tltool's eval transform with resize_size = floor(image_size / crop_pct).
    """
    timm = import_timm()
    data = timm.data.resolve_data_config({}, pretrained_cfg=pretrained_cfg(backbone))
    notes = []
    _, height, width = data["input_size"]
    if height != width:
        notes.append(f"{backbone} was trained at {height}x{width}; tltool feeds square {height}px crops")
    interpolation = data["interpolation"]
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        notes.append(f"{backbone}'s {interpolation!r} interpolation is replaced by bicubic")
        interpolation = "bicubic"
    if data.get("crop_mode", "center") != "center":
        notes.append(f"{backbone}'s crop mode {data['crop_mode']!r} is replaced by a centre crop")
    size = int(height)
    preprocess = Preprocess(
        image_size=size,
        resize_size=math.floor(size / float(data["crop_pct"])),
        mean=tuple(float(x) for x in data["mean"]),
        std=tuple(float(x) for x in data["std"]),
        interpolation=interpolation,
    )
    return preprocess, notes


# --- weights ----------------------------------------------------------------------------------------


def _hf_cached(repo: str, filename: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    names = [filename] if filename else list(_HF_FILES)
    for name in list(names):
        if name in _HF_FILES:
            names.insert(names.index(name), _HF_FILES[name])
    for name in names:
        found = try_to_load_from_cache(repo_id, name, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    return None


def _hf_download(repo: str, filename: str | None) -> tuple[Path | None, str]:
    """`repo`'s weights file downloaded into the Hugging Face cache, or None and why not.

    Offline is found at once: HF_HUB_OFFLINE, or the endpoint's host name does not resolve (huggingface_hub
    itself would retry for about 20 s before failing).
    """
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        return None, "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return None, f"{host} does not resolve: offline? ({exc.strerror or exc})"
    repo_id, _, revision = repo.partition("@")
    name = filename or "model.safetensors"  # (timm's repositories hold model.safetensors unless they say)
    try:
        return Path(hf_hub_download(repo_id, name, revision=revision or None)), ""
    except Exception as exc:  # huggingface_hub's errors: HTTP, missing file, disk; all mean "not here"
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def cached_weights(backbone: str) -> tuple[Path, bool]:
    """The local file of the backbone's pretrained weights, and whether timm's own loader must read it.

    Hugging Face hub cache first (the repository `pretrained_cfg["hf_hub_id"]`), then the torch hub cache
    (the file of `pretrained_cfg["url"]`); absent from both, a repository is downloaded into the Hugging Face
    cache as torchvision's weights are into torch's (timm's own `pretrained=True` does the same). Offline
    (HF_HUB_OFFLINE, or the hub's host does not resolve) or failing, a ModelError says where to put the file.
    """
    cfg = pretrained_cfg(backbone)
    repo, url = cfg.get("hf_hub_id"), cfg.get("url")
    if repo:
        found = _hf_cached(repo, cfg.get("hf_hub_filename"))
        if found is not None:
            return found, False
    if url:
        path = hub_file(url)
        if path.exists():
            return path, bool(cfg.get("custom_load"))  # (e.g. a ViT's .npz release: timm's converter reads it)
    if repo:
        from huggingface_hub import constants

        downloaded, reason = _hf_download(repo, cfg.get("hf_hub_filename"))
        if downloaded is not None:
            return downloaded, False
        where = f"cannot download {repo} ({reason}) and it is not in the local cache {constants.HF_HUB_CACHE}"
        fix = (
            f"run `hf download {repo}` where there is internet and copy that cache here (HF_HOME), "
            "or set model.weights=none"
        )
    elif url:
        where = f"the weights file {hub_file(url).name} is not in the torch hub cache"
        fix = f"put {url} at {hub_file(url)} (offline: copy it from a machine with internet), or set model.weights=none"
    else:
        raise ModelError(f"{backbone} has no pretrained weights in timm", "set model.weights=none")
    raise ModelError(f"{backbone}: {where}", fix)


def _state_dict_of(loaded: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a plain state_dict or one under state_dict/model/model_state_dict."""
    state_dict = loaded
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelError(
            f"{path} holds no state_dict of tensors", "save the weights with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _file_classes(state_dict: dict[str, torch.Tensor], cfg: dict[str, Any]) -> int:
    """How many classes the file's own classifier has (0: the file holds no classifier)."""
    classifier = cfg.get("classifier")
    first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    weight = state_dict.get(f"{first}.weight") if first else None
    return int(weight.shape[0]) if weight is not None else 0


# --- building ---------------------------------------------------------------------------------------


def _size_kwargs(backbone: str, cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """`img_size` for a family whose architecture fixes its input size (ViT, Swin, MaxViT, ...), when it differs."""
    if cfg.get("fixed_input_size") and int(cfg["input_size"][-1]) != image_size:
        return {"img_size": image_size}
    return {}


def create(backbone: str, kwargs: dict[str, Any], num_classes: int = 0, **load: Any) -> nn.Module:
    """`timm.create_model` with the constructor errors (an input size the family cannot take) as one line."""
    timm = import_timm()
    try:
        return timm.create_model(timm_name(backbone), num_classes=num_classes, **kwargs, **load)
    except TypeError as exc:
        if "img_size" in kwargs and "img_size" in str(exc):
            size = pretrained_cfg(backbone)["input_size"][-1]
            raise ConfigError(
                f"{backbone} takes {size}px inputs only (its constructor has no img_size)",
                f"set data.image_size={size}",
            ) from None
        raise


def _load_pretrained(
    backbone: str, kwargs: dict[str, Any], path: Path, state_dict: dict | None, custom: bool
) -> tuple[nn.Module, nn.Module]:
    """The timm network with the file's weights, loaded strictly by timm (its filter, e.g. a resampled pos_embed),
    and the file's own classifier taken off it (`get_classifier()`; Co-Tuning's source head).

    The network is built with the file's own classifier (as many classes as the file has, 0 without one), so
    timm loads strictly, then the classifier is removed: a file of another architecture fails here.
    """
    cfg = pretrained_cfg(backbone)
    if state_dict is not None:
        classes = _file_classes(state_dict, cfg)
        overlay = {"state_dict": state_dict, "num_classes": classes, "custom_load": False}
    else:  # a release that only timm's converter reads (custom_load): its classifier is the tag's own
        classes = int(cfg.get("num_classes") or 0)
        overlay = {"file": str(path)}
    try:
        net = create(backbone, kwargs, classes, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        reason = _key_difference(create(backbone, kwargs, classes), state_dict) if state_dict is not None else None
        reason = reason or " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ModelError(
            f"{path} does not fit {backbone}: {reason}", "check model.backbone matches the weights file"
        ) from None
    classifier = copy.deepcopy(net.get_classifier())
    net.reset_classifier(0)
    return net, classifier


def _key_difference(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> str | None:
    """What a file lacks and has too many of, against the network's keys (None when the keys are the same)."""
    expected = set(net.state_dict())
    parts = []
    for label, keys in (("missing", expected - set(state_dict)), ("unexpected", set(state_dict) - expected)):
        keys = sorted(k for k in keys if not k.endswith("num_batches_tracked"))
        if keys:
            parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    return "; ".join(parts) or None


def _feature_size(net: nn.Module, backbone: str, image_size: int) -> int:
    """The backbone's feature width, from one eval-mode forward of a blank image (a too-small input fails here)."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{backbone} cannot take {image_size}px inputs ({first})",
            "set data.image_size to a size the family takes (e.g. a multiple of its patch or window size)",
        ) from None
    finally:
        net.train(was_training)
    if out.ndim != 2:
        raise ModelError(f"{backbone} returns {tuple(out.shape)} features, not one vector per image", "report this")
    return int(out.shape[1])


def build_model(
    cfg: ModelConfig,
    data_cfg: DataConfig,
    num_classes: int,
    class_names: list[str] | None,
    keep_source_head: bool = False,
) -> BuiltModel:
    """`models.build_model` for a `timm/` backbone: the same weights sources, the same BuiltModel.

    `keep_source_head` (Co-Tuning): the weights' own classifier becomes `BuiltModel.source_head`; it takes the
    features the backbone gives (timm's pre-logits), as the pretrained model did."""
    import_timm()
    problem = backbone_problem(cfg.backbone)
    if problem is not None:
        raise ConfigError(f"model.backbone {cfg.backbone}: {problem}", "see `tltool models 'timm/*'`")
    weights = cfg.weights
    notes: list[str] = []
    source_ckpt: Checkpoint | None = None
    file_state: dict[str, torch.Tensor] | None = None
    pretrained: tuple[Path, bool] | None = None
    if weights_is_file(weights):
        loaded = safe_load(weights, what="model.weights file")
        if is_tltool_checkpoint(loaded):
            source_ckpt = as_checkpoint(loaded, weights)
            if source_ckpt.arch["backbone"] != cfg.backbone:
                raise CheckpointError(
                    f"{weights} is a {source_ckpt.arch['backbone']} checkpoint but model.backbone is {cfg.backbone}",
                    f"set model.backbone={source_ckpt.arch['backbone']}",
                )
        else:
            file_state = _state_dict_of(loaded, weights)
            pretrained = (Path(weights), False)
    elif weights.lower() != "none":
        problem = weights_problem(cfg.backbone, weights)
        if problem is not None:
            raise ConfigError(f"model.weights {weights}: {problem}", "set model.weights: DEFAULT or none")
        pretrained = cached_weights(cfg.backbone)
        if not pretrained[1]:
            file_state = _state_dict_of(safe_load(pretrained[0], what="timm weights file"), str(pretrained[0]))

    if source_ckpt is not None:
        base = Preprocess.from_dict(source_ckpt.preprocess)
        weights_source = f"tltool checkpoint {weights}"
    else:
        base, preset_notes = preset(cfg.backbone)
        notes += preset_notes
        if weights_is_file(weights):
            weights_source = weights
        elif pretrained is not None:
            tag = pretrained_cfg(cfg.backbone).get("tag")
            weights_source = f"timm {timm_name(cfg.backbone).partition('.')[0]}.{tag} ({pretrained[0]})"
        else:
            weights_source = "none (random init)"
    preprocess = base.with_config(data_cfg)
    if source_ckpt is not None:
        kwargs = dict(source_ckpt.arch["kwargs"])
    else:
        kwargs = _size_kwargs(cfg.backbone, pretrained_cfg(cfg.backbone), preprocess.image_size)
    classifier = None
    if pretrained is not None:
        net, classifier = _load_pretrained(cfg.backbone, kwargs, pretrained[0], file_state, pretrained[1])
        if weights_is_file(weights):
            notes.append(f"loaded backbone weights from {weights}")
    else:
        net = create(cfg.backbone, kwargs)
    source_head = _source_head(cfg, classifier, source_ckpt) if keep_source_head else None
    in_features = _feature_size(net, cfg.backbone, preprocess.image_size)
    model = TransferModel(net, make_head(in_features, num_classes, cfg.head_dropout))

    if source_ckpt is not None:
        notes += _reuse_checkpoint(model, source_ckpt, weights, class_names, num_classes)
    arch = {
        "backbone": cfg.backbone,
        "kwargs": kwargs,
        "num_classes": num_classes,
        "head_dropout": cfg.head_dropout,
        "in_features": in_features,
    }
    return BuiltModel(model, arch, preprocess, weights_source, notes, source_head)


def _source_head(cfg: ModelConfig, classifier: nn.Module | None, source_ckpt: Checkpoint | None) -> nn.Linear:
    """The pretrained classifier Co-Tuning needs, or a ConfigError saying why there is none."""
    need, fix = "train.cotuning_weight needs the pretrained classifier", "or set train.cotuning_weight=0"
    if source_ckpt is not None:
        raise ConfigError(
            f"{need}, but model.weights {cfg.weights} is a tltool checkpoint, which keeps only its own head",
            f"set model.weights to the backbone's pretrained weights (DEFAULT) {fix}",
        )
    if classifier is None:
        raise ConfigError(f"{need}, but model.weights is none", f"set model.weights (e.g. DEFAULT) {fix}")
    if not isinstance(classifier, nn.Linear):
        what = "none (the file has no classifier)" if isinstance(classifier, nn.Identity) else type(classifier).__name__
        raise ConfigError(
            f"{need}, but {cfg.backbone}'s is {what}, not a Linear layer",
            f"give weights with their classifier, or a backbone whose classifier is a Linear layer {fix}",
        )
    return classifier


def _reuse_checkpoint(
    model: TransferModel, source: Checkpoint, path: str, class_names: list[str] | None, num_classes: int
) -> list[str]:
    """A tltool checkpoint as model.weights: its backbone, and its head too when the classes are the same."""
    backbone = {k.removeprefix("backbone."): v for k, v in source.model.items() if k.startswith("backbone.")}
    mismatch = state_dict_mismatch(model.backbone.state_dict(), backbone, path)
    if mismatch is not None:
        raise CheckpointError(f"{path} does not fit this backbone: {mismatch}", "check model.backbone")
    model.backbone.load_state_dict(backbone)
    if class_names is not None and list(source.class_names) == list(class_names):
        model.head.load_state_dict(
            {k.removeprefix("head."): v for k, v in source.model.items() if k.startswith("head.")}
        )
        return [f"reused backbone and head of {path} (same classes)"]
    return [f"reused backbone of {path}; new head for {num_classes} classes"]


def model_from_arch(arch: dict[str, Any]) -> TransferModel:
    """An untrained TransferModel of a timm architecture a checkpoint records (no weights are read)."""
    if backbone_problem(arch["backbone"]) is not None:
        raise CheckpointError(
            f"the checkpoint's backbone {arch['backbone']} is not in this timm ({import_timm().__version__})",
            "install the timm version that trained it",
        )
    net = create(arch["backbone"], dict(arch["kwargs"]))
    return TransferModel(net, make_head(arch["in_features"], arch["num_classes"], arch["head_dropout"]))


# --- the catalogue ----------------------------------------------------------------------------------


def catalog_rows(pattern: str, count_limit: int = 60) -> list[dict[str, Any]]:
    """One row per (timm architecture, pretrained tag) matching `pattern` (after `timm/`), sorted by name.

    Parameters are counted by building the architecture on the meta device (no memory, no init), for at most
    `count_limit` architectures (a wider pattern lists the names without counts). timm's wheel ships no
    ImageNet results, so accuracy is not listed.
    """
    timm = import_timm()
    wanted = timm_name(pattern).lower() or "*"
    names = timm.list_models()
    if any(char in wanted for char in "*?["):
        archs = [n for n in names if fnmatch.fnmatchcase(n, wanted.partition(".")[0])]
    else:
        archs = [n for n in names if wanted.partition(".")[0] in n]
    if not archs:
        close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "try `tltool models 'timm/*'`"
        raise ModelError(f"no timm model matches {pattern!r}", hint)
    count = len(archs) <= count_limit
    rows = []
    for arch in archs:
        params, family, stages = None, "-", False
        if count:
            try:
                with torch.device("meta"):
                    net = timm.create_model(arch, num_classes=0)
                params = sum(p.numel() for p in net.parameters())
                family, stages = type(net).__name__, callable(getattr(net, "group_matcher", None))
            except Exception:  # noqa: BLE001 - an architecture that cannot build on meta is listed without counts
                pass
        tags = timm.list_pretrained(arch + ".*")
        default = timm.models.get_pretrained_cfg(arch)
        default_tag = default.tag if default is not None and timm.models.is_model_pretrained(arch) else None
        for name in tags or [arch]:
            cfg = timm.models.get_pretrained_cfg(name) if tags else default
            tag = name.partition(".")[2] if tags else "none"
            if "." in wanted and not fnmatch.fnmatchcase(name, wanted) and wanted not in name:
                continue
            rows.append(
                {
                    "model": PREFIX + arch,
                    "family": family,
                    "weights": tag,
                    "default": tag == default_tag,
                    "num_params": params,
                    "image_size": int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else None,
                    "stages": stages,
                }
            )
    return rows
