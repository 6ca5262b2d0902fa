"""Dataset index: find an ImageFolder's images, decode-check each one, and write DALI's file_list.

One corrupt JPEG kills a whole DALI pipeline ("Critical error in pipeline ... nvImageCodec failure") and
DALI cannot skip a bad sample, so every image is decode-checked here before training, and the bad ones are
left out of the file_list that `fn.readers.file(file_root=index.root, file_list=index.file_list)` reads.

The index lives in `cache_dir/<sha1 of the root and file_list>/`: file_list.txt ("relpath label" lines),
positions.txt ("relpath position" lines, the training reader's: fastreg.cached_teacher's rows are positions),
bad_files.txt ("relpath<TAB>reason" lines) and index.json (fingerprint and classes). It is reused while the
fingerprint (every file's relpath, label, size and mtime: a stat walk, no decode) still matches.

DALI 2.4 parses a file_list line as: label = the last whitespace-separated token, path = everything before
it (leading and inner spaces and tabs kept, trailing whitespace dropped). Spaces in paths therefore work;
only a line break cannot be written, and such a file name is refused.

Run `python -m fastreg.index ROOT` to index a dataset ahead of training and see what was left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from fastreg import files
from fastreg.messages import listing

log = logging.getLogger(__name__)

# Part of the fingerprint: bump it when check_image's rule changes, so that cached indexes are rebuilt.
# 3: CMYK JPEGs and PNG, BMP and PNM files are kept (2 left out all but RGB and grayscale JPEGs).
INDEX_VERSION = 3
# PIL's names of the formats that DALI's decoders read like PIL, whatever the file's name. MPO is a camera's
# JPEG with extra pictures appended, of which every decoder reads the first; PPM is PIL's name for all PNM.
# Not here: GIF, which DALI cannot decode, and TIFF, WebP and JPEG 2000, of which DALI reads only some variants
# (simple WebP only, TIFF layouts its libtiff decoder accepts) and which no test here covers.
READ_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "PPM")
LIST_LINE = re.compile(r"(.*\S)\s+([0-9]+)")  # as DALI splits: the label is the last token
# File names are bytes on Linux; surrogateescape carries undecodable ones through to DALI unchanged.
ENCODING = dict(encoding="utf-8", errors="surrogateescape")


@dataclass(frozen=True)
class DatasetIndex:
    """The checked dataset. Labels are positions in `classes`; paths are relative to `root`."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    bad: list[tuple[str, str]]
    file_list: Path


def positions_list(index: DatasetIndex) -> Path:
    """index.file_list with each file's position in index.samples as its label, beside it: DALI's training
    reader reads positions (the rows of a cached teacher's features) and the loader maps them to labels.
    Written with the index; an index cached by an older fastreg gets it at its first training run."""
    path = index.file_list.with_name("positions.txt")
    text = "".join(f"{rel} {i}\n" for i, (rel, _) in enumerate(index.samples))
    if not path.exists() or path.read_text(**ENCODING) != text:
        _write_text(path, text)
    return path


