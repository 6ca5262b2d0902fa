"""fastreg.export: the student backbone alone, loadable into its library (torchvision, timm, SEED's MobileNet-v3-L) with only
the classifier missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from torch import nn

from fastreg.export import export_student, load_hint, main
from fastreg.students import SeedMobileNetV3Large, Student


def _trained_student(arch: str, seed: int = 0) -> Student:
    """A Student whose weights and BN statistics differ from a fresh init (as after training)."""
    student = Student(arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in student.backbone.state_dict().items():  # tensors share the model's storage
            if t.is_floating_point():
                t.add_(0.01 * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_()
    return student.eval()


def _trainer_checkpoint(student: Student, path) -> None:
    """What the trainer writes: the backbone under 'student' plus state export must drop."""
    torch.save(
        {
            "student": student.backbone.state_dict(),
            "heads": {"resnet50": {"0.weight": torch.randn(4, 4)}},
            "loss": {"queue": torch.randn(8, 4)},
            "optimizer": {"state": {}, "param_groups": []},
            "scaler": None,
            "epoch": 3,
            "step": 300,
            "rng": {},
            "config": {"student": {"arch": student.arch}, "data": {"crop_size": 224}},
            "commit": "abc123",
        },
        path,
    )


# the final classifier Linear each paper's network lacks: only its weight and bias may be missing in the library the
# student came from
FINAL_LINEAR = {
    "resnet18": "fc",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3_large": "classifier.3",
    "efficientnet_b0": "classifier.1",
    "efficientnet_b0_tf": "classifier",
    "mobilenet_v3_large_seed": "fc",
}
# that library's whole network, built as its users build it
SOURCE = {
    "efficientnet_b0_tf": lambda: timm.create_model("tf_efficientnet_b0"),
    "mobilenet_v3_large_seed": SeedMobileNetV3Large,  # SEED's network, registered by fastreg (no library has it)
}


@pytest.mark.parametrize("arch", sorted(FINAL_LINEAR))
def test_export_round_trip_into_its_library(tmp_path, arch):
    student = _trained_student(arch)
    _trainer_checkpoint(student, tmp_path / "ckpt.pt")

    out = export_student(tmp_path / "ckpt.pt", tmp_path / "out" / "student.pt")

    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert set(sd) == set(student.backbone.state_dict())  # backbone only: heads, queue, optimizer dropped
    model = SOURCE[arch]() if arch in SOURCE else getattr(torchvision.models, arch)()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    final = FINAL_LINEAR[arch]
    assert sorted(missing) == [f"{final}.bias", f"{final}.weight"] and unexpected == []
    model.set_submodule(final, nn.Identity())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), student(x))
    assert [p.name for p in out.parent.iterdir()] == ["student.pt"]  # no temporary file left behind


def test_mobilenet_v3_without_its_1280_d_linear_is_refused(tmp_path):
    """A backbone that lacks classifier.0 (Linear 960->1280, part of SEED's network) is not a whole student."""
    student = _trained_student("mobilenet_v3_large")
    sd = {k: v for k, v in student.backbone.state_dict().items() if not k.startswith("classifier.0.")}
    torch.save({"student": sd, "config": {"student": {"arch": "mobilenet_v3_large"}}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"missing keys \[classifier\.0\.weight, classifier\.0\.bias\]"):
        export_student(tmp_path / "ckpt.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("arch", ["mobilenet_v3_large", "efficientnet_b0_tf", "mobilenet_v3_large_seed", "cnn_tiny"])
def test_load_hint_gives_the_students_features(tmp_path, arch):
    """The lines the CLI prints, run as printed: the model gives the student's features."""
    student = _trained_student(arch)
    _trainer_checkpoint(student, tmp_path / "ckpt.pt")
    out = export_student(tmp_path / "ckpt.pt", tmp_path / "s.pt")
    scope = {}
    exec(load_hint(arch, out), scope)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), student(x))


def test_resnet18_missing_keys_are_exactly_fc(tmp_path):
    _trainer_checkpoint(_trained_student("resnet18"), tmp_path / "ckpt.pt")
    sd = torch.load(export_student(tmp_path / "ckpt.pt", tmp_path / "s.pt"), weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


def test_export_demo_cnn_loads_strictly_into_student(tmp_path):
    student = _trained_student("cnn_tiny")
    _trainer_checkpoint(student, tmp_path / "ckpt.pt")
    sd = torch.load(export_student(tmp_path / "ckpt.pt", tmp_path / "s.pt"), weights_only=True)
    fresh = Student("cnn_tiny").backbone
    fresh.load_state_dict(sd)  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), student(x))


