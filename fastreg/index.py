"""Dataset index: find an ImageFolder's images, decode-check each one, and write DALI's file_list.

One corrupt JPEG kills a whole DALI pipeline ("Critical error in pipeline ... nvImageCodec failure") and
DALI cannot skip a bad sample, so every image is decode-checked here before training, and the bad ones are
left out of the file_list that `fn.readers.file(file_root=index.root, file_list=index.file_list)` reads.
The check reads each file's bytes once: it checksums them (sha1) and decodes them. The index's content digest,
over every kept file's (relpath, label, checksum), says what the pixels are, not only what the files are named:
a teacher cache is bound to it (fastreg.cached_teacher).

The index lives in `cache_dir/<sha1 of the root and file_list>/`: file_list.txt ("relpath label" lines),
positions.txt ("relpath position" lines, the training reader's: fastreg.cached_teacher's rows are positions),
bad_files.txt ("relpath<TAB>reason" lines), files.txt (every file's label, stat line, checksum and verdict) and
index.json (fingerprint, classes, content digest). It is reused while the fingerprint (every file's relpath,
label and stat line: a stat walk, no read) still matches. When it does not, only the files whose stat line
changed are read and checked again (see _update); `python -m fastreg.index ROOT --recheck` reads them all.

DALI 2.4 parses a file_list line as: label = the last whitespace-separated token, path = everything before
it (leading and inner spaces and tabs kept, trailing whitespace dropped). Spaces in paths therefore work;
only a line break cannot be written, and such a file name is refused.

Run `python -m fastreg.index ROOT` to index a dataset ahead of training and see what was left out.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fastreg import files
from fastreg.messages import listing

log = logging.getLogger(__name__)

# Part of the fingerprint: bump it when check_file's rule or the stat line changes, so that cached indexes are
# rebuilt. 3: CMYK JPEGs and PNG, BMP and PNM files are kept (2 left out all but RGB and grayscale JPEGs).
# 4: the stat line gains the ctime and the inode, and every file its checksum (files.txt, the content digest).
INDEX_VERSION = 4
# torchvision.datasets.folder.IMG_EXTENSIONS, which ImageFolder keeps (case-insensitively); a copy, so that
# `python -m fastreg.index` does not import torch (tests/test_index.py checks that they agree).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL's names of the formats that DALI's decoders read like PIL, whatever the file's name. MPO is a camera's
# JPEG with extra pictures appended, of which every decoder reads the first; PPM is PIL's name for all PNM.
# Not here: GIF, which DALI cannot decode, and TIFF, WebP and JPEG 2000, of which DALI reads only some variants
# (simple WebP only, TIFF layouts its libtiff decoder accepts) and which no test here covers.
READ_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "PPM")
LIST_LINE = re.compile(r"(.*\S)\s+([0-9]+)")  # as DALI splits: the label is the last token
# File names are bytes on Linux; surrogateescape carries undecodable ones through to DALI unchanged.
ENCODING = dict(encoding="utf-8", errors="surrogateescape")
UNREAD = "-"  # the checksum of a file whose bytes could not be read


@dataclass(frozen=True)
class DatasetIndex:
    """The checked dataset. Labels are positions in `classes`; paths are relative to `root`."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    bad: list[tuple[str, str]]
    file_list: Path
    content: str  # sha1 over the samples' (relpath, label, checksum of the bytes): what their pixels are
    source: Path | None = None  # the file_list given to load_index; None for a scanned ImageFolder


class FileCheck(NamedTuple):
    reason: str | None  # None: both loaders decode the file; else why it is left out
    checksum: str  # sha1 of its bytes (hex); UNREAD when they cannot be read


class Stored(NamedTuple):
    """A file's line of files.txt: what it was when it was last checked."""

    label: int
    stat: str
    check: FileCheck