def check_image(path: str | os.PathLike) -> str | None:
    """None when both loaders decode the file completely to the same 8-bit RGB image, else a short reason.

    Judged by content, not by name: a PNG named .jpg is read as a PNG. The DALI decoders and PIL's
    convert("RGB") agree on every format and mode accepted here: JPEG (RGB, grayscale, CMYK), PNG (RGB,
    grayscale, with alpha, palette, 1-bit), BMP and PNM (tests/test_index.py decodes each with both). CMYK
    goes to RGB without the file's ICC profile in both, as R = (255 - C)(255 - K) / 255 (Adobe's inverted
    storage undone), within one grey level of each other: the colours are those of that formula, not the
    profile's.
    """
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
        with Image.open(path) as img:
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
    except FileNotFoundError:
        return "missing"
    except PermissionError:
        return "unreadable: permission denied"
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
) -> DatasetIndex:
    """Index `root` (cached), leaving out files that fail check_image, with a warning.

    Without `file_list`, root is an ImageFolder tree: classes, labels and sample order equal
    torchvision's ImageFolder(root), so labels match the torchvision reference loader.

    With `file_list`, a text file of "relpath label" lines (paths relative to root), those files are checked
    instead of scanning, in the list's order. Classes are root's subfolder names when the list labels files
    the way ImageFolder would (each file in the subfolder at position `label`); otherwise they are named
    "0" .. "max_label", since the list alone carries no names.

    workers: threads for the decode check (default os.cpu_count()); 1 checks in this thread.
    Raises FileNotFoundError or ValueError, naming root and what to do, when there is nothing usable to
    index or more than max_bad_fraction of the files are bad.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset root {root} does not exist or is not a directory; "
            "point data.root at an ImageFolder directory (one subfolder per class)"
        )
    source = Path(file_list).expanduser().resolve() if file_list is not None else None
    if source is None:
        classes, entries = _scan_image_folder(root)
    else:
        entries = _read_file_list(source, root)
        classes = _classes_for_list(root, entries)
    if not entries:
        where = f"listed in {source}; check the list" if source else "in the class subfolders; check data.root"
        raise FileNotFoundError(f"no image files under {root} {where}")
    for rel, _ in entries:
        if "\n" in rel:
            raise ValueError(
                f"{str(root / rel)!r}: a line break in the file name cannot be written to DALI's "
                "file_list; rename the file"
            )

    folder = files.cache_folder("index", cache_dir)  # writable, or an error naming FASTREG_CACHE: before the check
    folder = folder / hashlib.sha1(f"{root}\0{source or ''}".encode(**ENCODING)).hexdigest()[:16]
    fingerprint = _fingerprint(root, classes, entries)
    index = _read_cached(folder, root, fingerprint)
    if index is None:
        index = _build(root, classes, entries, folder, fingerprint, workers or os.cpu_count() or 1, progress)
    else:
        log.info("%s: reusing the index in %s", root, folder)
    _report_bad(index, max_bad_fraction)
    return index


def _subfolders(root: Path) -> list[str]:
    # The same expression as torchvision.datasets.folder.find_classes, which fixes ImageFolder's labels.
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder's classes and (relpath, label) samples, collected by torchvision's own make_dataset."""
    # Imported here: torchvision pulls in torch (seconds), which `python -m fastreg.index` needs only here.
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    classes = _subfolders(root)
    if not classes:
        what = "has no class subfolders" if any(root.iterdir()) else "is empty"
        raise FileNotFoundError(
            f"dataset root {root} {what}: point data.root at an ImageFolder, whose class "
            "subfolders (named after the classes) hold the images, or pass a file_list"
        )
    # allow_empty: an empty class keeps its label (and a warning) instead of failing the whole index.
    found = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS, allow_empty=True)
    prefix = len(str(root)) + 1  # make_dataset joins onto str(root): slicing is exact and fast
    entries = [(path[prefix:], label) for path, label in found]
    used = {label for _, label in entries}
    empty = [c for i, c in enumerate(classes) if i not in used]
    if empty and entries:
        log.warning("%s: class folders without images (they keep their label): %s", root, listing(empty))
    return classes, entries


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
    folders = _subfolders(root)
    if all(label < len(folders) and rel.split("/", 1)[0] == folders[label] for rel, label in entries):
        return folders
    return [str(i) for i in range(max((label for _, label in entries), default=-1) + 1)]


def _fingerprint(root: Path, classes: list[str], entries: list[tuple[str, int]]) -> str:
    """Changes when a file is added, removed, relabelled, rewritten or touched, its permissions change (an
    unreadable file is left out), or the classes change."""
    digest = hashlib.sha1(json.dumps([INDEX_VERSION, classes]).encode())
    for rel, label in entries:
        try:
            stat = os.stat(root / rel)
            size, mtime, mode = stat.st_size, stat.st_mtime_ns, stat.st_mode
        except FileNotFoundError:  # a listed file that is gone: check_image reports it
            size, mtime, mode = -1, 0, 0
        digest.update(f"{rel}\0{label}\0{size}\0{mtime}\0{mode}\n".encode(**ENCODING))
    return digest.hexdigest()


