"""WebDataset shards: `data.train` / `data.val` as tar shards, streamed; `tltool shard` writes them.

A shard is a tar of samples `<key>.<image ext>` (the image bytes as they were on disk) and `<key>.cls` (the
class index as decimal text), the WebDataset layout. A shard source is a brace pattern
(`shards/train-{000000..000009}.tar`), a local glob (`shards/train-*.tar`), a path or a URL webdataset
opens (`https://...`, `pipe:...`); `classes.json` beside the shards names the classes (else `data.classes`,
else the indices).

The scan at start (`scan_shards`) lists every shard once: each sample's key and class (local tars: headers
and the `.cls` members only, no image bytes; URLs: streamed through webdataset). A sample is then
("<shard>#<key>", class), so counts, class weights and the data fingerprint work as for folders.

The epoch stream (`ShardStream`, an IterableDataset) and its resume semantic:
- the epoch's shard order is a permutation seeded by (run.seed, epoch); the samples in that order form
  one sequence of N positions;
- rank r of W takes the contiguous positions [r*n, (r+1)*n) with n = ceil(N/W) (training: the sequence
  wraps, so the first n*W - N samples are seen twice when W does not divide N, as torch's
  DistributedSampler pads; evaluation: [r*N//W, (r+1)*N//W), each sample once), so a rank reads only the
  shards of its range;
- webdataset's shuffle buffer of `data.shuffle_buffer` samples, seeded by (run.seed, epoch, rank), reorders the
  rank's sequence (run on positions, so the order is known before reading): the rank's order is
  a function of (seed, epoch, rank, world, the shards' sample counts, the buffer size);
- batch j of that order goes to loader worker (j - skip) mod workers, and the DataLoader takes workers'
  batches round robin, so the batches come in the same order whatever `data.num_workers` (each worker reads
  its rank's shards and decodes only its own batches: reading is multiplied by the workers, decoding is not);
- each draw's augmentation is seeded by its position (as `EpochSampler`'s seeded draws).
So a checkpoint's `batches_done` (per rank) is the whole resume state: the resumed epoch recomputes the
rank's order, skips its first `batches_done` batches (the shards wholly before the first sample still
needed are not opened, the other skipped samples are read, not decoded) and continues bitwise as the
uninterrupted run.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import math
import os
import random
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from tltool.data.images import IMAGE_EXTENSIONS, load_image
from tltool.errors import DataError

INSTALL = "pip install 'tltool[shards]'"
CLASSES_FILE = "classes.json"
INDEX_FILE = "shards.json"
IMAGE_EXTS = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}


class ShardError(DataError):
    """A DataError about one shard, with what is wrong as a `code` (what `tltool doctor` reports each shard by):
    "unreadable" (not a tar, cannot be opened or read), "no_label" (a sample without .cls), "no_image" (a sample
    without an image member), "bad_label" (a .cls that is not a class index), "empty" (no sample)."""

    def __init__(self, code: str, what: str, fix: str) -> None:
        super().__init__(what, fix)
        self.code = code


def webdataset():
    """The webdataset module, or a one-line DataError with the install command."""
    try:
        import webdataset as wds
    except ImportError:
        raise DataError("sharded datasets need the webdataset package, which is not installed", INSTALL) from None
    return wds


def is_shard_source(path: str | Path | None) -> bool:
    """Whether a data path names tar shards (a pattern, glob, path or URL ending in .tar)."""
    return path is not None and str(path).strip().lower().endswith(".tar")


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(pattern: str, key: str) -> list[str]:
    """The shards a source names: brace ranges expanded, local globs matched (sorted); none is a DataError."""
    from braceexpand import braceexpand  # (a dependency of webdataset)

    webdataset()
    urls: list[str] = []
    for item in braceexpand(str(pattern)):
        if is_remote(item):
            urls.append(item)
        elif glob.has_magic(item):
            urls.extend(sorted(glob.glob(item)))
        elif os.path.isfile(item):
            urls.append(item)
    if not urls:
        raise DataError(
            f"{key} shard pattern {pattern} matches no file",
            "check the path (brace ranges like train-{000000..000009}.tar, or a glob), or write shards with "
            "tltool shard FOLDER OUT",
        )
    return urls


class ShardSamples(list):
    """The samples of a shard source: ("<shard>#<key>", class) in shard order, with each shard's count."""

    def __init__(self, samples: Sequence[tuple[str, int]], shards: Sequence[tuple[str, int]]) -> None:
        super().__init__(samples)
        self.shards = list(shards)

    def relabelled(self, labels: Sequence[int]) -> ShardSamples:
        """The same samples (still streamed from the shards) with other labels (e.g. each sample's index)."""
        return ShardSamples([(path, label) for (path, _), label in zip(self, labels, strict=True)], self.shards)


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's member naming: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _local_members(url: str) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, ext, .cls bytes or None) of a local tar's members: headers only, the .cls members read."""
    try:
        with tarfile.open(url, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                data = tar.extractfile(member).read() if ext == "cls" else None  # type: ignore[union-attr]
                yield key, ext, data
    except (tarfile.TarError, OSError) as exc:
        raise ShardError(
            "unreadable", f"cannot read shard {url}: {exc}", "rewrite it (tltool shard) or remove it"
        ) from None


def _remote_members(url: str) -> Iterator[tuple[str, str, bytes | None]]:
    wds = webdataset()
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            for ext, value in sample.items():
                if not ext.startswith("__"):
                    yield sample["__key__"], ext.lower(), value if ext.lower() == "cls" else None
    except Exception as exc:  # (gopen's and curl's errors are of many kinds)
        raise ShardError(
            "unreadable", f"cannot read shard {url}: {exc}", "check the URL and that it is reachable"
        ) from None


def shard_samples(url: str, key: str) -> list[tuple[str, int]]:
    """(key, class) of each sample of one shard, in order (members of a sample are consecutive)."""
    members = _remote_members(url) if is_remote(url) else _local_members(url)
    out: list[tuple[str, int]] = []
    current: str | None = None
    label: int | None = None
    image = False

    def close() -> None:
        if current is None:
            return
        if label is None:
            raise ShardError(
                "no_label",
                f"{key}: shard {url} has a sample without a .cls label ({current})",
                "write shards with tltool shard (each sample <key>.<image ext> and <key>.cls)",
            )
        if not image:
            raise ShardError(
                "no_image",
                f"{key}: shard {url} has a sample without an image ({current})",
                f"give each sample an image member ({', '.join(sorted(IMAGE_EXTS))})",
            )
        out.append((current, label))

    for name, ext, data in members:
        if name != current:
            close()
            current, label, image = name, None, False
        if ext == "cls":
            try:
                label = int((data or b"").decode().strip())
            except ValueError:
                raise ShardError(
                    "bad_label",
                    f"{key}: shard {url} sample {name} has a .cls that is not a class index",
                    "write 0, 1, ...",
                ) from None
        elif ext in IMAGE_EXTS:
            image = True
    close()
    return out


def class_names_for(urls: list[str], labels: set[int], key: str, given: list[str] | None) -> list[str]:
    """classes.json beside the (first local) shards (the names of the .cls indices), else data.classes, else the
    indices as names."""
    local = [u for u in urls if not is_remote(u)]
    path = Path(local[0]).parent / CLASSES_FILE if local else None
    names = given
    if path is not None and path.is_file() or names is None:
        if path is not None and path.is_file():
            try:
                names = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read {path}: {exc}", "write a JSON list of the class names") from None
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise DataError(f"{path} is not a JSON list of class names", 'write e.g. ["cat", "dog"]')
        else:
            names = [str(i) for i in range(max(labels) + 1)] if labels else []
    bad = sorted(i for i in labels if not 0 <= i < len(names))
    if bad:
        raise DataError(
            f"{key}: class index(es) {', '.join(map(str, bad[:5]))} out of range for {len(names)} classes",
            f"name every class in data.classes or {CLASSES_FILE} beside the shards",
        )
    return list(names)


def scan_shards(pattern: str, key: str, classes: list[str] | None = None) -> tuple[list[str], ShardSamples]:
    """Class names and samples of a shard source (every shard listed once; see the module docstring)."""
    urls = expand_shards(pattern, key)
    samples: list[tuple[str, int]] = []
    shards: list[tuple[str, int]] = []
    for url in urls:
        rows = shard_samples(url, key)
        if not rows:
            raise ShardError("empty", f"{key}: shard {url} holds no sample", "remove it from the pattern or rewrite it")
        shards.append((url, len(rows)))
        samples.extend((f"{url}#{name}", label) for name, label in rows)
    names = class_names_for(urls, {label for _, label in samples}, key, classes)
    return names, ShardSamples(samples, shards)


def shuffle_buffer(items: Sequence[int], size: int, rng: random.Random) -> list[int]:
    """The order webdataset's shuffle buffer (`webdataset.filters.shuffle`, `size` samples, yielding once full)
    gives a stream, run on the positions: known before any shard is read."""
    if size <= 1:
        return list(items)
    return list(webdataset().filters.shuffle(bufsize=size, initial=size, rng=rng)(iter(items)))


class ShardStream(IterableDataset):
    """One rank's epoch of a shard source, in batches (see the module docstring for the order and resume).

    `shuffle`: training (shard order and buffer seeded per epoch, ranks padded to equal parts); else each
    sample once over all ranks, in shard order. `drop_single` (a batch size, 0: off) leaves out a last
    batch of one sample, as `EpochSampler.drop_single`.
    """

    def __init__(
        self,
        samples: ShardSamples,
        transform: Any,
        batch_size: int,
        seed: int,
        shuffle: bool,
        shard: tuple[int, int] = (0, 1),
        buffer: int = 1000,
        seeded: bool = False,
        drop_single: int = 0,
    ) -> None:
        self.shards = list(samples.shards)
        self.labels = [label for _, label in samples]
        self.names = [path for path, _ in samples]
        self.transform, self.batch_size, self.seed, self.shuffle = transform, batch_size, seed, shuffle
        self.rank, self.world = shard
        self.buffer, self.seeded, self.drop_single = buffer, seeded, drop_single
        # (epoch, batches to skip) in shared memory: persistent loader workers see each set_epoch.
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.reported: set[int] = set()

    @property
    def epoch(self) -> int:
        return int(self.position[0])

    @property
    def skip_batches(self) -> int:
        return int(self.position[1])

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.position[0], self.position[1] = epoch, skip_batches

    # --- the order ---------------------------------------------------------------------------------

    def shard_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def sequence(self) -> list[int]:
        """The epoch's samples (indices into the scan) in shard order."""
        starts = [0]
        for _, count in self.shards:
            starts.append(starts[-1] + count)
        return [i for s in self.shard_order() for i in range(starts[s], starts[s + 1])]

    def part(self, total: int) -> tuple[int, int]:
        """This rank's positions [lo, hi) of the epoch's sequence (hi may pass `total`: wrapped, training)."""
        if self.world == 1:
            return 0, total
        if self.shuffle:
            n = math.ceil(total / self.world)
            return self.rank * n, (self.rank + 1) * n
        return self.rank * total // self.world, (self.rank + 1) * total // self.world

    def full_size(self) -> int:
        """Samples this rank draws per epoch, before `drop_single`."""
        lo, hi = self.part(len(self.labels))
        return hi - lo

    full_shard_size = full_size  # (EpochSampler's name)

    def dropped(self) -> int:
        size = self.full_size()
        return int(self.drop_single > 1 and size > 1 and size % self.drop_single == 1)

    def shard_size(self) -> int:
        """Samples this rank draws per epoch."""
        return self.full_size() - self.dropped()

    def num_batches(self) -> int:
        return math.ceil(self.shard_size() / self.batch_size)

    def order(self) -> list[int]:
        """This rank's samples of the epoch (indices into the scan), in the order they are drawn."""
        sequence = self.sequence()
        lo, hi = self.part(len(sequence))
        mine = [sequence[p % len(sequence)] for p in range(lo, hi)] if sequence else []
        if self.shuffle:
            rng = random.Random((self.seed * 1_000_003 + self.epoch) * 7_919 + self.rank)
            mine = shuffle_buffer(mine, self.buffer, rng)
        return mine[: self.shard_size()]

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.skip_batches)

    # --- reading -------------------------------------------------------------------------------------

    def _read(self, shard: int, wanted: set[int] | None = None) -> Iterator[dict]:
        """The shard's samples in order, one dict each ({ext: bytes}). A local shard's members are read only for
        the samples at the positions in `wanted` (the others' data is seeked past: each loader worker reads its
        own batches' images, not its rank's whole shards); a URL streams through webdataset whole."""
        url = self.shards[shard][0]
        if is_remote(url):
            yield from webdataset().tariterators.tarfile_samples([{"url": url}])
            return
        with tarfile.open(url, "r:*") as tar:
            sample: dict | None = None
            position = -1
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample, position = {"__key__": key}, position + 1
                if wanted is None or position in wanted:
                    sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
            if sample is not None:
                yield sample

    def _decode(self, index: int, sample: dict, draw_seed: int | None):
        name = self.names[index]
        data = next((v for k, v in sample.items() if k.lower() in IMAGE_EXTS), None)
        try:
            if data is None:
                raise OSError("no image member")
            image = load_image(io.BytesIO(data))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
            if index not in self.reported:
                self.reported.add(index)
                print(f"warning: skipping {name}: cannot decode ({exc})", file=sys.stderr)
            return None
        if draw_seed is None:
            return self.transform(image)
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(draw_seed)
        try:
            return self.transform(image)
        finally:
            generator.set_state(state)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order()
        b = self.batch_size
        batches = [
            j
            for j in range(self.skip_batches, math.ceil(len(order) / b))
            if (j - self.skip_batches) % workers == worker
        ]
        uses = Counter(order[k] for j in batches for k in range(j * b, min(len(order), (j + 1) * b)))
        base = (self.seed * 1_000_003 + self.epoch) * 2_654_435_761
        starts = [0]
        for _, count in self.shards:
            starts.append(starts[-1] + count)

        def shard_of(index: int) -> int:
            return bisect.bisect_right(starts, index) - 1

        # The shards to read, in the epoch's order, from the first holding a needed sample (a padded rank wraps).
        wanted = {shard_of(i) for i in uses}
        sequence_shards = [s for s in self.shard_order() if s in wanted]
        loaded: dict[int, dict] = {}
        reader = iter(sequence_shards)

        def load_until(index: int) -> None:
            while index not in loaded:
                s = next(reader, None)
                if s is None:
                    raise DataError(
                        f"shard {self.shards[shard_of(index)][0]} changed since the scan (sample missing)",
                        "restart the run",
                    )
                count = 0
                wanted = {i - starts[s] for i in uses if starts[s] <= i < starts[s + 1]}
                for offset, sample in enumerate(self._read(s, wanted)):
                    count += 1
                    if starts[s] + offset in uses:
                        loaded[starts[s] + offset] = sample
                if count != self.shards[s][1]:
                    raise DataError(
                        f"shard {self.shards[s][0]} changed since the scan ({count} samples, not {self.shards[s][1]})",
                        "restart the run",
                    )

        for j in batches:
            images, labels = [], []
            for k in range(j * b, min(len(order), (j + 1) * b)):
                index = order[k]
                load_until(index)
                # Position k of this rank's order is position rank + k * world of the epoch, as EpochSampler.
                seed = (base + self.rank + k * self.world) % 2**63 if self.seeded else None
                image = self._decode(index, loaded[index], seed)
                uses[index] -= 1
                if not uses[index]:  # (a padded rank may draw a sample twice: kept until its last use)
                    del loaded[index]
                if image is not None:
                    images.append(image)
                    labels.append(self.labels[index])
            yield (torch.stack(images), torch.tensor(labels, dtype=torch.long)) if images else None


