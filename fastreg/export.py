"""Export a trained student: its backbone alone, as a plain state_dict with torchvision's key names.

    python -m fastreg.export runs/r18/ckpt_epoch0130.pt resnet18_simreg.pt

The heads, loss state (SEED's queue), optimizer, scaler and RNG state of the trainer checkpoint are
dropped. For torchvision archs the weights are checked before anything is written: they must load
into `torchvision.models.<arch>()` with the final classifier Linear's keys (fc.* for ResNets,
classifier.3.* for MobileNet-v3-L, classifier.1.* for MobileNet-v2 and EfficientNet-B0) as the only
missing ones, so `model.load_state_dict(sd, strict=False)` is all a user needs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
import torchvision

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


def check_keys(state_dict: dict, arch: str) -> None:
    """Raise ValueError unless `state_dict` is a whole `arch` backbone.

    torchvision archs: it must load into torchvision.models.<arch>() with nothing unexpected and nothing
    missing but the final classifier Linear the student drops (STUDENTS[arch].final_linear: fc, classifier.3
    or classifier.1); MobileNet-v3-L's classifier.0 (Linear 960->1280) is part of the student and must be there.
    Other archs (the demo CNNs): it must load strictly into Student(arch).backbone.
    """
    final = STUDENTS[arch].final_linear
    if final is not None:
        reference = torchvision.models.get_model(arch)
        droppable = {f"{final}.{k}" for k in reference.get_submodule(final).state_dict()}  # {final}.weight, .bias
    else:
        reference, droppable = Student(arch).backbone, set()
    try:
        missing, unexpected = reference.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # a shape mismatch raises even with strict=False
        raise ValueError(f"the student weights do not fit {arch}: {e}") from e
    missing = [k for k in missing if k not in droppable]
    if missing or unexpected:
        raise ValueError(
            f"the student weights do not fit {arch}: missing keys [{listing(missing)}], unexpected keys "
            f"[{listing(unexpected)}]"
        )


def student_state_dict(checkpoint_path: str | Path) -> tuple[dict, str]:
    """(state_dict, arch) of a trainer checkpoint's student backbone, checked by check_keys."""
    ckpt = read_checkpoint(checkpoint_path)
    if "student" not in ckpt:
        raise ValueError(
            f"{checkpoint_path} is not a trainer checkpoint: it has no 'student' entry (keys: "
            f"{listing(sorted(map(str, ckpt)))})"
        )
    arch = checkpoint_arch(ckpt, checkpoint_path)
    state_dict = ckpt["student"]
    check_keys(state_dict, arch)
    return state_dict, arch


def export_student(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write the student backbone of a trainer checkpoint alone, atomically; returns the written path."""
    state_dict, _ = student_state_dict(checkpoint_path)
    return _write(state_dict, out_path)


def _write(state_dict: dict, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_save(state_dict, out)
    return out


def load_hint(arch: str, path: Path) -> str:
    """Python lines that load an exported `arch` student from `path`."""
    load = f"sd = torch.load({str(path)!r}, map_location='cpu', weights_only=True)"
    _, dim, final = STUDENTS[arch]
    if final is None:
        return f"import torch\nfrom fastreg.students import Student\n{load}\nmodel = Student({arch!r}).backbone\nmodel.load_state_dict(sd)"
    attr = re.sub(r"\.(\d+)", r"[\1]", final)  # classifier.3 -> classifier[3]
    return (
        f"import torch, torchvision\n{load}\nmodel = torchvision.models.{arch}()\n"
        f"model.load_state_dict(sd, strict=False)  # only {final}.* is missing\n"
        f"model.{attr} = torch.nn.Identity()  # {dim}-d features (eval() turns any dropout before it off)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastreg.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="trainer checkpoint (ckpt_epochNNNN.pt)")
    parser.add_argument("out", help="where to write the student's state_dict (.pt)")
    args = parser.parse_args(argv)
    try:
        state_dict, arch = student_state_dict(args.checkpoint)
        out = _write(state_dict, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    n_params = sum(t.numel() for t in state_dict.values() if isinstance(t, torch.Tensor))
    print(f"wrote {out}: {arch} backbone, {len(state_dict)} tensors, {n_params / 1e6:.2f}M values")
    print("load it with:\n" + "\n".join(f"  {line}" for line in load_hint(arch, out).splitlines()))


if __name__ == "__main__":
    sys.exit(main())
