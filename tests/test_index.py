"""The dataset index: ImageFolder labels, the decode check, the cache, DALI's file_list and the CLI."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from fastreg import index as fi
from fastreg.index import check_image, load_index
from helpers import BAD, add_bad_files, make_image_folder, noise


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
def test_check_image_names_each_bad_kind(tmp_path, kind):
    write, reason = BAD[kind]
    write(tmp_path / "x.jpg")
    assert check_image(tmp_path / "x.jpg").startswith(reason)


def test_check_image_accepts_a_camera_mpo(tmp_path):
    """A camera's JPEG with a second picture appended (Pillow: format MPO): DALI decodes its first one."""
    noise().save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[noise("RGB", 16)])
    assert Image.open(tmp_path / "camera.jpg").format == "MPO"
    assert check_image(tmp_path / "camera.jpg") is None


def test_check_image_accepts_rgb_and_grayscale(tmp_path):
    noise().save(tmp_path / "rgb.jpg")
    noise("L").save(tmp_path / "gray.jpeg")
    assert check_image(tmp_path / "rgb.jpg") is None and check_image(tmp_path / "gray.jpeg") is None


def test_bad_files_are_excluded_listed_and_warned(tree, caplog):
    add_bad_files(tree)
    with caplog.at_level(logging.WARNING, logger="fastreg.index"):
        idx = index(tree, max_bad_fraction=0.5)
    bad_list = idx.file_list.with_name("bad_files.txt")
    assert {rel: reason.split(":")[0] for rel, reason in idx.bad} == {
        f"class1/{name}.jpg": reason.split(":")[0] for name, (_, reason) in BAD.items()}
    assert bad_list.read_text().splitlines() == [f"{rel}\t{reason}" for rel, reason in idx.bad]
    listed = {line.rsplit(" ", 1)[0] for line in idx.file_list.read_text().splitlines()}
    assert len(listed) == len(idx.samples) == 15 and not listed & {rel for rel, _ in idx.bad}
    assert f"left out {len(BAD)} of 20 images" in caplog.text and str(bad_list) in caplog.text


def test_thread_pool_agrees_with_in_thread_check(tree, tmp_path):
    add_bad_files(tree)
    pooled = load_index(tree, workers=2, progress=True, max_bad_fraction=0.5, cache_dir=tmp_path / "pooled")
    in_process = index(tree, max_bad_fraction=0.5)
    assert (pooled.samples, pooled.bad) == (in_process.samples, in_process.bad)


def test_too_many_bad_files_fail_with_the_list(tree):
    add_bad_files(tree)
    with pytest.raises(ValueError, match=r"5 of 20 images \(25.00%\).*max_bad_fraction=0.01") as err:
        index(tree)
    bad_list = next((tree.parent / "cache" / "index").glob("*/bad_files.txt"))
    assert str(bad_list) in str(err.value) and len(bad_list.read_text().splitlines()) == 5


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


def test_cache_is_reused_until_a_file_changes(tree, monkeypatch):
    add_bad_files(tree)
    first = index(tree, max_bad_fraction=0.5)
    with monkeypatch.context() as m:
        m.setattr(fi, "check_image", lambda path: pytest.fail(f"re-decoded {path} despite the cache"))
        assert index(tree, max_bad_fraction=0.5) == first  # bad files and their reasons come back too
    noise().save(tree / "class2" / "new.jpg")
    assert ("class2/new.jpg", 2) in index(tree, max_bad_fraction=0.5).samples


def test_permission_change_rebuilds_the_index(tree, monkeypatch):
    """chmod changes neither size nor mtime, yet a file made unreadable (or readable again) after indexing must
    not keep its old verdict: a listed file that cannot be opened would stop a DALI pipeline mid-epoch."""
    index(tree)
    checked = []
    monkeypatch.setattr(fi, "check_image", lambda path: checked.append(path))
    (tree / "class0" / "0.jpg").chmod(0)
    index(tree)
    assert len(checked) == 15


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


@pytest.mark.parametrize("line, problem", [("class0/0.jpg", "expected 'relative/path label'"),
                                           ("class0/0.jpg -1", "expected 'relative/path label'"),
                                           ("class0/0.jpg 1.5", "expected 'relative/path label'"),
                                           ("/abs/0.jpg 0", "path '/abs/0.jpg' must be relative")])
def test_bad_file_list_lines_are_named(tree, tmp_path, line, problem):
    listing = tmp_path / "list.txt"
    listing.write_text(f"class0/1.jpg 0\n{line}\n")
    with pytest.raises(ValueError, match=f"{listing}, line 2: {problem}"):
        index(tree, file_list=listing)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "fastreg.index", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_summary_and_failure(tree, tmp_path):
    add_bad_files(tree)
    ok = cli(tree, "--workers", "1", "--max-bad-fraction", "0.5", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("15 good, 5 bad images in 3 classes") and "file_list.txt" in ok.stdout
    assert "left out 5 of 20 images" in ok.stderr
    failed = cli(tmp_path / "missing")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith(f"error: dataset root {tmp_path / 'missing'} does not exist")


def test_dali_reads_every_listed_file(tree):
    """DALI's CPU pipeline decodes the whole written file_list, space in a name included."""
    from nvidia.dali import fn, pipeline_def

    add_bad_files(tree)
    idx = index(tree, max_bad_fraction=0.5)

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
