"""safetensors: the model's weights (no code, no pickle) with config, classes and preprocessing as metadata.

The header's string metadata holds `tltool` (the full metadata), `config`, `class_names`, `preprocess` and
`arch` as JSON, and `tltool_version`; `arch` is what `tltool.models.model_from_arch` rebuilds the
network from, so the file alone is enough to run the model (`tltool predict` does). The weights must be
finite: a file with NaN/inf weights is refused rather than shipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tltool import __version__
from tltool.errors import CheckpointError, ExportError
from tltool.export.spec import METADATA_KEY, Echo, ExportJob, ExportSpec, LoadedModel, first_line


def _tensors(job: ExportJob) -> dict[str, torch.Tensor]:
    """The state_dict as contiguous CPU tensors, refusing non-finite weights (they would only ship NaNs)."""
    tensors = {name: value.detach().cpu().contiguous() for name, value in job.model.state_dict().items()}
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ExportError(
            f"the checkpoint has non-finite (NaN/inf) weights in {len(bad)} tensor(s): {shown}",
            "export an earlier checkpoint (e.g. best.pt) or retrain with a lower train.lr",
        )
    return tensors


def write_safetensors(job: ExportJob, spec: ExportSpec, path: Path, echo: Echo) -> None:
    """Write the weights and the metadata strings safetensors' header holds."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",  # the key Hugging Face tools read to know the tensors are PyTorch's
        METADATA_KEY: json.dumps(spec.metadata()),
        "config": json.dumps(job.config, default=str),
        "class_names": json.dumps(list(spec.class_names)),
        "preprocess": json.dumps(spec.preprocess.to_dict()),
        "arch": json.dumps(job.arch, default=list),
        "tltool_version": __version__,
    }
    save_file(_tensors(job), str(path), metadata=metadata)


def _header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a broken header
        raise ExportError(f"{path} is not a valid safetensors file ({first_line(exc)})", "use an intact copy") from None


def load_safetensors(path: Path, device: torch.device, echo: Echo) -> LoadedModel:
    """Rebuild the network from the `arch` metadata, load the weights, and run it eagerly on `device`."""
    from safetensors.torch import load_file

    from tltool.models import model_from_arch

    header = _header(path)
    if "arch" not in header:
        raise ExportError(f"{path} has no tltool arch metadata", "export it with tltool export --format safetensors")
    # Built on the meta device and then given the file's tensors: random initialisation of a network
    # whose every weight is about to be replaced would only cost time (seconds for the large ones).
    with torch.device("meta"):
        model = model_from_arch(json.loads(header["arch"]))
    try:
        model.load_state_dict(load_file(str(path)), assign=True)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: the weights do not fit its arch ({first_line(exc)})", "re-export it") from None
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path} lacks tensors its arch needs ({', '.join(left[:3])})", "re-export it")
    model = model.eval().to(device)
    metadata = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else None
    if metadata and metadata.get("temperature") is not None:  # a calibrated checkpoint's T (calibration.py)
        model.temperature = float(metadata["temperature"])

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(images.to(device)).cpu()

    return LoadedModel(run, metadata, str(device))