def positions_list(index: DatasetIndex) -> Path:
    """index.file_list with each file's position in index.samples as its label, beside it: DALI's training
    reader reads positions (the rows of a cached teacher's features) and the loader maps them to labels.
    Written with the index; an index cached by an older fastreg gets it at its first training run."""
    path = index.file_list.with_name("positions.txt")
    text = "".join(f"{rel} {i}\n" for i, (rel, _) in enumerate(index.samples))
    if not path.exists() or path.read_text(**ENCODING) != text:
        _write_text(path, text)
    return path


def check_file(path: str | os.PathLike) -> FileCheck:
    """The file's bytes, read once: their checksum, and check_bytes' verdict on them."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return FileCheck("missing", UNREAD)
    except PermissionError:
        return FileCheck("unreadable: permission denied", UNREAD)
    except OSError as e:  # EIO from a failing disk, ELOOP from a symlink loop, ...
        return FileCheck(f"unreadable: {e.strerror}", UNREAD)
    # sha1: 1.1 GB/s on one core here (blake2b 0.36), a tenth of the decode's time; it detects changes, no
    # adversary is assumed.
    return FileCheck(check_bytes(data), hashlib.sha1(data).hexdigest())


def check_bytes(data: bytes) -> str | None:
    """None when both loaders decode an image file's bytes completely to the same 8-bit RGB image, else a short
    reason.

    Judged by content, not by name: a PNG named .jpg is read as a PNG. The DALI decoders and PIL's
    convert("RGB") agree on every format and mode accepted here: JPEG (RGB, grayscale, CMYK), PNG (RGB,
    grayscale, with alpha, palette, 1-bit), BMP and PNM (tests/test_index.py decodes each with both). CMYK
    goes to RGB without the file's ICC profile in both, as R = (255 - C)(255 - K) / 255 (Adobe's inverted
    storage undone), within one grey level of each other: the colours are those of that formula, not the
    profile's.
    """
    if not data:
        return "zero bytes"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in READ_FORMATS:
                return f"a {img.format} image: the loaders read JPEG, PNG, BMP and PNM files; convert it to JPEG"
            # 16- and 32-bit grayscale (PIL modes I, I;16, I;16B, ..., F; PNG and PNM): convert("RGB") clips
            # 256 and above to 255, where DALI divides by 256.
            if img.mode.split(";")[0] in ("I", "F"):
                return (
                    f"a {img.mode} {img.format} (over 8 bits per pixel): PIL's convert('RGB') clips it, DALI "
                    "scales it, so the loaders would differ; convert it to 8 bits"
                )
            img.load()  # a full decode; PIL raises on a truncated file unless LOAD_TRUNCATED_IMAGES is set
    except UnidentifiedImageError:
        return "not an image"
    # A checker must never abort the whole index: PIL raises many exception types on malformed data.
    except Exception as e:  # noqa: BLE001
        message = " ".join(str(e).split())  # one line, so that bad_files.txt stays one entry per line
        # PIL has no exception class for truncation, only the message ("image file is truncated ...",
        # "Truncated File Read").
        return f"truncated: {message}" if "truncated" in message.lower() else f"cannot decode: {message}"
    return None


def load_index(
    root: str | os.PathLike,
    *,
    file_list: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_bad_fraction: float = 0.01,
    workers: int | None = None,
    progress: bool = True,
    recheck: bool = False,
    key: str = "data.root",
) -> DatasetIndex:
    """Index `root` (cached), leaving out files that fail check_file, with a warning.

    Without `file_list`, root is an ImageFolder tree: classes, labels and sample order equal
    torchvision's ImageFolder(root), so labels match the torchvision reference loader, except that no
    directory is entered twice (see _walk_once).

    With `file_list`, a text file of "relpath label" lines (paths relative to root), those files are checked
    instead of scanning, in the list's order. Classes are root's subfolder names when the list labels files
    the way ImageFolder would (each file in the subfolder at position `label`); otherwise they are named
    "0" .. "max_label", since the list alone carries no names.

    workers: threads for the decode check (default os.cpu_count()); 1 checks in this thread.
    recheck: read and check every file again, whatever its stat line says.
    key: the config key (or argument) that gave `root`, which the messages about it name.
    Raises FileNotFoundError or ValueError, naming root, the key and what to do, when there is nothing usable
    to index or more than max_bad_fraction of the files are bad.
    """
    root, source, classes, entries = find_samples(root, file_list, key)
    folder = files.cache_folder("index", cache_dir)  # writable, or an error naming FASTREG_CACHE: before the check
    folder = folder / hashlib.sha1(f"{root}\0{source or ''}".encode(**ENCODING)).hexdigest()[:16]
    index = _update(root, source, classes, entries, folder, workers, progress, recheck)
    _report_bad(index, max_bad_fraction, key)
    return index


def find_samples(
    root: str | os.PathLike, file_list: str | os.PathLike | None = None, key: str = "data.root"
) -> tuple[Path, Path | None, list[str], list[tuple[str, int]]]:
    """(root, file list, classes, (relpath, label) samples) of load_index's root, found by a walk or read from the
    list, no file opened: what the index will check. Raises load_index's errors about the root (missing, empty, no
    class subfolders, no image files), naming `key`; fastreg.preflight calls it on the evaluation folders, so their
    errors come before the training, not after it."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist or is not a directory; "
            f"point {key} at an ImageFolder directory (one subfolder per class)"
        )
    source = Path(file_list).expanduser().resolve() if file_list is not None else None
    if source is None:
        classes, entries = _scan_image_folder(root, key)
    else:
        entries = _read_file_list(source, root)
        classes = _classes_for_list(root, entries)
    if not entries:
        where = f"listed in {source}; check the list" if source else f"in the class subfolders; check {key}"
        raise FileNotFoundError(f"no image files under {root} {where}")
    for rel, _ in entries:
        if "\n" in rel:
            raise ValueError(
                f"{str(root / rel)!r}: a line break in the file name cannot be written to DALI's "
                "file_list; rename the file"
            )
    return root, source, classes, entries


