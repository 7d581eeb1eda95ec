"""The output formats of `tltool export`, by name: how each is written, loaded, and what it needs installed."""

from __future__ import annotations

from tltool.export.onnx import load_onnx, write_onnx
from tltool.export.program import load_program, write_program
from tltool.export.safetensors import load_safetensors, write_safetensors
from tltool.export.spec import Exporter
from tltool.export.torchscript import load_torchscript, write_torchscript

EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter(".onnx", write_onnx, load_onnx, ("onnx", "onnxscript"), ("onnxruntime",)),
    "torchscript": Exporter(".torchscript.pt", write_torchscript, load_torchscript),
    "exported-program": Exporter(".pt2", write_program, load_program),
    "safetensors": Exporter(
        ".safetensors", write_safetensors, load_safetensors, ("safetensors",), ("safetensors",), is_graph=False
    ),
}
