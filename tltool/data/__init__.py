"""Data: image decoding, ImageFolder scanning and splitting, transforms, samplers and loaders.

One module per responsibility; `from tltool.data import X` names any of their public parts:
- `images`: which files are images, a cheap header check, decoding to RGB;
- `folders`: class folders (or a label file) to samples, the stratified val split, unusable images left out;
- `labelfile`: .csv/.tsv label files (a path column, a label column) read and checked as a dataset;
- `transforms`: `Preprocess` (what the weights and checkpoint carry) and the eval / train transforms;
- `loading`: the dataset, the seeded and resumable epoch samplers, and the DataLoader.
- `shards`: WebDataset tar shards as a dataset (scanned, streamed per rank and worker, resumable), and
  `tltool shard` writing them;
- `mixing`: MixUp / CutMix of a training batch (`BatchMixer`), seeded per batch, applied by the loop.

Nothing here writes into the dataset folder.
"""

from tltool.data.folders import (
    DataSplit,
    Sample,
    image_files,
    scan_data,
    scan_eval_folder,
    scan_folder,
    scan_source,
    stratified_split,
)
from tltool.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, image_problem, is_visible, load_image, to_rgb
from tltool.data.labelfile import LabelFile, data_root, is_label_file, read_label_file, scan_label_file
from tltool.data.loading import (
    BalancedSampler,
    CyclingSampler,
    EpochSampler,
    ImageDataset,
    OnImages,
    Stream,
    collate_skip_bad,
    epoch_draws,
    epoch_seed,
    make_loader,
    resolve_num_workers,
    set_loader_epoch,
    usable_cpus,
    with_worker_step,
)
from tltool.data.shards import ShardSamples, ShardStream, is_shard_source, scan_shards, write_shards
from tltool.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, eval_transform, train_transform

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "BalancedSampler",
    "Stream",
    "CyclingSampler",
    "DataSplit",
    "EpochSampler",
    "ImageDataset",
    "OnImages",
    "LabelFile",
    "Preprocess",
    "Sample",
    "ShardSamples",
    "ShardStream",
    "collate_skip_bad",
    "epoch_draws",
    "data_root",
    "epoch_seed",
    "eval_transform",
    "image_files",
    "image_problem",
    "is_shard_source",
    "is_label_file",
    "is_visible",
    "load_image",
    "make_loader",
    "read_label_file",
    "resolve_num_workers",
    "scan_data",
    "scan_eval_folder",
    "scan_folder",
    "scan_label_file",
    "scan_shards",
    "scan_source",
    "set_loader_epoch",
    "stratified_split",
    "to_rgb",
    "train_transform",
    "usable_cpus",
    "with_worker_step",
    "write_shards",
]
