"""TorchScript: `torch.jit.script` (every code path kept; `jit.trace` as the fallback), metadata as extra files.

The extra files are `tltool.json` (the full metadata), `class_names.json` and `preprocess.json`. PyTorch
marks TorchScript deprecated in favour of torch.export; it is kept because C++ (libtorch) and older
runtimes still load it, and it takes any input size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tltool.errors import ExportError
from tltool.export.spec import METADATA_FILE, Echo, ExportJob, ExportSpec, LoadedModel, first_line, quiet_exporters


def _script(model: nn.Module, example: torch.Tensor, echo: Echo) -> torch.jit.ScriptModule:
    """torch.jit.script (keeps every code path); torch.jit.trace for a model that cannot be scripted."""
    try:
        return torch.jit.script(model)
    except Exception as exc:  # TorchScript's frontend raises many error types
        echo(f"note: torch.jit.script failed ({first_line(exc)}); tracing instead")
    try:
        return torch.jit.trace(model, example)
    except Exception as exc:
        raise ExportError(
            f"cannot export {type(model).__name__} to TorchScript: {first_line(exc)}", "try --format onnx"
        ) from None


def metadata_files(spec: ExportSpec) -> dict[str, str]:
    """The extra files TorchScript and ExportedProgram archives carry."""
    return {
        METADATA_FILE: json.dumps(spec.metadata()),
        "class_names.json": json.dumps(list(spec.class_names)),
        "preprocess.json": json.dumps(spec.preprocess.to_dict()),
    }


def write_torchscript(job: ExportJob, spec: ExportSpec, path: Path, echo: Echo) -> None:
    """Write the job's graph as TorchScript with the metadata as extra files."""
    with quiet_exporters():
        scripted = _script(job.graph(), spec.example(), echo)
        torch.jit.save(scripted, str(path), _extra_files=metadata_files(spec))


def load_torchscript(path: Path, device: torch.device, echo: Echo) -> LoadedModel:
    """Load a TorchScript file with torch.jit.load onto `device`, as a deployment would."""
    extra = {METADATA_FILE: ""}
    try:
        with quiet_exporters():
            loaded = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch.jit.load raises RuntimeError and friends for a broken archive
        raise ExportError(f"{path} is not a valid TorchScript file ({first_line(exc)})", "use an intact copy") from None
    loaded.eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), quiet_exporters():
            return loaded(images.to(device)).cpu()

    return LoadedModel(run, json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else None, str(device))