def recheck_after_failure(index: DatasetIndex, reader: str) -> ValueError | None:
    """After `reader` stopped on a file of `index` (DALI cannot say which): find the file, update the index so
    that the next run leaves it out, and return the error that names it and the fix; None when every file
    still passes the check (the failure is not the files').

    First only the files whose stat line changed since they were checked are read again (seconds); if none of
    those fails, every file is (a full read of the folder, as --recheck)."""
    folder = index.file_list.parent
    entries = [(rel, stored.label) for rel, stored in _read_stored(folder).items()]
    listed = {rel for rel, _ in index.samples}

    def culprits(recheck: bool) -> list[tuple[str, str]]:
        updated = _update(index.root, index.source, index.classes, entries, folder, None, False, recheck)
        return [(rel, reason) for rel, reason in updated.bad if rel in listed]

    if not entries:  # the index was removed meanwhile: nothing to go by
        return None
    found = culprits(recheck=False)
    if not found:
        log.warning(
            "%s: no file that %s read was written since it was checked; reading all %d files again to find the "
            "one that stopped it",
            index.root,
            reader,
            len(entries),
        )
        found = culprits(recheck=True)
    if not found:
        log.warning("%s: every file %s read still passes the decode check: no file stopped it", index.root, reader)
        return None
    return ValueError(
        f"{index.root}: {reader} stopped on {len(found)} file(s) that changed since the index was built and now "
        f"fail the decode check: {listing(f'{rel} ({reason})' for rel, reason in found)}. The index now leaves "
        "them out, so the same command runs without them. To read and check every file of the folder again, "
        f"run {recheck_command(index)}"
    )


def recheck_command(index: DatasetIndex) -> str:
    """The `python -m fastreg.index --recheck` command that updates this very index."""
    args = ["python", "-m", "fastreg.index", str(index.root), "--recheck"]
    if index.source is not None:
        args += ["--file-list", str(index.source)]
    if index.file_list.parent.parent != files.cache_dir("index"):
        args += ["--cache-dir", str(index.file_list.parent.parent)]
    return shlex.join(args)


