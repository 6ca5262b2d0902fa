"""The dataset index: ImageFolder labels, the decode check, the cache, DALI's file_list and the CLI."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import BAD, ODD_BUT_READABLE, add_bad_files, add_odd_files, make_image_folder, noise, overwrite_in_place
from PIL import Image
from torchvision.datasets import ImageFolder

from fastreg import index as fi
from fastreg.index import check_file, load_index


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Indexes (also those of the CLI subprocesses) go to tmp_path, never to ~/.cache."""
    monkeypatch.setenv("FASTREG_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tree(tmp_path):
    """3 classes of good JPEGs, with the awkward names ImageFolder still accepts."""
    root = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=16)
    noise().save(root / "class0" / "with space.jpg")
    noise().save(root / "class1" / "UPPER.JPEG")
    (root / "class2" / "sub").mkdir()
    noise("L").save(root / "class2" / "sub" / "gray.jpg")  # grayscale, in a nested folder
    (root / "class0" / "notes.txt").write_text("not a candidate: no image extension")
    return root


def index(root, **kw):
    return load_index(root, workers=1, progress=False, **kw)


def test_classes_labels_and_order_equal_image_folder(tree):
    idx = index(tree)
    reference = ImageFolder(str(tree))
    assert idx.root == tree.resolve() and idx.root.is_absolute()
    assert idx.classes == reference.classes == ["class0", "class1", "class2"]
    assert idx.samples == [(os.path.relpath(p, tree), label) for p, label in reference.samples]
    assert ("class0/with space.jpg", 0) in idx.samples and ("class2/sub/gray.jpg", 2) in idx.samples
    assert idx.bad == []
    assert idx.file_list.read_text().splitlines() == [f"{rel} {label}" for rel, label in idx.samples]


@pytest.mark.parametrize("kind", BAD)
def test_check_file_names_each_bad_kind(tmp_path, kind):
    write, reason = BAD[kind]
    write(tmp_path / "x.jpg")
    assert check_file(tmp_path / "x.jpg").reason.startswith(reason)


def test_check_file_accepts_a_camera_mpo(tmp_path):
    """A camera's JPEG with a second picture appended (Pillow: format MPO): DALI decodes its first one."""
    noise().save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[noise("RGB", 16)])
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    assert check_file(tmp_path / "camera.jpg").reason is None


def test_check_file_accepts_rgb_and_grayscale(tmp_path):
    noise().save(tmp_path / "rgb.jpg")
    noise("L").save(tmp_path / "gray.jpeg")
    assert check_file(tmp_path / "rgb.jpg").reason is None and check_file(tmp_path / "gray.jpeg").reason is None


