"""What a training config asks of the machine, checked before any work: the paths it names, the memory of one
step, and the folders it writes.

A mistake found here costs a second; found by the work, it costs the work before it: a wrong data.val_root
surfaced after the last epoch, a patch size too large for the memory after the data was indexed and the
teacher loaded. `check_before_work` runs first in the Trainer (and must in anything else that starts work from
a TrainConfig). It reads no image, loads no weights and builds no index: it stats paths, builds the student on
the meta device (no memory, no compute), and creates only trainer.out_dir and the cache folders, last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from fastreg import files
from fastreg.checkpoint import RESUME_FIX
from fastreg.config import TeacherConfig, TrainConfig
from fastreg.distributed import launch
from fastreg.index import class_folders, find_samples
from fastreg.messages import listing
from fastreg.placement import AMP_DTYPES, pick_device
from fastreg.run_log import make_out_dir
from fastreg.step_graph import check_device
from fastreg.students import Student
from fastreg.teachers import TEACHERS, stored_dtype


def check_before_work(cfg: TrainConfig) -> None:
    """Raise FileNotFoundError, ValueError or OSError (fastreg.train.USER_ERRORS), naming the key and the fix,
    for every path the config names that is missing or of the wrong kind (all of them in one message), a step
    that cannot fit in memory, or an output folder that cannot be written."""
    check_paths(cfg)
    _, local_rank, world = launch()
    device = pick_device(cfg.trainer.device, "trainer.device", local_rank)
    if cfg.trainer.cuda_graph:
        check_device(device, world)
    check_teacher_inputs(cfg)
    check_memory(cfg, device)
    make_out_dir(Path(cfg.trainer.out_dir))
    if cfg.data.loader != "synthetic" or cfg.data.val_root is not None:
        files.cache_folder("index")  # the loaders and the k-NN index their folders there
    # the demo's own cache folder is checked by fastreg.demo.run_demo, before it builds the data it names here


# What each path key must be, and what to do when it is not: (a directory?, the fix). A teacher's keys by their
# last part: teacher.checkpoint, teachers.<i>.checkpoint.
PATHS = {
    "data.root": (True, "point data.root at the training ImageFolder (one subfolder of images per class)"),
    "data.val_root": (
        True,
        "point data.val_root at the labelled ImageFolder of the k-NN evaluation, or set data.val_root=null to "
        "train without one",
    ),
    "data.knn_train_root": (
        True,
        "point data.knn_train_root at the ImageFolder of the k-NN memory bank, or set data.knn_train_root=null to "
        "use data.root",
    ),
    "data.file_list": (
        False,
        "point data.file_list at the 'relpath label' list of data.root's images, or set data.file_list=null to "
        "scan data.root",
    ),
    "checkpoint": (
        False,
        "set {key} to the teacher's weights file ({key}=random: an untrained teacher, for benchmarks and tests)",
    ),
    "cache": (True, "point {key} at the folder python -m fastreg.cache_teacher wrote, or unset it"),
    "trainer.resume": (False, RESUME_FIX),
}


def check_paths(cfg: TrainConfig) -> None:
    """Every path the config names exists and is a directory or a file as its key says; one message for all."""
    problems = [path_problem(key, value) or folder_problem(key, value) for key, value in used_paths(cfg).items()]
    problems = [p for p in problems if p] or [p for p in [class_problem(cfg)] if p]
    if len(problems) == 1:
        raise FileNotFoundError(problems[0])
    if problems:
        raise FileNotFoundError(f"{len(problems)} paths of this config are wrong:\n  " + "\n  ".join(problems))


def used_paths(cfg: TrainConfig) -> dict[str, str]:
    """The paths the run will read, by key: cfg.paths() less those it will not open."""
    paths = cfg.paths()
    if cfg.data.loader == "synthetic":  # random tensors: no training folder read
        paths.pop("data.root", None)
        paths.pop("data.file_list", None)
    for key, t in zip(cfg.teacher_keys, cfg.teachers):
        if t.checkpoint == "random" or t.cache is not None:  # a cached teacher never loads its checkpoint
            paths.pop(f"{key}.checkpoint", None)
    if cfg.trainer.resume not in ("auto", "none"):
        paths["trainer.resume"] = cfg.trainer.resume
    return paths


def path_problem(key: str, value: str) -> str | None:
    """'<key>=<value> does not exist: <fix>', or is not a directory (a file); None when it is as it should be."""
    is_dir, fix = PATHS.get(key) or PATHS[key.rsplit(".", 1)[-1]]
    path = Path(value).expanduser()
    if is_dir and path.is_dir() or not is_dir and path.is_file():
        return None
    wrong = "does not exist" if not path.exists() else "is not a directory" if is_dir else "is not a file"
    return f"{key}={value} {wrong}: {fix.format(key=key)}"


# The k-NN's folders, read after the training: scanned for images here (data.root is indexed before the first step).
EVAL_FOLDERS = ("data.val_root", "data.knn_train_root")


def folder_problem(key: str, value: str) -> str | None:
    """The index's error about an evaluation folder without images (empty, no class subfolders, no image files in
    them), found by its walk alone: no file is opened. None when the folder holds images, or is not one."""
    if key not in EVAL_FOLDERS:
        return None
    try:
        find_samples(value, key=key)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def class_problem(cfg: TrainConfig) -> str | None:
    """The k-NN's bank and queries must have the same class folders, since a label is an index into them: else
    every figure would be wrong, or the final evaluation would stop on it after the training."""
    d = cfg.data
    bank_key = "data.knn_train_root" if d.knn_train_root else "data.root"
    bank = d.knn_train_root or d.root
    if d.val_root is None or not Path(bank).expanduser().is_dir() or d.file_list and not d.knn_train_root:
        return None  # no k-NN, a synthetic bank, or a bank whose classes a file list gives
    bank_classes, val_classes = (set(class_folders(Path(r).expanduser())) for r in (bank, d.val_root))
    if bank_classes == val_classes:
        return None
    only = [
        f"only in {key}: {listing(sorted(names))}"
        for key, names in ((bank_key, bank_classes - val_classes), ("data.val_root", val_classes - bank_classes))
        if names
    ]
    return (
        f"{bank_key}={bank} and data.val_root={d.val_root} have different class folders ({'; '.join(only)}): the "
        "k-NN's labels index them, so point both at ImageFolders of the same classes"
    )


# ---------------------------------------------------------------------------------------------- memory


def check_memory(cfg: TrainConfig, device: torch.device, memory: tuple[int, str] | None = None) -> None:
    """Refuse a step that cannot fit: a lower bound of its memory (step_bytes, then the teachers' teacher_bytes)
    above what the device has. memory: (bytes, what they are) instead of device_memory(device), for tests."""
    images, activations = step_bytes(cfg, device)
    have, where = memory or device_memory(device)
    d = cfg.data
    if images + activations > have:
        patches = f" + data.small_patches={d.small_patches} x {d.small_patch_size}^2" if d.small_patches else ""
        views = "2 x " if d.teacher_view == "weak" else ""
        kept = f" + the student's activations kept for its backward, {gb(activations)}" if activations else ""
        raise ValueError(
            f"one training step needs at least {gb(images + activations)} (the images, {gb(images)}: data.batch_size="
            f"{d.batch_size} x ({views}data.crop_size={d.crop_size}^2{patches}) pixels x 3 channels{kept}), more "
            f"than the {gb(have)} of {where}: lower data.batch_size, data.small_patches, data.small_patch_size or "
            "data.crop_size"
        )
    teachers = teacher_bytes(cfg)
    weights = sum(t.weights for t in teachers)
    forward = max((t.forward for t in teachers), default=0)  # one teacher's forward at a time
    if images + activations + weights + forward <= have:
        return
    big = max(teachers, key=lambda t: t.weights + t.forward)
    parts = "; ".join(t.describe() for t in teachers)
    i = cfg.teacher_keys.index(big.key)
    which = f" --teacher {i}" if i else ""
    smaller = f", store it in bf16 ({big.key}.dtype=bf16: half its weights)" if big.bytes_per_weight == 4 else ""
    raise ValueError(
        f"one training step needs at least {gb(images + activations + weights + forward)}: the student's step, "
        f"{gb(images + activations)} (its images and activations), and the teachers', {gb(weights + forward)} "
        f"({parts}), more than the {gb(have)} of {where}. Lower data.batch_size{smaller}, or train without "
        f"teacher {big.name!r}'s forward: cache its features: python -m fastreg.cache_teacher OUT{which} <same "
        f"overrides>, then train with {big.key}.cache=OUT"
    )


def gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def step_bytes(cfg: TrainConfig, device: torch.device) -> tuple[int, int]:
    """(images, activations): a lower bound, in bytes, of one step's memory on `device`, in two parts.

    images       what the loader hands over per step: B x (crop^2 x views + P x patch^2) x 3 x itemsize, views 2
                 with data.teacher_view=weak; float16 from DALI on a GPU under autocast, else float32.
    activations  what autograd keeps from the student's forward until its backward, B x (saved(crop) + P x
                 saved(patch)), at the autocast dtype's size (bf16/fp16: 2 bytes, fp32: 4). 0 with
                 trainer.compile: inductor may recompute some of them in the backward instead of keeping them.
    Left out, so the sum is a lower bound: the weights, gradients and optimizer state, the teachers' forwards
    (no autograd, but each holds a layer's input and output at a time), the decoder's buffers, the allocator's
    slack. Enough to refuse what cannot run, never a run that fits.
    """
    d, t = cfg.data, cfg.trainer
    half = t.precision != "fp32"
    views = 2 if d.teacher_view == "weak" else 1
    pixels = views * d.crop_size**2 + d.small_patches * d.small_patch_size**2
    images = d.batch_size * pixels * 3 * (2 if half and device.type == "cuda" else 4)
    if t.compile:
        return images, 0
    with torch.device("meta"):  # shapes only: no memory, no compute
        student = Student(cfg.student.arch)
    saved = saved_bytes(student, d.crop_size)
    if d.small_patches:
        saved += d.small_patches * saved_bytes(student, d.small_patch_size)
    return images, d.batch_size * saved * (2 if half else 4) // 4


def saved_bytes(student: torch.nn.Module, size: int) -> int:
    """float32 bytes per image of size x size that the forward of `student`, on the meta device, saves for its
    backward: the tensors autograd's saved-tensor hooks see, each storage once (a ReLU in place saves the
    BatchNorm output it overwrote), less the weights and the input. At batch 2, as BatchNorm's batch statistics
    need two values per channel, halved."""
    images = torch.empty(2, 3, size, size, device="meta")
    # _cdata identifies a storage (a meta tensor has no data pointer to compare)
    known = {x.untyped_storage()._cdata for x in [images, *student.parameters(), *student.buffers()]}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storage = x.untyped_storage()
        if storage._cdata not in known:
            saved[storage._cdata] = storage.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        student(images)
    return sum(saved.values()) // 2


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the memory one step of this process has: its GPU's, or the host's RAM shared by
    the processes torchrun started on this host."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{device} ({props.name})"
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return ram // here, "host RAM" if here == 1 else f"host RAM per process ({here} processes on this host)"


# ---------------------------------------------------------------------------------------------- teachers


@cache
def teacher_network(arch: str) -> torch.nn.Module:
    """teacher.arch's network on the meta device: its shapes, no memory (the 7B's in half a second)."""
    with torch.device("meta"):
        return TEACHERS[arch].build()


def patch_size(arch: str) -> int | None:
    """A vision transformer's patch side (timm's patch_embed.patch_size), None for a conv net."""
    embed = getattr(teacher_network(arch), "patch_embed", None)
    return None if TEACHERS[arch].conv or embed is None else embed.patch_size[0]


def teacher_sides(cfg: TrainConfig, t: TeacherConfig) -> list[tuple[str, int]]:
    """(the key that sets it, the side in px) of each square image a teacher's forward takes: its view (its
    input_size, else the crop), and SEED's small patches, which the Distiller gives the teachers too (resized to
    teacher.input_size as well, when it is set)."""
    d = cfg.data
    if t.input_size is not None:
        return [(f"{key_of(cfg, t)}.input_size", t.input_size)]
    sides = [("data.crop_size", d.crop_size)]
    if d.small_patches:
        sides.append(("data.small_patch_size", d.small_patch_size))
    return sides


def key_of(cfg: TrainConfig, t: TeacherConfig) -> str:
    return next(key for key, other in zip(cfg.teacher_keys, cfg.teachers) if other is t)


def check_teacher_inputs(cfg: TrainConfig) -> None:
    """A vision transformer teacher cuts its input into patches: every side it sees must be a multiple of its
    patch size, or timm's patch embedding stops the first step on an assertion. A cached teacher runs no forward."""
    problems = []
    for key, t in zip(cfg.teacher_keys, cfg.teachers):
        patch = None if t.cache else patch_size(t.arch)
        bad = [(k, side) for k, side in teacher_sides(cfg, t) if patch and side % patch]
        if not bad:
            continue
        seen = " and ".join(f"{k}={side}" for k, side in bad)
        nearest = " and ".join(str(max(patch, round(side / patch) * patch)) for _, side in bad)
        trained = 224 if 224 % patch == 0 else 16 * patch  # DINO, DINOv2 and DINOv3 were trained at 224
        if t.input_size is not None:
            fix = f"set {key}.input_size={trained} or another multiple of {patch} ({nearest} is the nearest)"
        else:
            fix = (
                f"set {key}.input_size={trained} (a multiple of {patch}: the teacher resizes every image to it), or "
                f"{' and '.join(k for k, _ in bad)} to {'multiples' if len(bad) > 1 else 'a multiple'} of {patch} "
                f"({nearest} {'are' if len(bad) > 1 else 'is'} the nearest)"
            )
        problems.append(
            f"{key}.arch={t.arch} cuts its input into {patch} x {patch} px patches, and {seen} is not a multiple of "
            f"{patch}: {fix}"
        )
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class TeacherBytes:
    """A teacher's memory on the device: its weights, and the most its forward holds at once (teacher_bytes)."""

    key: str
    name: str
    params: int
    bytes_per_weight: int
    forward: int
    forward_is: str  # how `forward` was counted, for the message

    @property
    def weights(self) -> int:
        return self.params * self.bytes_per_weight

    def describe(self) -> str:
        dtype = {2: "bf16/fp16", 4: "float32"}[self.bytes_per_weight]
        text = f"{self.name!r}: weights {gb(self.weights)} ({self.params / 1e9:.2f}B parameters in {dtype})"
        return text + (f", forward {gb(self.forward)} ({self.forward_is})" if self.forward else "")