def class_folders(root: str | os.PathLike) -> list[str]:
    """The class names of the ImageFolder `root`, label order: torchvision.datasets.folder.find_classes's
    expression, which fixes ImageFolder's labels."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _scan_image_folder(root: Path, key: str) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder's classes and (relpath, label) samples, in torchvision's make_dataset order: classes sorted,
    then per class its directories in sorted(os.walk(...)) order and their files sorted by name."""
    classes = class_folders(root)
    if not classes:
        what = "has no class subfolders" if any(root.iterdir()) else "is empty"
        listed = {"data.root": ", or pass data.file_list", "ROOT": ", or pass --file-list"}.get(key, "")
        raise FileNotFoundError(
            f"dataset root {root} {what}: point {key} at an ImageFolder, whose class "
            f"subfolders (named after the classes) hold the images{listed}"
        )
    # Every directory entered, by (st_dev, st_ino), with the path it was entered by. The root and the class
    # folders first, so that a link into another class folder is a duplicate, never a second way in for it.
    seen: dict[tuple[int, int], str] = {}
    tops = [str(root), *(os.path.join(root, c) for c in classes)]
    entered = [_enter(top, seen, root) for top in tops][1:]  # a class folder met before keeps its label, empty
    prefix = len(str(root)) + 1  # the walk joins onto str(root): slicing is exact and fast
    entries = []
    for label, top in enumerate(tops[1:]):
        for directory, names in _walk_once(top, seen, root) if entered[label] else []:
            entries += [(os.path.join(directory, n)[prefix:], label) for n in names if _is_image_name(n)]
    used = {label for _, label in entries}
    empty = [c for i, c in enumerate(classes) if i not in used]
    if empty and entries:
        log.warning("%s: class folders without images (they keep their label): %s", root, listing(empty))
    return classes, entries


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)  # torchvision's has_file_allowed_extension


def _walk_once(top: str, seen: dict[tuple[int, int], str], root: Path) -> list[tuple[str, list[str]]]:
    """(directory, sorted file names) under `top`, as sorted(os.walk(top, followlinks=True)) gives them, except
    that no directory is entered twice.

    torchvision's walk follows every directory link: `class0/loop -> ..` made it index the tree again and
    again, down to the path length limit, each time under class0's label. Here a directory already entered
    (the same (st_dev, st_ino), through a link or a bind mount) is skipped with a warning naming it: a loop
    when it leads back to a folder that contains it, else a duplicate, whose images are indexed once already,
    where the walk first met them (subfolders in sorted order, a level at a time). Links to folders met
    nowhere else are followed, as ImageFolder does."""
    found = []
    for directory, subfolders, names in os.walk(top, followlinks=True):
        found.append((directory, sorted(names)))
        subfolders[:] = [d for d in sorted(subfolders) if _enter(os.path.join(directory, d), seen, root)]
    return sorted(found)


def _enter(path: str, seen: dict[tuple[int, int], str], root: Path) -> bool:
    """Whether the walk may enter the directory `path` (never one it entered before); records it."""
    try:
        stat = os.stat(path)
    except OSError:  # os.walk meets it too, and skips it, as ImageFolder does
        return True
    first = seen.setdefault((stat.st_dev, stat.st_ino), path)
    if first == path:
        return True
    shown, met = os.path.relpath(path, root), os.path.relpath(first, root)
    met = "the dataset root" if met == "." else met
    target = f" -> {os.readlink(path)}" if os.path.islink(path) else ""
    if path.startswith(first + os.sep):
        log.warning(
            "%s: skipped %s%s: it leads back to %s, which contains it (a loop would index its images again "
            "and again); remove the link",
            root,
            shown,
            target,
            met,
        )
    else:
        log.warning(
            "%s: skipped %s%s: it leads to %s, whose images are indexed there already (a file is indexed once, "
            "under one label); remove the link, or copy the images if they belong to both folders",
            root,
            shown,
            target,
            met,
        )
    return False