def gradient_cmyk(height=40, width=56) -> Image.Image:
    """Smooth C, M, Y and K fields, K up to 150: the black channel takes part in the conversion."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    planes = [255 * x, 255 * y, 255 * (1 - x) * y, 150 * x * (1 - y)]
    return Image.fromarray(np.stack(planes, -1).round().astype(np.uint8), "CMYK")


def gradient_rgb(height=40, width=56) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    return Image.fromarray((255 * np.stack([x, y, (x + y) / 2], -1)).round().astype(np.uint8))


# Every format and mode that check_file keeps, written under a .jpg name whatever the content.
READABLE = {
    "jpeg_rgb": lambda p: gradient_rgb().save(p, "JPEG", quality=95),
    "jpeg_gray": lambda p: gradient_rgb().convert("L").save(p, "JPEG", quality=95),
    "jpeg_cmyk": lambda p: gradient_cmyk().save(p, "JPEG", quality=95),
    "png_rgb": lambda p: gradient_rgb().save(p, "PNG"),
    "png_gray": lambda p: gradient_rgb().convert("L").save(p, "PNG"),
    "png_gray_alpha": lambda p: gradient_rgb().convert("LA").save(p, "PNG"),
    "png_rgba": lambda p: gradient_rgb().convert("RGBA").save(p, "PNG"),
    "png_palette": lambda p: gradient_rgb().convert("P").save(p, "PNG"),
    "png_palette_transparent": lambda p: gradient_rgb().convert("P").save(p, "PNG", transparency=0),
    "png_1bit": lambda p: gradient_rgb().convert("1").save(p, "PNG"),
    "bmp": lambda p: gradient_rgb().save(p, "BMP"),
    "bmp_palette": lambda p: gradient_rgb().convert("P").save(p, "BMP"),
    "ppm": lambda p: gradient_rgb().save(p, "PPM"),
    "pgm": lambda p: gradient_rgb().convert("L").save(p, "PPM"),
}


def decode_with_dali(paths):
    """(decoders.image, decoders.image_random_crop) outputs of DALI's CPU decoders, each a list of HWC uint8
    arrays; the random crop is asked for the whole image (area 1, the image's own aspect ratio)."""
    from nvidia.dali import fn, pipeline_def, types

    width, height = Image.open(paths[0]).size

    @pipeline_def(batch_size=len(paths), num_threads=1, device_id=None, seed=0)
    def pipeline():
        files, _ = fn.readers.file(files=[str(p) for p in paths])
        whole = fn.decoders.image(files, device="cpu", output_type=types.RGB)
        cropped = fn.decoders.image_random_crop(
            files,
            device="cpu",
            output_type=types.RGB,
            random_area=[1.0, 1.0],
            random_aspect_ratio=[width / height, width / height],
        )
        return whole, cropped

    pipe = pipeline()
    pipe.build()
    return [[np.array(batch.at(i)) for i in range(len(paths))] for batch in pipe.run()]


def test_every_kept_format_decodes_alike_in_dali_and_pil(tmp_path):
    """What check_file keeps, DALI's CPU decoders (the training and the eval one) read, to 3 channels, with
    PIL's convert("RGB") pixels: the torchvision loader and DALI see the same image."""
    paths = []
    for name, write in READABLE.items():
        write(tmp_path / f"{name}.jpg")
        assert check_file(tmp_path / f"{name}.jpg").reason is None, name
        paths.append(tmp_path / f"{name}.jpg")
    for kind, decoded in zip(("image", "image_random_crop"), decode_with_dali(paths)):
        for path, dali in zip(paths, decoded):
            pil = np.asarray(Image.open(path).convert("RGB")).astype(int)
            assert dali.shape == pil.shape == (40, 56, 3), (kind, path.name)
            assert np.abs(dali.astype(int) - pil).max() <= 1, (kind, path.name)  # CMYK: rounding, all else exact


def test_cmyk_jpeg_converts_without_its_profile_in_both_loaders(tmp_path):
    """Adobe CMYK JPEGs store 255 - value; both decoders undo that and convert naively, R = (255 - C)(255 - K) /
    255 (likewise G from M, B from Y), ignoring any ICC profile: the closed form, from the decoded CMYK planes."""
    gradient_cmyk().save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    assert b"Adobe" in (tmp_path / "cmyk.jpg").read_bytes()[:100]  # the APP14 marker of inverted storage
    cmyk = np.asarray(Image.open(tmp_path / "cmyk.jpg")).astype(float)  # PIL undoes the inversion
    assert cmyk[..., 3].max() > 100  # the black channel is used
    formula = (255 - cmyk[..., :3]) * (255 - cmyk[..., 3:]) / 255
    (dali,), _ = decode_with_dali([tmp_path / "cmyk.jpg"])
    pil = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))
    for name, rgb in (("dali", dali), ("pil", pil)):
        assert np.abs(rgb - formula).max() <= 1, name
    assert np.abs(dali.astype(int) - pil).mean() < 0.5


@pytest.mark.parametrize(
    "write, reason",
    [
        (lambda p: gradient_rgb().save(p, "GIF"), "a GIF image: the loaders read JPEG, PNG, BMP and PNM files"),
        (lambda p: gradient_rgb().save(p, "TIFF"), "a TIFF image"),
        (lambda p: gradient_rgb().save(p, "WEBP"), "a WEBP image"),
        (
            lambda p: Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(p, "PNG"),
            "a I;16 PNG (over 8 bits per pixel): PIL's convert('RGB') clips it, DALI scales it",
        ),
    ],
    ids=["gif", "tiff", "webp", "png_16bit"],
)
def test_check_file_leaves_out_what_the_loaders_do_not_read_alike(tmp_path, write, reason):
    write(tmp_path / "x.jpg")
    assert check_file(tmp_path / "x.jpg").reason.startswith(reason)


