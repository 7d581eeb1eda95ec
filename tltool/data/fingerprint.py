"""The data fingerprint a checkpoint keeps: which images a run trains and validates on, compactly enough to say
what changed when the run is resumed.

For each scanned folder (data.train, and data.val when given) and each class: the 64-bit keys of the files'
paths relative to the folder, and their sizes in bytes (two int64 tensors, 16 bytes an image); and the keys
of the validation images when data.val_split held them out of data.train. A SHA-256 digest of all of it
says "the same data" in one comparison. A resume compares the fingerprint of the data now with the
checkpoint's (`compare`): images added, removed or resized per class, and whether the val split would
change (a stratified split of other files is another split: images the run trained on would be scored).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tltool.data.labelfile import label_indices

Sample = tuple[str, int]  # (as tltool.data.folders.Sample, which imports this module)

FINGERPRINT_VERSION = 1
STREAM_ALL = "*"  # the one "class" of a stream without classes (adapt.unlabeled)
SHOWN_CLASSES = 4  # classes a change message names before "..."


def path_key(relative: str) -> int:
    """A file's 64-bit key: the first 8 bytes of BLAKE2b of its path relative to the scanned folder (`/`)."""
    digest = hashlib.blake2b(relative.replace(os.sep, "/").encode("utf-8", "surrogateescape"), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


def sample_key(path: str, root: str) -> int:
    """`path_key` of `path` relative to `root` (os.path.relpath's answer; a path under `root` that is already
    normal is cut, not re-derived: relpath costs more than the rest of a scan's work per file)."""
    prefix = root + os.sep
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        if rest and os.path.normpath(rest) == rest:
            return path_key(rest)
    return path_key(os.path.relpath(path, root))


def folder_listing(root: str, class_names: Sequence[str], samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Per class of a scanned folder: {"paths": keys, "sizes": bytes} (int64 tensors, sorted by key)."""
    rows: dict[str, list[tuple[int, int]]] = {name: [] for name in class_names}
    for path, label in samples:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        for i in label_indices(label):  # (a multilabel image is listed under each of its classes)
            rows[class_names[i]].append((sample_key(path, root), size))
    listing = {}
    for name, items in rows.items():
        items.sort()
        listing[name] = {
            "paths": torch.tensor([k for k, _ in items], dtype=torch.int64),
            "sizes": torch.tensor([s for _, s in items], dtype=torch.int64),
        }
    return listing


def val_keys(val: Sequence[Sample], root: str) -> torch.Tensor:
    """The sorted keys of the validation images held out of `root` (data.val_split)."""
    return torch.tensor(sorted(sample_key(path, root) for path, _ in val), dtype=torch.int64)


def digest(folders: dict[str, dict[str, dict[str, Any]]], val: torch.Tensor | None) -> str:
    sha = hashlib.sha256(f"tltool data fingerprint {FINGERPRINT_VERSION}".encode())
    for folder in sorted(folders):
        for name in sorted(folders[folder]):
            entry = folders[folder][name]
            sha.update(f"\0{folder}\0{name}\0{entry['paths'].numel()}\0".encode())
            sha.update(entry["paths"].numpy().tobytes())
            sha.update(entry["sizes"].numpy().tobytes())
    if val is not None:
        sha.update(b"\0val_split\0")
        sha.update(val.numpy().tobytes())
    return sha.hexdigest()


def make_fingerprint(folders: dict[str, dict[str, dict[str, Any]]], val: torch.Tensor | None) -> dict[str, Any]:
    """The checkpoint's `data_fingerprint`: tensors, strings and dicts only (weights_only-safe)."""
    return {"version": FINGERPRINT_VERSION, "digest": digest(folders, val), "folders": folders, "val_split": val}


@dataclass
class DataChange:
    """What differs between a checkpoint's fingerprint and the data now."""

    parts: list[str] = field(default_factory=list)  # "3 images added to data.train/cat, 1 removed", ...
    folders_changed: bool = False
    val_moves: tuple[int, int] = (0, 0)  # (checkpoint val images now in train, checkpoint train images now in val)

    @property
    def changed(self) -> bool:
        return self.folders_changed or any(self.val_moves)

    def text(self) -> str:
        parts = list(self.parts)
        to_train, to_val = self.val_moves
        if to_train or to_val:
            parts.append(
                f"the val split would change ({to_train} val image(s) would be trained on, {to_val} trained "
                "image(s) would be scored)"
            )
        return "; ".join(parts)


def _counts(added: int, removed: int, resized: int) -> str:
    words = [(added, "added"), (removed, "removed"), (resized, "resized")]
    return ", ".join(f"{count} image{'s' if count > 1 else ''} {what}" for count, what in words if count)


def compare(saved: dict[str, Any], now: dict[str, Any], keys: dict[str, str]) -> DataChange:
    """What changed from `saved` to `now` (fingerprints); `keys` names the folders ("train" -> "data.train")."""
    change = DataChange()
    lines: list[str] = []
    for folder in sorted(set(saved["folders"]) | set(now["folders"])):
        old_classes, new_classes = saved["folders"].get(folder, {}), now["folders"].get(folder, {})
        for name in sorted(set(old_classes) | set(new_classes)):
            empty = {"paths": torch.zeros(0, dtype=torch.int64), "sizes": torch.zeros(0, dtype=torch.int64)}
            old, new = old_classes.get(name, empty), new_classes.get(name, empty)
            old_sizes = dict(zip(old["paths"].tolist(), old["sizes"].tolist(), strict=True))
            new_sizes = dict(zip(new["paths"].tolist(), new["sizes"].tolist(), strict=True))
            added = len(new_sizes.keys() - old_sizes.keys())
            removed = len(old_sizes.keys() - new_sizes.keys())
            resized = sum(1 for k in old_sizes.keys() & new_sizes.keys() if old_sizes[k] != new_sizes[k])
            if added or removed or resized:
                lines.append(f"{_counts(added, removed, resized)} in {keys.get(folder, folder)}/{name}")
    if lines:
        change.folders_changed = True
        change.parts = lines[:SHOWN_CLASSES] + ([f"... ({len(lines) - SHOWN_CLASSES} more classes)"]
                                               if len(lines) > SHOWN_CLASSES else [])  # fmt: skip
    if saved.get("val_split") is not None and now.get("val_split") is not None:
        old_val, new_val = set(saved["val_split"].tolist()), set(now["val_split"].tolist())
        everywhere_old = {k for c in saved["folders"].get("train", {}).values() for k in c["paths"].tolist()}
        everywhere_new = {k for c in now["folders"].get("train", {}).values() for k in c["paths"].tolist()}
        both = everywhere_old & everywhere_new  # (images in the dataset before and now)
        change.val_moves = (len((old_val - new_val) & both), len((new_val - old_val) & both))
    return change


def keep_val_split(
    train: list[Sample], val: list[Sample], saved_val: torch.Tensor, root: str
) -> tuple[list[Sample], list[Sample], int]:
    """Re-partition the images now found into the checkpoint's val split: a checkpoint val image that is still
    there stays in val, every other image (kept, or new) trains. Returns (train, val, val images gone)."""
    keep = set(saved_val.tolist())
    everything = sorted(train + val)
    new_val = [s for s in everything if sample_key(s[0], root) in keep]
    new_train = [s for s in everything if sample_key(s[0], root) not in keep]
    return new_train, new_val, len(keep) - len(new_val)


def stream_listing(root: str, samples: Sequence[Sample], class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The listing of another stream's folder (adapt.unlabeled: every image under one name, `STREAM_ALL`;
    source.train: per class), as `folder_listing` has data.train's."""
    if class_names is None:
        return folder_listing(root, [STREAM_ALL], [(path, 0) for path, _ in samples])
    return folder_listing(root, class_names, samples)


def with_streams(fingerprint: dict[str, Any], streams: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`fingerprint` with the other streams' listings by config key ("adapt.unlabeled", "source.train") and their
    own digest. Kept apart from "digest" and "folders": a checkpoint written before streams were fingerprinted
    compares its data as before, and its streams are not checked (`stream_change`)."""
    return {**fingerprint, "streams": streams, "streams_digest": digest(streams, None)}


def stream_change(saved: dict[str, Any] | None, now: dict[str, Any]) -> DataChange | None:
    """What changed in the other streams' folders since `saved`, or None (the same, or not recorded there)."""
    if not saved or "streams" not in saved or saved.get("streams_digest") == now.get("streams_digest"):
        return None
    keys = {key: key for key in set(saved["streams"]) | set(now.get("streams", {}))}
    return compare({"folders": saved["streams"]}, {"folders": now.get("streams", {})}, keys)
