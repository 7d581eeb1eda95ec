"""ONNX: one self-contained file (weights inside), opset pinned, named dynamic axes, tltool metadata_props.

The graph's input is `images` and its output `logits` (or `probabilities` with `--softmax`); the batch
axis is called `batch` and, with `--dynamic-size`, the spatial axes `height` and `width`. The file is
made from the ExportedProgram that torch.export traced (the exporter's default path since torch 2.9); a
model torch.export cannot take goes through the TorchScript-based exporter instead.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import torch

from tltool import __version__
from tltool.errors import ExportError
from tltool.export.spec import (
    INPUT_NAME,
    METADATA_KEY,
    ONNX_OPSET,
    Echo,
    ExportJob,
    ExportSpec,
    LoadedModel,
    first_line,
    quiet_exporters,
)

# A single ONNX file is a protobuf, which cannot exceed 2 GiB; leave room for the graph itself.
ONNX_MAX_WEIGHT_BYTES = 2**31 - 64 * 2**20


def _proto_dynamo(job: ExportJob, spec: ExportSpec) -> Any:
    """ONNX translated from the job's ExportedProgram (its dynamic axes come with it)."""
    program = torch.onnx.export(
        job.program(),
        (spec.example(),),
        None,
        input_names=[INPUT_NAME],
        output_names=[spec.output_name],
        opset_version=ONNX_OPSET,
        dynamo=True,
        verbose=False,
    )
    return program.model_proto


def _proto_legacy(job: ExportJob, spec: ExportSpec) -> Any:
    """ONNX through the TorchScript-based exporter: the fallback for models torch.export cannot take."""
    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(
        job.graph(),
        (spec.example(),),
        buffer,
        input_names=[INPUT_NAME],
        output_names=[spec.output_name],
        opset_version=ONNX_OPSET,
        dynamo=False,
        dynamic_axes={INPUT_NAME: spec.dimension_names(), spec.output_name: {0: "batch"}},
    )
    return onnx.load_from_string(buffer.getvalue())


def _name_dimensions(proto: Any, spec: ExportSpec) -> None:
    """Give the input's symbolic axes the documented names (`batch`, `height`, `width`) everywhere.

    torch.export calls them s34, s14, ...; every shape in the graph that mentions such a symbol (an
    intermediate `((s14 - 1)//2) + 1`, the output's batch axis) is rewritten with the same name.
    """
    graph = proto.graph
    renames: dict[str, str] = {}
    dims = graph.input[0].type.tensor_type.shape.dim
    for index, name in spec.dimension_names().items():
        symbol = dims[index].dim_param
        if symbol and symbol != name:
            renames[symbol] = name
    if renames:
        pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in renames) + r")\b")
        for value in [*graph.input, *graph.output, *graph.value_info]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: renames[m.group(1)], dim.dim_param)
    output_batch = graph.output[0].type.tensor_type.shape.dim[0]
    if not output_batch.dim_value:
        output_batch.dim_param = "batch"


def set_metadata(proto: Any, spec: ExportSpec) -> None:
    """Add tltool's keys to the model's metadata_props (the full metadata under `tltool`), keeping others."""
    props = {
        METADATA_KEY: json.dumps(spec.metadata()),
        "class_names": json.dumps(list(spec.class_names)),
        "preprocess": json.dumps(spec.preprocess.to_dict()),
        "tltool_version": __version__,
        "backbone": spec.backbone,
        "input": spec.input_description(),
        "output": spec.output_description(),
    }
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"tltool {spec.backbone} classifier. {spec.input_description()}. {spec.output_description()}."


def _weight_bytes(job: ExportJob) -> int:
    return sum(t.numel() * t.element_size() for t in job.model.state_dict().values())


def write_onnx(job: ExportJob, spec: ExportSpec, path: Path, echo: Echo) -> None:
    """Write the job's graph as one self-contained ONNX file with named axes and metadata_props."""
    import onnx

    if _weight_bytes(job) > ONNX_MAX_WEIGHT_BYTES:
        raise ExportError(
            f"the weights ({_weight_bytes(job) / 2**30:.1f} GiB) do not fit in a single ONNX file (2 GiB)",
            "export with --format torchscript or exported-program",
        )
    with quiet_exporters():
        try:
            proto = _proto_dynamo(job, spec)
        except Exception as exc:  # any exporter failure: the legacy exporter may still take the model
            echo(f"note: the torch.export-based ONNX exporter failed ({first_line(exc)}); trying the legacy one")
            try:
                proto = _proto_legacy(job, spec)
            except Exception as legacy_exc:
                raise ExportError(
                    f"cannot export {spec.backbone} to ONNX: {first_line(legacy_exc)}", "try --format torchscript"
                ) from None
    _name_dimensions(proto, spec)
    set_metadata(proto, spec)
    onnx.save(proto, str(path))


def load_onnx(path: Path, device: torch.device, echo: Echo) -> LoadedModel:
    """Run an ONNX file with onnxruntime, as a deployment would (CUDA provider when asked and present).

    The metadata is read through onnxruntime too, so running a file needs no `onnx` package.
    """
    import onnxruntime

    providers: list[Any] = ["CPUExecutionProvider"]
    runs_on = "cpu"
    if device.type == "cuda":
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            runs_on = str(device)
        else:
            echo("note: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu); ONNX runs on CPU")
    options = onnxruntime.SessionOptions()
    # The same number of threads as torch (set_num_threads / OMP_NUM_THREADS): one knob for both, and a
    # benchmark that compares them on equal terms.
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own error types for a broken file
        raise ExportError(f"{path} is not a valid ONNX model ({first_line(exc)})", "use an intact copy") from None
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    props = session.get_modelmeta().custom_metadata_map

    def run(images: torch.Tensor) -> torch.Tensor:
        (output,) = session.run([output_name], {input_name: images.cpu().numpy()})
        return torch.from_numpy(output)

    metadata = json.loads(props[METADATA_KEY]) if METADATA_KEY in props else None
    return LoadedModel(run, metadata, runs_on)
