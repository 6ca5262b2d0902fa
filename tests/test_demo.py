"""The embedded demo's data and teacher, built at a tiny size (3 source digits per class), and its door:
`python -m fastreg.demo`, and the demo's refusal of paths meant for a run on one's own data."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from fastreg import demo
from fastreg.students import SmallCNN

SPC = 3  # source digits per class: 1 val + 2 train sources -> 60 train and 20 val images


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def _sources(root: Path, split: str) -> set[int]:
    return {int(p.stem.split("_")[0]) for p in (root / split).rglob("*.jpg")}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return demo.ensure_demo_data(tmp_path_factory.mktemp("cache"), sources_per_class=SPC)


def test_image_folder_layout(small_root):
    for split, views in (("train", demo.TRAIN_VIEWS * (SPC - 1)), ("val", demo.VAL_VIEWS)):
        classes = sorted(p.name for p in (small_root / split).iterdir())
        assert classes == [str(c) for c in range(10)]
        for c in classes:
            jpgs = sorted((small_root / split / c).glob("*.jpg"))
            assert len(jpgs) == views
            for p in jpgs:
                with Image.open(p) as img:
                    img.load()  # a full decode, not just the header
                    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (demo.SIZE, demo.SIZE)


def test_val_digits_are_unseen_in_train(small_root):
    train, val = _sources(small_root, "train"), _sources(small_root, "val")
    assert len(train) == 10 * (SPC - 1) and len(val) == 10
    assert not train & val


def test_build_is_deterministic(small_root, tmp_path):
    again = demo.ensure_demo_data(tmp_path, sources_per_class=SPC)
    assert again != small_root
    assert _files(again) == _files(small_root)


def test_finished_build_is_reused(small_root, monkeypatch):
    before = _files(small_root)
    monkeypatch.setattr(demo, "render", lambda *a: pytest.fail("rebuilt a finished dataset"))
    assert demo.ensure_demo_data(small_root.parent, sources_per_class=SPC) == small_root
    assert _files(small_root) == before


def test_leftover_temp_dir_is_not_reused(tmp_path):
    # what a killed build leaves behind: a temporary sibling with part of the files
    leftover = tmp_path / f".{demo.DATA_NAME}-spc{SPC}.tmp-killed"
    (leftover / "train" / "0").mkdir(parents=True)
    (leftover / "train" / "0" / "0000_0.jpg").write_bytes(b"truncated")
    root = demo.ensure_demo_data(tmp_path, sources_per_class=SPC)
    assert root.name == f"{demo.DATA_NAME}-spc{SPC}"
    assert len(_files(root)) == 10 * (demo.TRAIN_VIEWS * (SPC - 1) + demo.VAL_VIEWS)


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    render, calls = demo.render, []

    def interrupt_on_the_fifth(digit, rng):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return render(digit, rng)

    monkeypatch.setattr(demo, "render", interrupt_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_data(tmp_path, sources_per_class=SPC)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_publish_race_keeps_the_winner(tmp_path):
    root, tmp = tmp_path / "data", tmp_path / "tmp"
    (root / "train").mkdir(parents=True)
    (tmp / "train").mkdir(parents=True)
    demo._publish(tmp, root)  # root already published by another process: no error
    with pytest.raises(OSError):
        demo._publish(tmp_path / "missing", tmp_path / "other")


def test_teacher_trains_and_is_cached(small_root, tmp_path, monkeypatch):
    rng_before = torch.get_rng_state()
    path = demo.ensure_demo_teacher(tmp_path, small_root, epochs=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG stream is untouched
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    state = torch.load(path, weights_only=True)
    model = SmallCNN((32, 64, 128), num_classes=10)
    assert set(state) == set(model.state_dict()) and "fc.weight" in state
    model.load_state_dict(state)  # strict
    assert all(v.is_contiguous() for v in state.values())  # trained channels_last, saved in the plain layout
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    monkeypatch.setattr(demo, "train_demo_teacher", lambda *a: pytest.fail("retrained a cached teacher"))
    assert demo.ensure_demo_teacher(tmp_path, small_root, epochs=1) == path


def test_teacher_training_is_seeded(small_root):
    a, b = (demo.train_demo_teacher(small_root, epochs=1) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _table() -> demo.ResultTable:
    """The demo's table of a config with knn_k=5 and known figures: the teacher 80/85/78, the untrained student
    10/12/11, the distilled one 45/48.5/58 (majority, weighted, nn1)."""
    from fastreg.config import TeacherConfig, TrainConfig

    cfg = TrainConfig(teachers=[TeacherConfig(arch="cnn_small")], demo=True)  # the demo fills in the paths
    cfg.eval.knn_k = 5

    def figures(majority, weighted, nn1):
        return {"knn5_majority": majority, "knn5_weighted": weighted, "nn1": nn1}

    return demo.result_table(cfg, figures(80.0, 85.0, 78.0), figures(10.0, 12.0, 11.0), figures(45.0, 48.5, 58.0))


def test_table_shows_the_three_knn_figures(capsys):
    demo.print_table(_table())
    out = capsys.readouterr().out
    assert "knn5_majority" in out and "knn5_weighted" in out and "nn1" in out
    assert "48.5" in out and "58.0" in out
    assert "closes 50% of the knn5_weighted gap" in out  # (48.5 - 12) / (85 - 12)


def test_the_table_file_holds_the_printed_figures(tmp_path):
    """results.md, what run_demo writes into its run folder: a Markdown table whose cells are the figures."""
    path = tmp_path / "results.md"
    demo.write_table(_table(), path)
    text = path.read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert rows[0] == ["model", "knn5_majority", "knn5_weighted", "nn1"] and set(rows[1][1]) <= set("-:")
    assert rows[2:] == [
        ["teacher cnn_small", "80.0", "85.0", "78.0"],
        ["student resnet18, untrained", "10.0", "12.0", "11.0"],
        ["student resnet18, distilled", "45.0", "48.5", "58.0"],
    ]
    assert text.startswith("# fastreg demo: SimReg cnn_small -> resnet18 (val top-1 %)\n")
    assert "closes 50% of the knn5_weighted gap" in text
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # no temporary file left


def test_the_demo_writes_its_table_and_curves_into_its_run_folder(tmp_path, monkeypatch, capsys):
    """run_demo at a tiny size (3 source digits per class, a teacher of 1 epoch, 1 epoch of distillation at batch
    8): results.md holds the table, whose student figures are metrics.jsonl's evaluations, before (step 0)
    and after; curves.png draws both."""
    from helpers import logged_lines

    from fastreg import plot

    build, teach = demo.ensure_demo_data, demo.ensure_demo_teacher
    monkeypatch.setattr(demo, "ensure_demo_data", lambda cache: build(cache, sources_per_class=SPC))
    monkeypatch.setattr(demo, "ensure_demo_teacher", lambda cache, root: teach(cache, root, epochs=1))
    run = tmp_path / "run"
    keys = ["trainer.epochs=1", "data.batch_size=8", "trainer.log_every=1", "trainer.progress=false"]
    demo.run_demo(_config([*keys, f"trainer.out_dir={run}"]))
    assert "student cnn_tiny, distilled" in capsys.readouterr().out  # the table printed, as before
    assert (run / "curves.png").is_file()  # the trainer's, at the end of fit
    evaluations = [line for line in logged_lines(run) if "eval/nn1" in line]
    assert [line["step"] for line in evaluations] == [0, 7]  # 60 images / batch 8 = 7 steps
    rows = {line.split(" | ")[0]: line for line in (run / "results.md").read_text().splitlines()}
    for name, line in zip(["| student cnn_tiny, untrained", "| student cnn_tiny, distilled"], evaluations):
        figures = [f"{line[f'eval/{key}']:.1f}" for key in ("knn20_majority", "knn20_weighted", "nn1")]
        assert rows[name] == f"{name} | {' | '.join(figures)} |"
    panels, _ = plot.write_curves(run)
    assert panels[2].series["nn1"] == ([0, 7], [line["eval/nn1"] for line in evaluations])


# ---------------------------------------------------------------- the demo's door


def _config(overrides: list[str]):
    from hydra import compose, initialize_config_module

    from fastreg.config import to_config

    with initialize_config_module("fastreg.configs", version_base="1.3"):
        return to_config(compose("config", overrides=["trainer.out_dir=/tmp/x", *overrides]))


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.root=/some/folder"],
        ["teacher.checkpoint=/w/moco.pth"],
        ["experiment=demo", "data.root=/d", "data.val_root=/v"],
    ],
)
def test_the_demo_refuses_paths_before_any_work(overrides, monkeypatch):
    """Without experiment= the demo runs; paths given for a run on one's own data would be replaced by its own."""
    monkeypatch.setattr(demo, "ensure_demo_data", lambda *a: pytest.fail("built the demo's data"))
    given = ", ".join(o for o in overrides if not o.startswith("experiment="))
    with pytest.raises(ValueError, match=f"^{given} given, but this runs the demo") as err:
        demo.run_demo(_config(overrides))
    assert "add experiment=none" in str(err.value) and "simreg_r50_r18" in str(err.value)


def test_the_demo_without_paths_passes_the_check():
    demo.refuse_paths(_config([]))
    demo.refuse_paths(_config(["experiment=demo", "trainer.epochs=1"]))


def test_train_with_a_data_root_and_no_experiment_stops_with_the_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.train", "data.root=/some/folder"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: data.root=/some/folder given, but this runs the demo"), proc.stderr
    assert "experiment=none" in proc.stderr and "Traceback" not in proc.stderr


def test_fastreg_demo_is_the_demo_experiment(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastreg.demo", "trainer.epochs=3", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["demo"] and job["name"] == "demo" and job["teacher"]["arch"] == "cnn_small"
    assert job["trainer"]["epochs"] == 3  # the overrides reach it
