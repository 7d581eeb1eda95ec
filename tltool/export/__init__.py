"""`tltool export`: deployable files with their classes and preprocessing inside, each proven to match PyTorch.

Formats (`formats.py`): `onnx` (`onnx.py`), `torchscript` (`torchscript.py`), `exported-program`
(torch.export `.pt2`, `program.py`) and `safetensors` (weights + metadata, `safetensors.py`); what each file
carries and how it is called is `spec.py`, the parity proof `parity.py`, the latency report
`benchmark.py`, the calibrated int8 ONNX with its accuracy check `quantize.py`, and the command itself
`run.py`. `tltool predict` (`tltool/predict.py`) reads every format.
"""

from __future__ import annotations

from tltool.export.formats import EXPORTERS
from tltool.export.run import ExportOptions, default_output, run_export
from tltool.export.spec import ExportSpec, sidecar_path

__all__ = ["EXPORTERS", "ExportOptions", "ExportSpec", "default_output", "run_export", "sidecar_path"]