def test_dali_cannot_decode_a_gif(tmp_path):
    """Why GIF is left out: one in the file list would stop the DALI pipeline."""
    gradient_rgb().save(tmp_path / "x.jpg", "GIF")
    with pytest.raises(RuntimeError, match="Critical error in pipeline"):
        decode_with_dali([tmp_path / "x.jpg"])


def test_bad_files_are_excluded_listed_and_warned(tree, caplog):
    add_bad_files(tree)
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        idx = index(tree, max_bad_fraction=0.5)
    bad_list = idx.file_list.with_name("bad_files.txt")
    assert {rel: reason.split(":")[0] for rel, reason in idx.bad} == {
        f"class1/{name}.jpg": reason.split(":")[0] for name, (_, reason) in BAD.items()
    }
    assert bad_list.read_text().splitlines() == [f"{rel}\t{reason}" for rel, reason in idx.bad]
    listed = {line.rsplit(" ", 1)[0] for line in idx.file_list.read_text().splitlines()}
    assert len(listed) == len(idx.samples) == 15 and not listed & {rel for rel, _ in idx.bad}
    assert f"left out {len(BAD)} of {15 + len(BAD)} images" in caplog.text and str(bad_list) in caplog.text


def test_thread_pool_agrees_with_in_thread_check(tree, tmp_path):
    add_bad_files(tree)
    pooled = load_index(tree, workers=2, progress=True, max_bad_fraction=0.5, cache_dir=tmp_path / "pooled")
    in_process = index(tree, max_bad_fraction=0.5)
    assert (pooled.samples, pooled.bad) == (in_process.samples, in_process.bad)


def test_too_many_bad_files_fail_with_the_list(tree):
    add_bad_files(tree)
    with pytest.raises(ValueError, match=r"3 of 18 images \(16.67%\).*max_bad_fraction=0.01") as err:
        index(tree)
    bad_list = next((tree.parent / "cache" / "index").glob("*/bad_files.txt"))
    assert str(bad_list) in str(err.value) and len(bad_list.read_text().splitlines()) == 3


def test_all_bad_fails_even_when_allowed(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 images passes"):
        index(tmp_path / "data", max_bad_fraction=1.0)


def test_unusable_roots_fail_naming_the_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} does not exist"):
        index(tmp_path / "missing")
    flat = tmp_path / "flat"
    flat.mkdir()
    noise().save(flat / "a.jpg")
    with pytest.raises(FileNotFoundError, match=f"{flat} has no class subfolders"):
        index(flat)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=f"no image files under {tmp_path / 'empty'} in the class subfolders"):
        index(tmp_path / "empty")


def test_line_break_in_a_file_name_is_refused(tree):
    noise().save(tree / "class0" / "two\nlines.jpg")
    with pytest.raises(ValueError, match="line break"):
        index(tree)


def recording_checks(monkeypatch) -> list[str]:
    """The relpaths (under a class folder) that the index reads and checks from here on."""
    checked = []

    def check(path):
        checked.append("/".join(Path(path).parts[-2:]))
        return real_check(path)

    real_check = fi.check_file
    monkeypatch.setattr(fi, "check_file", check)
    return checked


def test_cache_is_reused_until_a_file_changes(tree, monkeypatch):
    add_bad_files(tree)
    first = index(tree, max_bad_fraction=0.5)
    checked = recording_checks(monkeypatch)
    assert index(tree, max_bad_fraction=0.5) == first  # bad files and their reasons come back too
    assert checked == []
    noise().save(tree / "class2" / "new.jpg")
    assert ("class2/new.jpg", 2) in index(tree, max_bad_fraction=0.5).samples
    assert checked == ["class2/new.jpg"]  # the others keep their stored verdicts


def test_permission_change_checks_the_file_again(tree, monkeypatch):
    """chmod changes neither size nor mtime, yet a file made unreadable (or readable again) after indexing must
    not keep its old verdict: a listed file that cannot be opened would stop a DALI pipeline mid-epoch."""
    index(tree)
    checked = recording_checks(monkeypatch)
    (tree / "class0" / "0.jpg").chmod(0)
    index(tree)
    assert checked == ["class0/0.jpg"]