def _read_file_list(path: Path, root: Path) -> list[tuple[str, int]]:
    """(relpath, label) pairs from "relpath label" lines, parsed the way DALI's readers.file does."""
    try:
        text = path.read_text(**ENCODING)
    except FileNotFoundError:
        raise FileNotFoundError(f"file list {path} does not exist; pass an existing file_list") from None
    entries = []
    for number, line in enumerate(text.split("\n"), 1):  # DALI splits on "\n" only
        if not line.strip():
            continue
        match = LIST_LINE.fullmatch(line.rstrip())
        if match is None:
            raise ValueError(
                f"{path}, line {number}: expected 'relative/path label' with an integer "
                f"label >= 0, got {line!r}; fix the line"
            )
        rel = match.group(1)
        if os.path.isabs(rel):
            raise ValueError(
                f"{path}, line {number}: path {rel!r} must be relative to the dataset root {root}; fix the line"
            )
        entries.append((rel, int(match.group(2))))
    return entries


def _classes_for_list(root: Path, entries: list[tuple[str, int]]) -> list[str]:
    """root's subfolder names when the list follows ImageFolder's labelling, else "0" .. "max_label"."""
    folders = class_folders(root)
    if all(label < len(folders) and rel.split("/", 1)[0] == folders[label] for rel, label in entries):
        return folders
    return [str(i) for i in range(max((label for _, label in entries), default=-1) + 1)]


def _stat_line(path: Path) -> str:
    """ "size mtime ctime inode mode" of the file a path leads to. Any write sets the ctime to the clock, and no
    call can set it back (os.utime and `touch -d` set the atime and mtime only), so a file rewritten in place
    with its old size and mtime is noticed; a file replaced by a rename has another inode; chmod changes the
    mode (a file made unreadable is left out, one made readable again is checked again)."""
    try:
        s = os.stat(path)
    except OSError as e:  # a listed file that is gone or cannot be reached: check_file reports it
        return f"error {e.errno}"
    return f"{s.st_size} {s.st_mtime_ns} {s.st_ctime_ns} {s.st_ino} {s.st_mode}"


def _fingerprint(classes: list[str], entries: list[tuple[str, int]], stats: list[str]) -> str:
    """Changes when a file is added, removed, relabelled or written, or the classes change."""
    digest = hashlib.sha1(json.dumps([INDEX_VERSION, classes]).encode())
    for (rel, label), stat in zip(entries, stats):
        digest.update(f"{rel}\0{label}\0{stat}\n".encode(**ENCODING))
    return digest.hexdigest()


def _content(samples: list[tuple[str, int]], checksums: Iterable[str]) -> str:
    digest = hashlib.sha1()
    for (rel, label), checksum in zip(samples, checksums):
        digest.update(f"{rel}\0{label}\0{checksum}\n".encode(**ENCODING))
    return digest.hexdigest()


def _update(
    root: Path,
    source: Path | None,
    classes: list[str],
    entries: list[tuple[str, int]],
    folder: Path,
    workers: int | None,
    progress: bool,
    recheck: bool,
) -> DatasetIndex:
    """The index of `entries` in `folder`, with a warning naming the files whose bytes changed since they were
    last checked.

    Reuse rule: while the fingerprint matches, the whole index is reused. Otherwise a file's stored verdict and
    checksum are reused when files.txt holds the same relpath with the same stat line (size, mtime, ctime,
    inode, mode) as now, whatever its label; every other file (new, or its stat line changed), or every file
    with `recheck`, is read, checksummed and decode-checked again. The stat lines are taken before the reads,
    so a file written during the check has a newer ctime than the one stored, and is checked again next time.
    """
    stats = [_stat_line(root / rel) for rel, _ in entries]
    fingerprint = _fingerprint(classes, entries, stats)
    if not recheck and (index := _read_cached(folder, root, source, fingerprint)) is not None:
        log.info("%s: reusing the index in %s", root, folder)
        return index
    stored = _read_stored(folder)
    todo = [i for i, (rel, _) in enumerate(entries) if recheck or rel not in stored or stored[rel].stat != stats[i]]
    if stored and todo:
        log.info("%s: checking %d of %d files (new, or written since they were checked)", root, len(todo), len(entries))
    paths = [str(root / entries[i][0]) for i in todo]
    fresh = dict(zip(todo, _check_all(paths, workers or os.cpu_count() or 1, progress)))
    checks = [fresh[i] if i in fresh else stored[rel].check for i, (rel, _) in enumerate(entries)]
    changed = [rel for i, (rel, _) in enumerate(entries) if i in fresh and _bytes_changed(stored.get(rel), checks[i])]
    if changed:
        log.warning(
            "%s: the bytes of %d indexed file(s) changed since they were checked, and were checked again: %s",
            root,
            len(changed),
            listing(changed),
        )
    return _write(root, source, classes, entries, stats, checks, folder, fingerprint)