def write_shards(
    source: str | Path,
    out: str | Path,
    shard_size: int,
    val_split: float = 0.0,
    seed: int = 0,
    path_column: str = "path",
    label_column: str = "label",
) -> dict:
    """`tltool shard`: a folder of class sub-folders or a label file to `out/train-NNNNNN.tar` (and `val-*` with
    `val_split`), `classes.json` and `shards.json`. Samples are shuffled (seeded) before writing, so each shard
    mixes the classes; each holds `<key>.<ext>` (the file's bytes) and `<key>.cls`. Nothing is overwritten:
    `out` must not exist or be empty; the shards are written beside it and moved in at the end."""
    from tltool.data.folders import file_problem, scan_source, stratified_split
    from tltool.data.labelfile import is_label_file

    wds = webdataset()
    if shard_size < 1:
        raise DataError(f"--shard-size {shard_size} is not a positive count", "give e.g. --shard-size 1000")
    if not 0.0 <= val_split < 1.0:
        raise DataError(f"--val-split {val_split} is not in [0, 1)", "give e.g. --val-split 0.2, or 0 for none")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder", "give a new folder for the shards")
    from tltool.config import DataConfig

    cfg = DataConfig(path_column=path_column, label_column=label_column)
    classes, samples = scan_source(source, "SOURCE", cfg) if is_label_file(source) else scan_source(source, "SOURCE")
    bad = [(path, why) for path, _ in samples if (why := file_problem(path)) is not None]
    if bad:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        raise DataError(f"{len(bad)} unreadable image(s): {shown}", "fix or remove them before sharding")
    splits = {"train": list(samples)}
    if val_split > 0:
        splits["train"], splits["val"] = stratified_split(samples, val_split, seed)
    random.Random(seed).shuffle(splits["train"])
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.parent / f".{out.name}.partial-{os.getpid()}"
    temp.mkdir()
    index: dict[str, Any] = {"classes": classes}
    try:
        for name, items in splits.items():
            counts: list[int] = []
            for start in range(0, len(items), shard_size):
                number = len(counts)
                with wds.TarWriter(str(temp / f"{name}-{number:06d}.tar"), encoder=False) as writer:
                    for i, (path, label) in enumerate(items[start : start + shard_size], start):
                        ext = Path(path).suffix.lower().lstrip(".")
                        writer.write({"__key__": f"{i:09d}", ext: Path(path).read_bytes(), "cls": str(label).encode()})
                counts.append(len(items[start : start + shard_size]))
            last = len(counts) - 1
            index[name] = {"pattern": f"{name}-{{000000..{last:06d}}}.tar", "shards": len(counts), "counts": counts}
            index[name]["samples"] = sum(counts)
        (temp / CLASSES_FILE).write_text(json.dumps(classes, indent=1) + "\n")
        (temp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(temp, out)
    except BaseException:
        for child in temp.glob("*"):
            child.unlink()
        temp.rmdir()
        raise
    return index