def test_checkpoint_without_student_is_a_clear_error(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="has no 'student', 'config' entries, which every trainer checkpoint has"):
        export_student(tmp_path / "bad.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_student(tmp_path / "nope.pt", tmp_path / "out.pt")


def test_wrong_keys_are_named_and_nothing_is_written(tmp_path):
    student = Student("resnet18")
    ckpt = {
        "student": {f"module.{k}": v for k, v in student.backbone.state_dict().items()},
        "config": {"student": {"arch": "resnet18"}},
    }  # a DDP-prefixed state_dict
    torch.save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"missing keys \[conv1\.weight.*unexpected keys \[module\.conv1\.weight") as e:
        export_student(tmp_path / "ckpt.pt", tmp_path / "out.pt")
    assert str(e.value).startswith(f"the student weights of {tmp_path / 'ckpt.pt'} do not fit resnet18: ")
    assert str(e.value).endswith("Use a checkpoint that fastreg.train wrote (runs/<name>/ckpt_epochNNNN.pt)")
    assert not (tmp_path / "out.pt").exists()


def test_cli_prints_what_it_wrote_and_how_to_load(tmp_path):
    _trainer_checkpoint(Student("resnet18"), tmp_path / "ckpt.pt")
    run = subprocess.run(
        [sys.executable, "-m", "fastreg.export", str(tmp_path / "ckpt.pt"), str(tmp_path / "r18.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert f"wrote {tmp_path / 'r18.pt'}: resnet18 backbone" in run.stdout
    assert "torchvision.models.resnet18()" in run.stdout and "strict=False" in run.stdout
    assert "model.fc = torch.nn.Identity()  # 512-d features" in run.stdout
    assert (tmp_path / "r18.pt").is_file()


def test_cli_error_is_one_line_not_a_traceback(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "list.pt"), str(tmp_path / "out.pt")])
    assert str(exit_.value) == f"error: {tmp_path / 'list.pt'} holds a list, not a trainer checkpoint or a state_dict"


def test_a_checkpoint_with_a_flipped_byte_is_refused_and_nothing_is_written(tmp_path):
    """torch.load would read the damaged weight without complaint; the zip's CRC-32 catches it."""
    _trainer_checkpoint(_trained_student("cnn_tiny"), tmp_path / "ckpt.pt")
    data = bytearray((tmp_path / "ckpt.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "ckpt.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="fails its CRC-32 check"):
        export_student(tmp_path / "ckpt.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- destinations


def test_cli_exporting_a_checkpoint_onto_itself_is_refused_and_loses_nothing(tmp_path):
    """`python -m fastreg.export CKPT CKPT` once replaced the trainer checkpoint with the bare student."""
    ckpt = tmp_path / "ckpt.pt"
    _trainer_checkpoint(_trained_student("cnn_tiny"), ckpt)
    before = ckpt.read_bytes()
    run = subprocess.run(
        [sys.executable, "-m", "fastreg.export", str(ckpt), str(ckpt), "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    assert run.stderr == (
        f"error: {ckpt} is the checkpoint being exported ({ckpt}): the student alone would replace the trainer "
        "checkpoint, and its heads, optimizer and progress would be lost (--force does not allow it). Give another "
        f"destination, e.g. {tmp_path / 'ckpt_student.pt'}\n"
    )
    assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def _hard_link(tmp, ckpt):
    os.link(ckpt, tmp / "link.pt")
    return tmp / "link.pt"


def _symlink(tmp, ckpt):
    (tmp / "sym.pt").symlink_to(ckpt)
    return tmp / "sym.pt"


def _directory(tmp, ckpt):
    (tmp / "exports").mkdir()
    return tmp / "exports"


def _existing_file(tmp, ckpt):
    (tmp / "student.pt").write_bytes(b"an earlier export")
    return tmp / "student.pt"


def _read_only_file(tmp, ckpt):
    out = _existing_file(tmp, ckpt)
    out.chmod(0o444)  # root may still write it: the mode bits are what export honours
    return out


def _read_only_folder(tmp, ckpt):
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)
    return tmp / "locked" / "student.pt"


def _parent_is_a_file(tmp, ckpt):
    (tmp / "notes").write_text("a file, not a folder")
    return tmp / "notes" / "student.pt"


# each: (how the destination is made, --force given, the message after 'error: <out> ' with {out}, {tmp} filled)
DESTINATIONS = {
    "same_path": (lambda tmp, ckpt: ckpt, True, "is the checkpoint being exported ({ckpt}): "),
    "hard_link": (_hard_link, True, "is the checkpoint being exported ({ckpt}): "),
    "symlink": (_symlink, True, "is the checkpoint being exported ({ckpt}): "),
    "directory": (_directory, False, "is a directory: give the file to write in it, e.g. {out}/student.pt"),
    "existing_file": (_existing_file, False, "already exists: pass --force to replace it, or give another destination"),
    "read_only_file": (
        _read_only_file,
        True,
        "is read-only (mode 444), and --force does not replace a read-only file: make it writable (chmod u+w {out}) "
        "or give another destination",
    ),
    "read_only_folder": (
        _read_only_folder,
        False,
        "cannot be written: the folder {tmp}/locked is read-only (mode 555); give a destination in a folder you can "
        "write to, or make it writable",
    ),
    "parent_is_a_file": (
        _parent_is_a_file,
        False,
        "cannot be written: {tmp}/notes is a file, not a folder; give a destination in a folder",
    ),
}


@pytest.mark.parametrize("case", DESTINATIONS)
def test_a_bad_destination_is_one_line_and_nothing_is_written(tmp_path, case):
    make, force, says = DESTINATIONS[case]
    ckpt = tmp_path / "ckpt.pt"
    _trainer_checkpoint(_trained_student("cnn_tiny"), ckpt)
    out = make(tmp_path, ckpt)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exit_:
        main([str(ckpt), str(out), *(["--force"] if force else [])])
    message = str(exit_.value)
    print(f"[{case}] {message}")  # docs/reliability.md quotes them
    assert message.startswith(f"error: {out} ") and "\n" not in message
    assert says.format(out=out, tmp=tmp_path, ckpt=ckpt) in message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # the source and all else kept


def test_force_replaces_an_earlier_export(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _trainer_checkpoint(_trained_student("cnn_tiny"), ckpt)
    out = _existing_file(tmp_path, ckpt)
    main([str(ckpt), str(out), "--force"])
    assert set(torch.load(out, weights_only=True)) == set(Student("cnn_tiny").backbone.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "student.pt"]


def test_an_exported_student_or_a_checkpoint_without_config_is_named(tmp_path):
    student = _trained_student("cnn_tiny")
    torch.save(student.backbone.state_dict(), tmp_path / "student.pt")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "student.pt"), str(tmp_path / "again.pt")])
    assert str(exit_.value) == (
        f"error: {tmp_path / 'student.pt'} is an exported student backbone (a bare state_dict, what fastreg.export "
        "writes), not a trainer checkpoint: it holds the student's weights alone. Export the checkpoint that "
        "fastreg.train wrote (runs/<name>/ckpt_epochNNNN.pt)"
    )
    _trainer_checkpoint(student, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "no_config.pt")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "no_config.pt"), str(tmp_path / "out.pt")])
    assert str(exit_.value).startswith(
        f"error: {tmp_path / 'no_config.pt'} has no 'config' entry, which every trainer checkpoint has (this file "
        "holds student, heads, loss, optimizer, scaler, epoch, step, rng, commit)"
    )
    assert not (tmp_path / "again.pt").exists() and not (tmp_path / "out.pt").exists()