def _read_cached(folder: Path, root: Path, fingerprint: str) -> DatasetIndex | None:
    try:
        meta = json.loads((folder / "index.json").read_text())
        if meta["fingerprint"] != fingerprint:
            return None
        samples = _read_file_list(folder / "file_list.txt", root)
        bad_text = (folder / "bad_files.txt").read_text(**ENCODING)
    except (FileNotFoundError, ValueError, KeyError):  # no index yet, or one from an older layout: rebuild
        return None
    bad = [tuple(line.rsplit("\t", 1)) for line in bad_text.split("\n") if line]
    return DatasetIndex(root, meta["classes"], samples, bad, folder / "file_list.txt")


def _build(
    root: Path,
    classes: list[str],
    entries: list[tuple[str, int]],
    folder: Path,
    fingerprint: str,
    workers: int,
    progress: bool,
) -> DatasetIndex:
    reasons = _check_all([str(root / rel) for rel, _ in entries], workers, progress)
    samples = [entry for entry, reason in zip(entries, reasons) if reason is None]
    bad = [(rel, reason) for (rel, _), reason in zip(entries, reasons) if reason is not None]
    folder.mkdir(parents=True, exist_ok=True)
    # index.json goes first and comes back last: while it exists, the lists beside it belong to it.
    (folder / "index.json").unlink(missing_ok=True)
    _write_text(folder / "file_list.txt", "".join(f"{rel} {label}\n" for rel, label in samples))
    _write_text(folder / "bad_files.txt", "".join(f"{rel}\t{reason}\n" for rel, reason in bad))
    index = DatasetIndex(root, classes, samples, bad, folder / "file_list.txt")
    positions_list(index)
    _write_text(folder / "index.json", json.dumps({"fingerprint": fingerprint, "classes": classes}))
    return index


def _check_all(paths: Sequence[str], workers: int, progress: bool) -> list[str | None]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        Progress(*columns, console=Console(stderr=True), disable=not progress) as bar,
        _mapper(min(workers, len(paths))) as mapper,
    ):
        task = bar.add_task("decode-checking images", total=len(paths))
        reasons = []
        for reason in mapper(check_image, paths):
            reasons.append(reason)
            bar.advance(task)
    return reasons


@contextmanager
def _mapper(workers: int) -> Iterator[Callable[[Callable, Sequence], Iterable]]:
    """`map` in this thread for one worker, else over a thread pool. Threads, not processes: Pillow releases
    the GIL while it decodes (300 photos at 500x375 on 2 cores: 950 img/s in one thread, 1340 with 2, 1740
    with 4), and a process pool would have to spawn (forking the trainer's threads can deadlock), which
    re-runs an unguarded __main__ script in every worker."""
    if workers <= 1:
        yield map
        return
    with ThreadPoolExecutor(workers) as pool:
        yield pool.map


def _write_text(path: Path, text: str) -> None:
    """A killed process leaves the old file or the new one, never half of one (fastreg.files.atomic_write)."""
    files.atomic_write(path, lambda f: f.write(text.encode(**ENCODING)))


def _report_bad(index: DatasetIndex, max_bad_fraction: float) -> None:
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
            "convert the images, or point data.root at another folder"
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
    parser.add_argument("root", help="ImageFolder root: one subfolder of images per class")
    parser.add_argument("--file-list", help="'relpath label' lines to check instead of scanning root")
    parser.add_argument("--cache-dir", help=f"where indexes are kept (default {files.cache_dir('index')})")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail when more than this fraction of the images is bad (default 0.01)",
    )
    parser.add_argument("--workers", type=int, help="decode-check threads (default: one per CPU)")
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
        )
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(
        f"{len(index.samples)} good, {len(index.bad)} bad images in {len(index.classes)} classes under "
        f"{index.root}; DALI file_list: {index.file_list}"
    )


if __name__ == "__main__":
    main()