def test_half_written_index_is_rebuilt(tree):
    idx = index(tree)
    (idx.file_list.parent / "index.json").unlink()  # as if killed before the commit step
    assert index(tree) == idx


def test_file_list_labels_like_image_folder_keep_folder_names(tree, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("class2/0.jpg 2\n\nclass0/with space.jpg   0  \nclass1/zero.jpg 1\n")
    (tree / "class1" / "zero.jpg").write_bytes(b"")
    idx = index(tree, file_list=listing, max_bad_fraction=0.5)
    assert idx.classes == ["class0", "class1", "class2"]
    assert idx.samples == [("class2/0.jpg", 2), ("class0/with space.jpg", 0)]  # the list's order
    assert idx.bad == [("class1/zero.jpg", "zero bytes")]


def test_file_list_with_other_labels_gets_numbered_classes(tree, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("class0/0.jpg 4\nclass1/0.jpg 1\n")
    assert index(tree, file_list=listing).classes == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    "line, problem",
    [
        ("class0/0.jpg", "expected 'relative/path label'"),
        ("class0/0.jpg -1", "expected 'relative/path label'"),
        ("class0/0.jpg 1.5", "expected 'relative/path label'"),
        ("/abs/0.jpg 0", "path '/abs/0.jpg' must be relative"),
    ],
)
def test_bad_file_list_lines_are_named(tree, tmp_path, line, problem):
    listing = tmp_path / "list.txt"
    listing.write_text(f"class0/1.jpg 0\n{line}\n")
    with pytest.raises(ValueError, match=f"{listing}, line 2: {problem}"):
        index(tree, file_list=listing)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fastreg.index", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_summary_and_failure(tree, tmp_path):
    """The CLI keeps a CMYK JPEG and a PNG named .jpg, and leaves out the corrupt, truncated and empty files."""
    add_bad_files(tree)
    add_odd_files(tree)
    ok = cli(tree, "--workers", "1", "--max-bad-fraction", "0.5", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("17 good, 3 bad images in 3 classes") and "file_list.txt" in ok.stdout
    assert "left out 3 of 20 images" in ok.stderr
    file_list = Path(ok.stdout.rsplit("DALI file_list: ", 1)[1].strip())
    listed = file_list.read_text().splitlines()
    assert {f"class1/{name}.jpg 1" for name in ODD_BUT_READABLE} <= set(listed)
    assert not [line for line in listed if any(f"/{name}.jpg" in line for name in BAD)]
    failed = cli(tmp_path / "missing")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith(f"error: dataset root {tmp_path / 'missing'} does not exist")


def test_dali_reads_every_listed_file(tree):
    """DALI's CPU pipeline decodes the whole written file_list, space in a name included."""
    from nvidia.dali import fn, pipeline_def

    add_bad_files(tree)
    add_odd_files(tree)  # a CMYK JPEG and a PNG named .jpg: kept, and decoded
    idx = index(tree, max_bad_fraction=0.5)
    assert len(idx.samples) == 17

    @pipeline_def(batch_size=len(idx.samples), num_threads=1, device_id=None)
    def pipeline():
        jpegs, labels = fn.readers.file(file_root=str(idx.root), file_list=str(idx.file_list), name="files")
        return fn.decoders.image(jpegs, device="cpu"), labels, fn.get_property(jpegs, key="source_info")

    pipe = pipeline()
    pipe.build()
    assert pipe.epoch_size("files") == len(idx.samples)
    images, labels, sources = pipe.run()
    read = [(bytes(np.array(sources.at(i))).decode(), int(labels.at(i)[0])) for i in range(len(idx.samples))]
    assert sorted(read) == sorted(idx.samples)
    assert all(images.at(i).shape == (16, 16, 3) for i in range(len(idx.samples)))


# ------------------------------------------------------------------ the walk: ImageFolder's order, no file twice


def relative_make_dataset(root: Path) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import find_classes, make_dataset

    found = make_dataset(str(root), find_classes(str(root))[1], fi.IMG_EXTENSIONS, allow_empty=True)
    return [(os.path.relpath(path, root), label) for path, label in found]


def test_the_walk_equals_torchvisions_make_dataset_on_an_ordinary_tree(tree, tmp_path):
    """Nested and linked folders, mixed-case extensions, other files: the same samples, labels and order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert fi.IMG_EXTENSIONS == IMG_EXTENSIONS
    (tree / "class1" / "b" / "a").mkdir(parents=True)
    (tree / "class1" / "a b").mkdir()
    for folder, name in [("class1/b/a", "z.Png"), ("class1/a b", "y.jpg"), ("class1", "Z.jpg"), ("class1/b", "x.tif")]:
        noise().save(tree / folder / name, format="PNG" if name.endswith("Png") else "JPEG")
    (tree / "class1" / "b" / "readme").write_text("")
    outside = tmp_path / "outside"
    outside.mkdir()
    noise().save(outside / "linked.jpg")
    (tree / "class2" / "more").symlink_to(outside)  # a link to a folder met nowhere else: followed
    idx = index(tree, max_bad_fraction=0.5)  # x.tif: a JPEG named .tif, kept
    assert idx.samples == relative_make_dataset(tree)
    assert ("class2/more/linked.jpg", 2) in idx.samples and ("class1/b/a/z.Png", 1) in idx.samples


def test_a_symlink_loop_is_entered_once_and_named(tree, caplog):
    """torchvision walks `class0/loop -> ..` down to the path length limit, each time under label 0."""
    expected = index(tree).samples
    (tree / "class0" / "loop").symlink_to("..")
    (tree / "class2" / "sub" / "up").symlink_to("../..")  # back to the root from a nested folder
    (tree / "class1" / "self").symlink_to(".")  # back to its class folder
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        idx = index(tree)
    assert idx.samples == expected
    loops = [("class0/loop -> ..", "the dataset root"), ("class2/sub/up -> ../..", "the dataset root")]
    for link, target in [*loops, ("class1/self -> .", "class1")]:
        assert f"skipped {link}: it leads back to {target}, which contains it (a loop" in caplog.text
    assert "remove the link" in caplog.text


def test_a_second_way_into_a_folder_is_skipped_and_named(tree, tmp_path, caplog):
    """No file is indexed twice: not through a link into another class folder (it would get that folder's
    label too), nor through a second link to a folder outside the tree."""
    outside = tmp_path / "outside"
    outside.mkdir()
    noise().save(outside / "shared.jpg")
    (tree / "class0" / "shared").symlink_to(outside)
    expected = relative_make_dataset(tree)  # no second way in yet
    (tree / "class0" / "alias").symlink_to(tree / "class1")
    (tree / "class2" / "shared").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        idx = index(tree)
    assert idx.samples == expected and ("class0/shared/shared.jpg", 0) in expected
    assert (
        f"skipped class0/alias -> {tree / 'class1'}: it leads to class1, whose images are indexed there" in caplog.text
    )
    assert f"skipped class2/shared -> {outside}: it leads to class0/shared, whose images" in caplog.text


# ------------------------------------------------------------------ content: checksums, in-place changes, --recheck


def test_a_jpeg_corrupted_in_place_with_its_size_and_mtime_is_checked_again(tree, monkeypatch, caplog):
    first = index(tree)
    original = (tree / "class1" / "1.jpg").read_bytes()
    overwrite_in_place(tree / "class1" / "1.jpg")
    checked = recording_checks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        idx = index(tree, max_bad_fraction=0.1)
    assert checked == ["class1/1.jpg"]  # its ctime changed; the others keep their verdicts
    assert idx.bad == [("class1/1.jpg", "not an image")] and ("class1/1.jpg", 1) not in idx.samples
    assert "the bytes of 1 indexed file(s) changed since they were checked, and were checked again: class1/1.jpg" in (
        caplog.text
    )
    assert "left out 1 of 15 images that fail the decode check" in caplog.text and "class1/1.jpg (not an image)" in (
        caplog.text
    )
    assert idx.content != first.content
    (tree / "class1" / "1.jpg").write_bytes(original)  # repaired: back in, with the first content digest
    assert index(tree) == first


def test_the_content_digest_is_the_pixels_not_the_names(tree, tmp_path):
    """Same names and labels, other bytes: another digest. The same bytes in another folder: the same one."""
    import shutil

    copy = shutil.copytree(tree, tmp_path / "copy")
    other = make_image_folder(tmp_path / "other", classes=3, per_class=4, size=16, seed=5)
    for rel in ("class0/with space.jpg", "class1/UPPER.JPEG", "class2/sub/gray.jpg", "class0/notes.txt"):
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_bytes((tree / rel).read_bytes())
    a, b, c = index(tree), index(copy), index(other)
    assert a.samples == b.samples == c.samples
    assert a.content == b.content != c.content


def test_recheck_reads_every_file_whatever_its_stat_says(tree, monkeypatch, caplog):
    """--recheck finds bytes that changed under an unchanged stat line (bit rot on a disk, a file system whose
    times lie): here the stored checksum of one file is made stale by hand."""
    idx = index(tree)
    stored = idx.file_list.with_name("files.txt")
    lines = stored.read_text().splitlines(keepends=True)
    stale = next(i for i, line in enumerate(lines) if line.endswith("\tclass2/2.jpg\n"))
    label, stat, checksum, reason, rel = lines[stale].split("\t", 4)
    lines[stale] = "\t".join([label, stat, "0" * len(checksum), reason, rel])
    stored.write_text("".join(lines))
    checked = recording_checks(monkeypatch)
    assert index(tree) == idx and checked == []  # the stat lines match: nothing read
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        assert index(tree, recheck=True) == idx
    assert len(checked) == 15
    assert "the bytes of 1 indexed file(s) changed since they were checked, and were checked again: class2/2.jpg" in (
        caplog.text
    )
    assert stored.read_text().splitlines()[stale].split("\t")[2] == checksum  # the index holds the true one again


def test_cli_recheck_reports_and_leaves_out_a_file_changed_in_place(tree):
    assert cli(tree, "--workers", "1", "--no-progress").returncode == 0
    overwrite_in_place(tree / "class0" / "2.jpg")
    run = cli(tree, "--recheck", "--workers", "1", "--no-progress", "--max-bad-fraction", "0.1")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("read and checked every file again: 14 good, 1 bad images in 3 classes")
    assert "changed since they were checked, and were checked again: class0/2.jpg" in run.stderr
    assert "class0/2.jpg (not an image)" in run.stderr


# ------------------------------------------------------------------ messages name the key that gave the root


def test_messages_about_a_root_name_its_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'vall'} does not exist .*; point data.val_root at"):
        index(tmp_path / "vall", key="data.val_root")
    (tmp_path / "flat").mkdir()
    noise().save(tmp_path / "flat" / "a.jpg")
    with pytest.raises(FileNotFoundError, match="has no class subfolders: point data.knn_train_root at"):
        index(tmp_path / "flat", key="data.knn_train_root")


def test_knn_evaluation_names_the_key_of_a_missing_folder(tmp_path):
    """A typo in data.val_root used to be reported as data.root's, after the whole training run."""
    from fastreg.config import DataConfig, TeacherConfig, TrainConfig
    from fastreg.eval import knn_eval_run
    from fastreg.students import Student

    train = make_image_folder(tmp_path / "train", per_class=4)
    for val, knn_root, key in [
        (tmp_path / "vall", None, "data.val_root"),
        (train, tmp_path / "bank", "data.knn_train_root"),
    ]:
        data = DataConfig(loader="torchvision", root=str(train), val_root=str(val), crop_size=32)
        data.knn_train_root = None if knn_root is None else str(knn_root)
        cfg = TrainConfig(teacher=TeacherConfig(arch="cnn_small", checkpoint="random"), data=data)
        cfg.eval.workers, cfg.eval.batch_size = 0, 4
        with pytest.raises(FileNotFoundError, match=f"point {key} at an ImageFolder"):
            knn_eval_run(Student("cnn_tiny").backbone, cfg, torch.device("cpu"))


def test_after_a_loader_failure_unchanged_files_are_all_read_and_none_blamed(tree, monkeypatch, caplog):
    """When no file was written since it was checked, every file is read again before the failure is declared
    not the files' (the loader then re-raises its own error)."""
    idx = index(tree)
    checked = recording_checks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        assert fi.recheck_after_failure(idx, "the DALI pipeline (x)") is None
    assert len(checked) == 15
    assert "no file that the DALI pipeline (x) read was written since it was checked; reading all 15" in caplog.text
    assert "every file the DALI pipeline (x) read still passes the decode check" in caplog.text
    assert index(tree) == idx
