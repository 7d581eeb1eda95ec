"""The human report of a diagnosis: a bar per class and split, image statistics, findings, the keys to train."""

from __future__ import annotations

import statistics
from pathlib import Path

from tltool.doctor.findings import Diagnosis, Finding

BAR_WIDTH = 40
SHOWN_SETS = 10  # multilabel: the label sets the text report lists
SHOWN_SHARDS = 10  # shards: up to this many, a line each; more, their min/median/max
_BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(value: float, largest: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of unicode blocks, `width` characters for `largest`, in eighths of a character."""
    if largest <= 0 or value <= 0:
        return ""
    eighths = max(1, round(value / largest * width * 8))
    return "█" * (eighths // 8) + (_BLOCKS[eighths % 8] if eighths % 8 else "")


def _finding_lines(finding: Finding, mark: str) -> list[str]:
    lines = [f"  {mark} {finding.message}"]
    if finding.fix:
        lines.append(f"    fix: {finding.fix}")
    return lines


def _label_set_lines(label_sets: dict[str, int]) -> list[str]:
    """Multilabel: images per set of classes, the most common first (SHOWN_SETS of them)."""
    if not label_sets:
        return []
    lines = ["  label sets (images):"]
    for name, count in list(label_sets.items())[:SHOWN_SETS]:
        lines.append(f"    {count:>6}  {name}")
    if len(label_sets) > SHOWN_SETS:
        lines.append(f"    ... and {len(label_sets) - SHOWN_SETS} more (--json lists them all)")
    return lines


def _shard_lines(shards: list[dict]) -> list[str]:
    """Shards: how many, the samples of each (min/median/max past SHOWN_SHARDS), the unreadable ones."""
    if not shards:
        return []
    sizes = [s["samples"] for s in shards if s["samples"] is not None]
    bad = len(shards) - len(sizes)
    lines = [f"  {len(shards)} shard(s)" + (f", {bad} unusable (see problems)" if bad else "")]
    if sizes and len(shards) <= SHOWN_SHARDS:
        lines += [f"    {s['samples'] if s['samples'] is not None else s['problem']:>6}  {s['path']}" for s in shards]
    elif sizes:
        lines.append(f"    samples per shard {min(sizes)}/{statistics.median(sizes):g}/{max(sizes)} (min/median/max)")
    return lines


def format_diagnosis(diagnosis: Diagnosis) -> str:
    """The human report: layout, a bar per class and split, image statistics, problems, warnings, suggestions."""
    if diagnosis.layout == "splits":
        layout = "splits: " + ", ".join(f"{s.name} = {Path(s.path).name}/" for s in diagnosis.splits)
    elif diagnosis.layout == "labelfile":
        layout = "label file(s): " + ", ".join(f"{s.name} = {Path(s.path).name}" for s in diagnosis.splits)
        if diagnosis.split("val") is None:
            layout += " (tltool holds out data.val_split of each class for validation)"
    elif diagnosis.layout == "shards":
        layout = "shards: " + ", ".join(f"{s.name} = {s.path} ({len(s.shards)} shard(s))" for s in diagnosis.splits)
    else:
        layout = "one folder of classes (tltool holds out data.val_split of each class for validation)"
    if diagnosis.task == "multilabel":
        layout += "; multilabel (an image counts for each of its classes)"
    lines = [f"dataset {diagnosis.root}", f"layout  {layout}"]
    for report in diagnosis.splits:
        if not report.class_counts:
            continue
        usable = report.usable_counts()
        bad = {c: report.class_counts[c] - usable[c] for c in report.class_counts}
        ratio = ""
        if report.name == "train" and diagnosis.imbalance_ratio is not None:
            ratio = f", imbalance {diagnosis.imbalance_ratio:.1f}x (largest / smallest class)"
        sets = f", {len(report.label_sets)} label sets" if report.label_sets else ""
        lines += ["", f"{report.name}: {len(report.class_counts)} classes, {report.num_images} images{sets}{ratio}"]
        lines += _shard_lines(report.shards)
        if report.label_sets:
            lines.append("  positives per class:")
        width = max(len(c) for c in report.class_counts)
        digits = len(str(max(report.class_counts.values())))
        largest = max(report.class_counts.values())
        for name, count in report.class_counts.items():
            note = "  EMPTY" if count == 0 else (f"  ({bad[name]} unreadable)" if bad[name] else "")
            lines.append(f"  {name:<{width}}  {count:>{digits}}  {bar(count, largest)}{note}")
        lines += _label_set_lines(report.label_sets)
        if report.unlabelled_rows:
            lines.append(f"  rows with no label: {report.unlabelled_rows}")
    stats = diagnosis.image_stats
    how_read = (
        f"each decoded, {diagnosis.decode_failures} failed to decode"
        if diagnosis.deep
        else "headers read; --deep decodes each"
    )
    if stats:
        w, h = stats["width"], stats["height"]
        lines += [
            "",
            f"images  {stats['count']} readable ({how_read}); width {w['min']:g}/{w['median']:g}/{w['max']:g}, "
            f"height {h['min']:g}/{h['median']:g}/{h['max']:g} px (min/median/max)",
            "        modes "
            + ", ".join(f"{m} {n}" for m, n in stats["modes"].items())
            + "; formats "
            + ", ".join(f"{f} {n}" for f, n in stats["formats"].items()),
        ]
    if diagnosis.problems:
        lines += ["", f"problems that break training ({len(diagnosis.problems)}):"]
        for finding in diagnosis.problems:
            lines += _finding_lines(finding, "✗")
    if diagnosis.warnings:
        lines += ["", f"warnings ({len(diagnosis.warnings)}):"]
        for finding in diagnosis.warnings:
            lines += _finding_lines(finding, "!")
    if diagnosis.suggestions:
        lines += ["", "train on it with:", "  tltool finetune CONFIG " + " ".join(diagnosis.suggestions)]
    test = diagnosis.split("test")
    if test is not None and test.class_counts:
        lines.append(
            f"  and measure it after training with: tltool eval runs/<name>/checkpoints/best.pt --data {test.path}"
        )
    if not diagnosis.problems and not diagnosis.warnings:
        lines += ["", "no problems found"]
    return "\n".join(lines)