def _bytes_changed(before: Stored | None, now: FileCheck) -> bool:
    """Whether a file read before and now has other bytes (one that became unreadable or gone is not: its
    verdict says so)."""
    return (
        before is not None
        and UNREAD not in (before.check.checksum, now.checksum)
        and before.check.checksum != now.checksum
    )


def _read_cached(folder: Path, root: Path, source: Path | None, fingerprint: str) -> DatasetIndex | None:
    try:
        meta = json.loads((folder / "index.json").read_text())
        if meta["fingerprint"] != fingerprint:
            return None
        samples = _read_file_list(folder / "file_list.txt", root)
        bad_text = (folder / "bad_files.txt").read_text(**ENCODING)
        content = meta["content"]
    except (FileNotFoundError, ValueError, KeyError):  # no index yet, or one from an older layout: rebuild
        return None
    bad = [tuple(line.rsplit("\t", 1)) for line in bad_text.split("\n") if line]
    return DatasetIndex(root, meta["classes"], samples, bad, folder / "file_list.txt", content, source)


def _read_stored(folder: Path) -> dict[str, Stored]:
    """files.txt's lines by relpath; none for an index of another version (its verdicts may differ)."""
    try:
        if json.loads((folder / "index.json").read_text()).get("version") != INDEX_VERSION:
            return {}
        stored = {}
        for line in (folder / "files.txt").read_text(**ENCODING).split("\n")[:-1]:
            label, stat, checksum, reason, rel = line.split("\t", 4)
            stored[rel] = Stored(int(label), stat, FileCheck(reason or None, checksum))
    except (FileNotFoundError, ValueError, AttributeError):  # none, or damaged: every file is checked again
        return {}
    return stored


def _write(
    root: Path,
    source: Path | None,
    classes: list[str],
    entries: list[tuple[str, int]],
    stats: list[str],
    checks: list[FileCheck],
    folder: Path,
    fingerprint: str,
) -> DatasetIndex:
    kept = [(entry, check.checksum) for entry, check in zip(entries, checks) if check.reason is None]
    samples = [entry for entry, _ in kept]
    bad = [(rel, check.reason) for (rel, _), check in zip(entries, checks) if check.reason is not None]
    folder.mkdir(parents=True, exist_ok=True)
    # index.json goes first and comes back last: while it exists, the lists beside it belong to it.
    (folder / "index.json").unlink(missing_ok=True)
    lines = (
        f"{label}\t{stat}\t{c.checksum}\t{c.reason or ''}\t{rel}\n"
        for (rel, label), stat, c in zip(entries, stats, checks)
    )
    _write_text(folder / "files.txt", "".join(lines))
    _write_text(folder / "file_list.txt", "".join(f"{rel} {label}\n" for rel, label in samples))
    _write_text(folder / "bad_files.txt", "".join(f"{rel}\t{reason}\n" for rel, reason in bad))
    content = _content(samples, (checksum for _, checksum in kept))
    index = DatasetIndex(root, classes, samples, bad, folder / "file_list.txt", content, source)
    positions_list(index)
    meta = {"version": INDEX_VERSION, "fingerprint": fingerprint, "classes": classes, "content": content}
    _write_text(folder / "index.json", json.dumps(meta))
    return index


