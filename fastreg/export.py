"""Export a trained student: its backbone alone, as a plain state_dict with torchvision's key names.

    python -m fastreg.export runs/r18/ckpt_epoch0130.pt resnet18_simreg.pt [--force]

An existing file is replaced only with --force, and never the checkpoint being exported (nor another name of it: a
hard link, a symlink) or a read-only file. The heads, loss state (SEED's queue), optimizer, scaler and RNG state of the trainer checkpoint are
dropped. The weights are checked before anything is written: they must load into the whole network of the
library the student came from (`torchvision.models.<arch>()`, timm's `tf_efficientnet_b0`, SEED's MobileNet-v3-L as
`fastreg.students.SeedMobileNetV3Large()`) with the final classifier Linear's keys (fc.* for ResNets and SEED's
MobileNet-v3-L, classifier.3.* for torchvision's MobileNet-v3-L, classifier.1.* for MobileNet-v2 and torchvision's
EfficientNet-B0, classifier.* for timm's) as the only missing ones, so `model.load_state_dict(sd, strict=False)` is
all a user needs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

from fastreg import checkpoint
from fastreg.messages import listing
from fastreg.students import STUDENTS, Student


def read_checkpoint(path: str | Path) -> dict:
    """A trainer checkpoint or a state_dict (fastreg.checkpoint.read), or an error saying why the file is neither."""
    obj = checkpoint.read(
        path,
        "file",
        "check the path (trainer checkpoints are runs/<name>/ckpt_epochNNNN.pt)",
        verdict="is not a torch checkpoint",
    )
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a trainer checkpoint or a state_dict")
    return obj


def checkpoint_arch(ckpt: dict, path: str | Path) -> str:
    """config.student.arch of a trainer checkpoint."""
    arch = ((ckpt.get("config") or {}).get("student") or {}).get("arch")
    if arch not in STUDENTS:
        raise ValueError(f"{path}: config.student.arch={arch!r} is not one of {', '.join(STUDENTS)}")
    return arch


def check_keys(state_dict: dict, arch: str, path: str | Path, fix: str) -> None:
    """Raise ValueError unless `state_dict` is a whole `arch` backbone; the message names the file `path` it came
    from and ends with `fix`, what to do.

    The papers' archs: it must load into the whole network of the student's library (STUDENTS[arch].network:
    torchvision's, timm's or SEED's MobileNet-v3-L) with nothing unexpected and nothing missing but the final
    classifier Linear the student drops (STUDENTS[arch].final_linear: fc, classifier.3, classifier.1 or classifier);
    MobileNet-v3-L's Linear 960->1280 is part of the student and must be there.
    Other archs (the demo CNNs): it must load strictly into Student(arch).backbone.
    """
    final = STUDENTS[arch].final_linear
    if final is not None:
        reference = STUDENTS[arch].network()
        droppable = {f"{final}.{k}" for k in reference.get_submodule(final).state_dict()}  # {final}.weight, .bias
    else:
        reference, droppable = Student(arch).backbone, set()
    try:
        missing, unexpected = reference.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a shape mismatch raises even with strict=False
        raise ValueError(f"the student weights of {path} do not fit {arch}: {e}; {fix}") from e
    missing = [k for k in missing if k not in droppable]
    if missing or unexpected:
        raise ValueError(
            f"the student weights of {path} do not fit {arch}: missing keys [{listing(missing)}], unexpected keys "
            f"[{listing(unexpected)}]; {fix}"
        )


# The fix when a trainer checkpoint's student weights are not of the arch its config names.
WRONG_ARCH = (
    "its config.student.arch does not describe its weights: the file was changed, or written by something other than "
    "fastreg.train. Use a checkpoint that fastreg.train wrote (runs/<name>/ckpt_epochNNNN.pt)"
)


def student_state_dict(checkpoint_path: str | Path) -> tuple[dict, str]:
    """(state_dict, arch) of a trainer checkpoint's student backbone, checked by check_keys."""
    ckpt = checkpoint.check_entries(
        read_checkpoint(checkpoint_path),
        Path(checkpoint_path),
        ("student", "config"),
        "Export the checkpoint that fastreg.train wrote (runs/<name>/ckpt_epochNNNN.pt)",
    )
    arch = checkpoint_arch(ckpt, checkpoint_path)
    state_dict = ckpt["student"]
    check_keys(state_dict, arch, checkpoint_path, WRONG_ARCH)
    return state_dict, arch


def export_student(checkpoint_path: str | Path, out_path: str | Path, force: bool = False) -> Path:
    """Write the student backbone of a trainer checkpoint alone, atomically; returns the written path."""
    export(Path(checkpoint_path), Path(out_path), force)
    return Path(out_path)


def export(source: Path, out: Path, force: bool) -> tuple[dict, str]:
    """(state_dict, arch) of the student, written to `out` once the destination passed check_destination."""
    check_destination(source, out, force)
    state_dict, arch = student_state_dict(source)
    _write(state_dict, out)
    return state_dict, arch


def check_destination(source: Path, out: Path, force: bool) -> None:
    """Refuse, before anything is read or written, a destination the export would write badly, each with one
    line that names the path and the fix: the checkpoint itself under any name (even with --force: the
    trainer checkpoint's optimizer, heads and progress would be lost), a directory, an existing file without
    --force, a read-only file, and a folder that is a file or read-only. Read-only means by the mode bits as
    well as for this user, so that root, who may write anywhere, is refused the same files as anyone."""
    if out.exists() and source.exists() and os.path.samefile(source, out):  # the same path, a hard link, a symlink
        raise ValueError(
            f"{out} is the checkpoint being exported ({source}): the student alone would replace the trainer "
            "checkpoint, and its heads, optimizer and progress would be lost (--force does not allow it). Give "
            f"another destination, e.g. {source.with_name(source.stem + '_student.pt')}"
        )
    if out.is_dir():
        raise ValueError(f"{out} is a directory: give the file to write in it, e.g. {out / 'student.pt'}")
    if out.exists() or out.is_symlink():
        if not force:
            raise ValueError(f"{out} already exists: pass --force to replace it, or give another destination")
        if not out.is_symlink() and read_only(out):  # a symlink is replaced, not the file it points to
            raise ValueError(
                f"{out} is read-only (mode {out.stat().st_mode & 0o777:o}), and --force does not replace a "
                f"read-only file: make it writable (chmod u+w {out}) or give another destination"
            )
    folder = next(p for p in out.absolute().parents if p.exists())  # the folder to write in, or to create it in
    if not folder.is_dir():
        raise ValueError(f"{out} cannot be written: {folder} is a file, not a folder; give a destination in a folder")
    if read_only(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"{out} cannot be written: the folder {folder} is read-only (mode {folder.stat().st_mode & 0o777:o}); "
            "give a destination in a folder you can write to, or make it writable"
        )


def read_only(path: Path, access: int = os.W_OK) -> bool:
    """No write bit in the mode, or no write access for this user."""
    return not (path.stat().st_mode & 0o222 and os.access(path, access))


def _write(state_dict: dict, out: Path) -> None:
    """`out`, written atomically; a failure (a read-only disk, a full one) in one line."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_save(state_dict, out)
    except OSError as e:
        raise ValueError(f"{out} was not written ({e.strerror or e}): give another destination") from e


def load_hint(arch: str, path: Path) -> str:
    """Python lines that load an exported `arch` student from `path`."""
    load = f"sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True)"
    dim, final, code = STUDENTS[arch].dim, STUDENTS[arch].final_linear, STUDENTS[arch].network_code
    if final is None:
        return f"import torch\nfrom fastreg.students import Student\n{load}\nmodel = Student({arch!r}).backbone\nmodel.load_state_dict(sd)"
    attr = re.sub(r"\.(\d+)", r"[\1]", final)  # classifier.3 -> classifier[3]
    library = code.split("(")[0].rsplit(".", 1)[0]  # torchvision.models, timm, fastreg.students
    return (
        f"import torch, {library}\n{load}\nmodel = {code}\n"
        f"model.load_state_dict(sd, strict=False)  # only {final}.* is missing\n"
        f"model.{attr} = torch.nn.Identity()  # {dim}-d features (eval() turns any dropout before it off)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastreg.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="trainer checkpoint (ckpt_epochNNNN.pt)")
    parser.add_argument("out", help="where to write the student's state_dict (.pt)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing file (never the checkpoint itself, or a read-only file)",
    )
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        state_dict, arch = export(Path(args.checkpoint), out, args.force)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    n_params = sum(t.numel() for t in state_dict.values() if isinstance(t, torch.Tensor))
    print(f"wrote {out}: {arch} backbone, {len(state_dict)} tensors, {n_params / 1e6:.2f}M values")
    print("load it with:\n" + "\n".join(f"  {line}" for line in load_hint(arch, out).splitlines()))


if __name__ == "__main__":
    sys.exit(main())