def teacher_bytes(cfg: TrainConfig) -> list[TeacherBytes]:
    """A lower bound of each teacher's memory on the device; a cached teacher (teacher.cache) has none: its table is
    small next to a network, and no forward runs.

    weights   parameters x the bytes of the dtype they are kept in: bf16 where fastreg.teachers stores them so
              (teacher.dtype=bf16, or auto for a 1B+ transformer in a bf16 run), else float32 (autocast casts
              each layer's weights as it runs, and keeps the float32 ones); a conv teacher under autocast counts
              2 bytes, as it is folded into the autocast dtype on a GPU. A projection head is left out.
    forward   a vision transformer's forward holds, at its MLP, the block's input (the residual stream, needed for
              the residual add) and the MLP's first layer outputs together (fc1; both fc1_g and fc1_x of a SwiGLU,
              the doubled fc1 of a GLU MLP): per image, tokens x (dim x r + hidden x h) bytes, with tokens =
              (side / patch)^2 + the class and register tokens, hidden = the summed widths of the MLP's linear
              layers but its last, r the residual's bytes (4 under autocast, which keeps the stream in float32; 2
              when stored in bf16) and h the linear layers' output bytes (2 under autocast or in bf16, else 4).
              So dim x (r + h x mlp ratio) bytes per token: at least 5 x dim x 2 for DINOv2/v3 in bf16. The view's
              forward (data.batch_size images) and the small patches' (batch x data.small_patches) run one after
              the other: the larger counts. Left out: attention (fused, SDPA), the norms' outputs, the resized
              images. A conv teacher's forward is left out.
    """
    amp = AMP_DTYPES[cfg.trainer.precision]
    d, out = cfg.data, []
    for key, t in zip(cfg.teacher_keys, cfg.teachers):
        if t.cache:
            continue
        arch, network = TEACHERS[t.arch], teacher_network(t.arch)
        params = sum(p.numel() for p in network.parameters())
        if arch.conv:
            stored = torch.bfloat16 if t.dtype == "bf16" else amp
            out.append(TeacherBytes(key, t.name or t.arch, params, 2 if stored else 4, 0, ""))
            continue
        stored = stored_dtype(t, params, amp, conv=False)
        per_weight = 2 if stored else 4
        residual, hidden_bytes = (2, 2) if stored else (4, 2) if amp else (4, 4)
        patch, dim = patch_size(t.arch), network.embed_dim
        mlp = network.blocks[0].mlp
        hidden = sum(m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)) - dim
        views = [(d.batch_size, side) for _, side in teacher_sides(cfg, t)[:1]]
        if d.small_patches:  # the patches' side: teacher.input_size, else data.small_patch_size
            views.append((d.batch_size * d.small_patches, t.input_size or d.small_patch_size))
        forwards = []
        for images, side in views:
            tokens = (side // patch) ** 2 + network.num_prefix_tokens
            size = images * tokens * (dim * residual + hidden * hidden_bytes)
            forwards.append(
                (size, f"{images} images x {tokens} tokens x ({dim} x {residual} + {hidden} x {hidden_bytes}) bytes")
            )
        forward, forward_is = max(forwards)
        out.append(TeacherBytes(key, t.name or t.arch, params, per_weight, forward, forward_is))
    return out