def _check_all(paths: Sequence[str], workers: int, progress: bool) -> list[FileCheck]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        Progress(*columns, console=Console(stderr=True), disable=not progress) as bar,
        _mapper(min(workers, len(paths))) as mapper,
    ):
        task = bar.add_task("decode-checking images", total=len(paths))
        checks = []
        for check in mapper(check_file, paths):
            checks.append(check)
            bar.advance(task)
    return checks


@contextmanager
def _mapper(workers: int) -> Iterator[Callable[[Callable, Sequence], Iterable]]:
    """`map` in this thread for one worker, else over a thread pool. Threads, not processes: Pillow releases
    the GIL while it decodes, hashlib while it hashes (300 photos at 500x375 on 2 cores: 950 img/s in one thread,
    1340 with 2, 1740 with 4), and a process pool would have to spawn (forking the trainer's threads can
    deadlock), which re-runs an unguarded __main__ script in every worker."""
    if workers <= 1:
        yield map
        return
    with ThreadPoolExecutor(workers) as pool:
        yield pool.map


def _write_text(path: Path, text: str) -> None:
    """A killed process leaves the old file or the new one, never half of one (fastreg.files.atomic_write)."""
    files.atomic_write(path, lambda f: f.write(text.encode(**ENCODING)))


def _report_bad(index: DatasetIndex, max_bad_fraction: float, key: str) -> None:
    if not index.bad:
        return
    bad_list = index.file_list.with_name("bad_files.txt")
    total = len(index.samples) + len(index.bad)
    fraction = len(index.bad) / total
    examples = listing((f"{rel} ({reason})" for rel, reason in index.bad), first=3, sep="; ")
    if not index.samples:
        raise ValueError(
            f"{index.root}: none of the {total} images passes the decode check ({examples}); all are "
            f"listed in {bad_list} with the reasons. The loaders read JPEG, PNG, BMP and PNM images: "
            f"convert the images, or point {key} at another folder"
        )
    if fraction > max_bad_fraction:
        raise ValueError(
            f"{index.root}: {len(index.bad)} of {total} images ({fraction:.2%}) fail the decode "
            f"check, more than data.max_bad_fraction={max_bad_fraction}: {examples}; all are listed in "
            f"{bad_list}. Fix or remove those files, or raise data.max_bad_fraction"
        )
    log.warning(
        "%s: left out %d of %d images that fail the decode check (one would stop a DALI pipeline): %s; all "
        "are listed in %s",
        index.root,
        len(index.bad),
        total,
        examples,
        bad_list,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastreg.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", metavar="ROOT", help="ImageFolder root: one subfolder of images per class")
    parser.add_argument("--file-list", help="'relpath label' lines to check instead of scanning root")
    parser.add_argument("--cache-dir", help=f"where indexes are kept (default {files.cache_dir('index')})")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail when more than this fraction of the images is bad (default 0.01)",
    )
    parser.add_argument("--workers", type=int, help="decode-check threads (default: one per CPU)")
    parser.add_argument(
        "--recheck",
        action="store_true",
        help="read and check every file again, whatever its size and times say; report the files whose bytes "
        "changed since they were indexed and the new bad ones, and update the index",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    try:
        index = load_index(
            args.root,
            file_list=args.file_list,
            cache_dir=args.cache_dir,
            max_bad_fraction=args.max_bad_fraction,
            workers=args.workers,
            progress=not args.no_progress,
            recheck=args.recheck,
            key="ROOT",
        )
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    checked = "read and checked every file again: " if args.recheck else ""
    print(
        f"{checked}{len(index.samples)} good, {len(index.bad)} bad images in {len(index.classes)} classes under "
        f"{index.root}; DALI file_list: {index.file_list}"
    )


if __name__ == "__main__":
    main()
