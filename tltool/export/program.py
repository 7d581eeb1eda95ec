"""ExportedProgram: the `torch.export` graph saved with `torch.export.save` as a `.pt2` archive.

This is PyTorch's current deployment format (AOTInductor, ExecuTorch and torch.export.load read it);
the batch axis is dynamic and, with `--dynamic-size`, height and width too. The metadata travels as
the extra files `tltool.json`, `class_names.json` and `preprocess.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tltool.errors import ExportError
from tltool.export.spec import METADATA_FILE, Echo, ExportJob, ExportSpec, LoadedModel, first_line, quiet_exporters
from tltool.export.torchscript import metadata_files


def write_program(job: ExportJob, spec: ExportSpec, path: Path, echo: Echo) -> None:
    """Save the job's ExportedProgram with the metadata as extra files."""
    try:
        program = job.program()
    except Exception as exc:  # torch.export's many error types: one line, and what else to try
        raise ExportError(
            f"torch.export cannot take {spec.backbone}: {first_line(exc)}", "try --format torchscript or onnx"
        ) from None
    with quiet_exporters():
        torch.export.save(program, str(path), extra_files=metadata_files(spec))


def load_program(path: Path, device: torch.device, echo: Echo) -> LoadedModel:
    """torch.export.load a `.pt2` file (with its extra files) and run its module on `device`."""
    extra = {METADATA_FILE: ""}
    try:
        with quiet_exporters():
            program = torch.export.load(str(path), extra_files=extra)
            if device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
    except Exception as exc:  # a broken or foreign archive
        raise ExportError(f"{path} is not a valid ExportedProgram ({first_line(exc)})", "use an intact copy") from None
    module = program.module()

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(images.to(device)).cpu()

    return LoadedModel(run, json.loads(extra[METADATA_FILE]) if extra[METADATA_FILE] else None, str(device))
