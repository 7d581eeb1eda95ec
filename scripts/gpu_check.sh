#!/usr/bin/env bash
# Issue #18 part 4: tltool's CUDA paths on a lent GPU machine, in one call (never on CI; see ARCHITECTURE.md).
#
# The device machine's python3 holds PyTorch with CUDA, torchvision, typer, pyyaml, tqdm, safetensors, timm,
# onnxruntime, torchmetrics and pytest, but not pydantic and nothing can be fetched there. Prepare its wheels
# here once (the folder is ignored by git; the device tool carries it):
#   echo /.whl/ >> .git/info/exclude
#   for p in pydantic pydantic-core annotated-types typing-inspection; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"; done
# then run it with the device tool: command `bash scripts/gpu_check.sh`, carry [".whl"], timeout_s 540.
# What it writes under $OUT comes back: nvidia-smi.txt, test_cuda.log, gpu_facts.json.
# Not yet run on a GPU (no task so far was lent one): expect to fix details on its first run.
set -uo pipefail
OUT=${OUT:-/tmp/tltool-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TLTOOL_CACHE_DIR=/tmp/tltool-cache
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, torchvision, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
# The CUDA tests (AMP bf16/fp16, pinned memory, checkpoints portable to CPU, predict on CUDA, NCCL where 2 GPUs).
timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda tests 2>&1 | tee "$OUT/test_cuda.log"
# Frozen-feature extraction on the GPU against the backbone's in-memory speed (issue #18 part 2), fp32 and bf16.
timeout 180 python3 - <<'PY' 2>&1 | tee -a "$OUT/test_cuda.log"
import json, os, tempfile, time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tltool.data import Preprocess, eval_transform, make_loader, scan_folder
from tltool.features import extract
from tltool.models import build_model
from tltool.config import DataConfig, ModelConfig

device = torch.device("cuda")
facts = {"device": torch.cuda.get_device_name(0)}
with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    for c in range(10):
        (Path(tmp) / f"c{c}").mkdir()
        for i in range(200):
            pixels = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(tmp) / f"c{c}" / f"{i}.jpg", quality=90)
    _, samples = scan_folder(Path(tmp))
    built = build_model(ModelConfig(backbone="resnet50", weights="none"), DataConfig(image_size=224), 10)
    backbone = built.model.backbone.to(device).eval().to(memory_format=torch.channels_last)
    transform = eval_transform(Preprocess(224, 256))
    for precision in ("fp32", "bf16"):
        loader = make_loader(samples, transform, 64, "auto", seed=0, shuffle=False, pin_memory=True)
        extract(backbone, loader, device, precision)  # (warm-up: workers, cuDNN autotuning)
        torch.cuda.synchronize(); start = time.perf_counter()
        extract(backbone, loader, device, precision)
        torch.cuda.synchronize(); files = len(samples) / (time.perf_counter() - start)
        batches = [x.to(device).contiguous(memory_format=torch.channels_last) for x, _ in loader][:10]
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=precision == "bf16"):
            backbone(batches[0]); torch.cuda.synchronize(); start = time.perf_counter()
            for x in batches:
                backbone(x)
            torch.cuda.synchronize()
        memory = sum(len(x) for x in batches) / (time.perf_counter() - start)
        facts[precision] = {"from_files_img_s": files, "in_memory_img_s": memory, "fraction": files / memory,
                            "workers": loader.num_workers}
        print(precision, facts[precision], flush=True)
(Path(os.environ["OUT"]) if "OUT" in os.environ else Path("/tmp/tltool-gpu")).joinpath("gpu_facts.json").write_text(
    json.dumps(facts, indent=2))
PY
