"""The embedded demo: cluttered UCI digits as a JPEG ImageFolder, and a small teacher trained on them.

`python -m fastreg.demo` (or `python -m fastreg.train` with no experiment=) distills this teacher
(`cnn_small`, trained here with labels) into `cnn_tiny` with SimReg. The data comes with scikit-learn
(`load_digits`: 1,797 8x8 digits), so the demo needs no download. Plain 8x8 digits are too easy to show
anything, so each digit is upscaled and pasted at a random scale, colour and position onto a cluttered,
coloured 40x40 background: an untrained network's features then mostly encode the clutter (k-NN about 10%,
chance), while the supervised teacher reaches 81-89% (20-NN on val, over four seeds).

Both products are built once and cached under `cache_dir`; every write is atomic, so an interrupted
build is never mistaken for a finished one:

    <cache_dir>/digits40-v1/{train,val}/<class>/<source>_<view>.jpg
    <cache_dir>/teacher_cnn_small-digits40-v1-e<epochs>.pt    state_dict of SmallCNN((32, 64, 128), 10)
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # python -m fastreg.demo [key=value ...]: python -m fastreg.train experiment=demo, with the same overrides,
    # output folder (runs/demo) and exit codes. Called from here, before this module's imports (torch, scikit-learn:
    # seconds), so that its stop-signal handling starts on the first line; it imports this module for run_demo.
    from fastreg.train import main

    sys.argv[1:1] = ["experiment=demo"]  # hydra reads its overrides from the command line
    sys.exit(main())

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

import fastreg.configs
from fastreg import files
from fastreg.checkpoint import atomic_save
from fastreg.config import TrainConfig
from fastreg.messages import listing
from fastreg.pipelines import IMAGENET_MEAN, IMAGENET_STD
from fastreg.preemption import cleaned_up
from fastreg.students import SmallCNN

DATA_NAME = "digits40-v1"  # bump the version whenever the rendering changes, so old caches are not reused
SIZE = 40  # image side in pixels
SEED = 0
VAL_FRACTION = 0.25  # of the source digits of each class; their views never appear in train
TRAIN_VIEWS = 3  # random renderings per training source digit: ~1,350 sources -> ~4,050 images
VAL_VIEWS = 2  # ~450 sources -> ~900 images
JPEG_QUALITY = 90
TEACHER_EPOCHS = 6  # 20-NN 84-89% over four seeds, ~1 min on 2 idle cores


# ---------------------------------------------------------------- rendering


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _luma(rgb: np.ndarray) -> float:
    """Perceived brightness (Rec. 601 weights), 0..255."""
    return float(np.dot(rgb, (0.299, 0.587, 0.114)))


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray, min_luma: float = 80) -> tuple[int, int, int]:
    """A random colour whose brightness differs from `background`'s by at least `min_luma` (of 255).

    Brightness, not just any RGB distance: with hue-only contrast (red on an equally bright green) the
    small teacher barely starts learning within the demo's few epochs.
    """
    while True:
        c = rng.integers(0, 256, 3)
        if abs(_luma(c) - _luma(background)) >= min_luma:
            return tuple(int(v) for v in c)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A linear gradient between two random colours, in a random direction: (SIZE, SIZE, 3) float."""
    a, b = rng.integers(0, 256, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    w = np.cos(angle) * xx + np.sin(angle) * yy
    w = (w - w.min()) / (w.max() - w.min())
    return a + (b - a) * w[..., None]


def _draw_clutter(img: Image.Image, rng: np.random.Generator, count: int) -> None:
    """Random rectangles, ellipses, lines and arcs: the arcs and lines look like digit strokes on purpose."""
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        x0, y0 = rng.integers(-4, SIZE, 2)
        w, h = rng.integers(3, 16, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        colour = _random_colour(rng)
        kind = rng.integers(4)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        elif kind == 2:
            x1, y1 = rng.integers(0, SIZE, 2)
            draw.line([int(x0), int(y0), int(x1), int(y1)], fill=colour, width=int(rng.integers(1, 3)))
        else:
            start = int(rng.integers(0, 360))
            draw.arc(box, start, start + int(rng.integers(90, 270)), fill=colour, width=int(rng.integers(1, 3)))


def _paste_digit(canvas: np.ndarray, digit: np.ndarray, rng: np.random.Generator) -> None:
    """Alpha-blend one 8x8 digit (values 0..16), upscaled to a random size, at a random place and colour."""
    side = int(rng.integers(18, 31))
    aspect = rng.uniform(0.8, 1.2)  # slight stretch, so size alone does not identify the source
    w, h = min(SIZE, int(round(side * aspect))), side
    alpha = Image.fromarray((digit * (255 / 16)).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    # the upscaled 8x8 digit is a soft blur; stretching its contrast gives ink-like strokes that a
    # small network finds among the sharp-edged clutter within a few epochs
    alpha = np.clip((np.asarray(alpha, np.float32)[..., None] / 255 - 0.2) / 0.5, 0, 1)
    x, y = rng.integers(0, SIZE - w + 1), rng.integers(0, SIZE - h + 1)
    patch = canvas[y : y + h, x : x + w]
    colour = np.array(_contrasting_colour(rng, patch.reshape(-1, 3).mean(0)), np.float32)
    canvas[y : y + h, x : x + w] = patch * (1 - alpha) + colour * alpha


def render(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One cluttered 40x40 RGB view of an 8x8 digit."""
    img = Image.fromarray(_background(rng).astype(np.uint8))
    _draw_clutter(img, rng, count=int(rng.integers(4, 9)))
    canvas = np.asarray(img, np.float32).copy()
    _paste_digit(canvas, digit, rng)
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    _draw_clutter(img, rng, count=int(rng.integers(0, 3)))  # a few occluders on top of the digit
    canvas = np.asarray(img, np.float32) + rng.normal(0, 12, (SIZE, SIZE, 3))  # sensor-like noise
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------- the dataset on disk


def _split_sources(labels: np.ndarray, sources_per_class: int | None) -> dict[str, np.ndarray]:
    """Source-digit indices of train and val, split per class so both splits hold all ten classes."""
    rng = np.random.default_rng(SEED)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))[:sources_per_class]
        n_val = max(1, round(len(idx) * VAL_FRACTION))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def _write_split(root: Path, split: str, sources: np.ndarray, views: int, progress: Progress) -> None:
    """Render `views` JPEGs of every source digit into `root/split/<class>/<source>_<view>.jpg`."""
    digits = load_digits()
    task = progress.add_task(f"demo {split}", total=len(sources) * views, status="")
    for c in range(10):
        (root / split / str(c)).mkdir(parents=True)
    for s in sources:
        for v in range(views):
            # seeded per (source, view): a view does not depend on which other sources are built
            img = render(digits.images[s], np.random.default_rng((SEED, int(s), v)))
            img.save(root / split / str(digits.target[s]) / f"{s:04d}_{v}.jpg", quality=JPEG_QUALITY)
            progress.advance(task)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder, so the rename that publishes `root` never exposes files or folder entries
    still in the page cache."""
    for path in sorted(root.rglob("*")):
        files.sync(path)
    files.sync(root)


def _publish(tmp: Path, root: Path) -> None:
    """Rename a finished build into place: one atomic step, so `root` holds all of it or does not exist. The
    rename is fsynced as atomic_write's is (fastreg.files)."""
    try:
        os.replace(tmp, root)
    except OSError:
        if not root.is_dir():
            raise
        return  # another process (e.g. another rank) published the same deterministic build first: keep theirs
    files.sync(root.parent)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:>14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )


def ensure_demo_data(cache_dir: Path, sources_per_class: int | None = None) -> Path:
    """Build the demo ImageFolder once (about 5,000 JPEGs) and return its root.

    The build goes to a temporary sibling that is renamed into place when complete; an interrupted
    build (even a killed one, which leaves its `.<name>.tmp-*` directory behind) is never reused.

    Args:
        cache_dir: where the dataset lives; created if missing.
        sources_per_class: use only this many source digits per class (tests); None uses all ~180.

    Returns:
        The root holding `train/<0..9>/*.jpg` and `val/<0..9>/*.jpg`. Val views come from source digits
        that no train view uses, so k-NN on val measures generalisation to unseen digits.
    """
    name = DATA_NAME if sources_per_class is None else f"{DATA_NAME}-spc{sources_per_class}"
    root = Path(cache_dir) / name
    if root.is_dir():  # only a finished build ever carries the final name
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root.parent))
    # gone already after a successful rename; else removed on an error or a stop signal (preemption.stop_now)
    with cleaned_up(lambda: shutil.rmtree(tmp, ignore_errors=True)):
        splits = _split_sources(load_digits().target, sources_per_class)
        with _progress() as progress:
            _write_split(tmp, "train", splits["train"], TRAIN_VIEWS, progress)
            _write_split(tmp, "val", splits["val"], VAL_VIEWS, progress)
        _sync_tree(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        _publish(tmp, root)
    return root


# ---------------------------------------------------------------- the teacher


def load_image_folder(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole (small) ImageFolder split into memory: uint8 images (N, 3, H, W) and labels (N,).

    The demo's images are 40x40, so the ~5,000 of them take 24 MB decoded; decoding once beats
    re-decoding every JPEG in every epoch by far on a 2-core machine.
    """
    folder = ImageFolder(str(root))
    images = torch.stack([pil_to_tensor(img) for img, _ in folder])
    return images, torch.tensor(folder.targets)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalized with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `pad` pixels (edge-replicated): the light augmentation for digits.

    No flips: a mirrored 2 or 5 is another glyph.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def _init_teacher() -> SmallCNN:
    """The teacher with He (fan-out) initialised convolutions, as torchvision's ResNets.

    With PyTorch's default (smaller) conv init the loss sat at chance for several epochs on some seeds;
    with this one every seed tried left the plateau in the first epoch.
    """
    model = SmallCNN((32, 64, 128), num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def train_demo_teacher(data_root: Path, epochs: int = TEACHER_EPOCHS, batch_size: int = 64) -> dict:
    """Train `SmallCNN((32, 64, 128), num_classes=10)` on `data_root/train` with cross-entropy.

    AdamW with a one-cycle schedule: SGD at batch 64-128 stayed at chance for the demo's few epochs.
    Seeded, and run inside a forked RNG so the caller's global torch RNG is left untouched.

    Returns:
        The model's state_dict, classifier (`fc.*`) included.
    """
    images, labels = load_image_folder(Path(data_root) / "train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        gen = torch.Generator().manual_seed(SEED)
        model = _init_teacher().to(memory_format=torch.channels_last)  # ~25% faster convs on CPU too
        # drop_last spares BatchNorm a tiny last batch; min() keeps one batch on a tiny (test) dataset
        batch_size = min(batch_size, len(images))
        loader = DataLoader(TensorDataset(images, labels), batch_size, shuffle=True, drop_last=True, generator=gen)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(loader), pct_start=0.05)
        model.train()
        with _progress() as progress:
            task = progress.add_task("demo teacher", total=epochs * len(loader), status="")
            for epoch in range(epochs):
                for x, y in loader:
                    x = _random_shift(normalize(x), 3, gen).contiguous(memory_format=torch.channels_last)
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    progress.update(task, advance=1, status=f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    return model.to(memory_format=torch.contiguous_format).state_dict()


def ensure_demo_teacher(cache_dir: Path, data_root: Path, epochs: int = TEACHER_EPOCHS) -> Path:
    """Train the demo teacher once on `data_root` and return the path of its cached state_dict.

    The file name carries the dataset's name and the epoch count, so a teacher is never reused for
    other data or another schedule. Loading it with `fastreg.teachers` ignores the `fc.*` classifier.
    """
    path = Path(cache_dir) / f"teacher_cnn_small-{Path(data_root).name}-e{epochs}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(train_demo_teacher(data_root, epochs), path)
    return path


# ---------------------------------------------------------------- the demo run


def recipes() -> list[str]:
    """The papers' recipes: every experiment= but the demo and none."""
    folder = Path(fastreg.configs.__file__).parent / "experiment"
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem not in ("demo", "none"))


def refuse_paths(cfg: TrainConfig) -> None:
    """Stop before any work when the command names data or teacher weights: the demo would replace them with its
    own, and whoever passes them means a run on their data, which needs an experiment= other than the demo."""
    given = cfg.paths()
    if given:
        raise ValueError(
            f"{listing(f'{key}={value}' for key, value in given.items())} given, but this runs the demo "
            "(experiment=demo, the default when no experiment= is given), which builds its own data and teacher "
            "and would replace those. To train on your data, add experiment=none (only the groups and keys you "
            f"pass) or a paper's recipe, experiment=<{'|'.join(recipes())}> (each described in "
            "configs/experiment/<name>.yaml)"
        )


def run_demo(cfg: TrainConfig) -> dict[str, float]:
    """Build (or reuse) the data and the teacher, distill the student, print the k-NN table and write it into the
    run folder as results.md (beside the trainer's curves.png)."""
    refuse_paths(cfg)
    from fastreg.eval import knn_eval_run
    from fastreg.trainer import Trainer

    if cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)  # the teacher's training runs before the Trainer's
    cache = files.cache_folder("demo")  # writable, or an error naming FASTREG_CACHE: before the demo builds anything
    root = ensure_demo_data(cache)
    cfg.data.root, cfg.data.val_root = str(root / "train"), str(root / "val")
    cfg.teachers[0].checkpoint = str(ensure_demo_teacher(cache, root))
    trainer = Trainer(cfg)
    teacher = knn_eval_run(trainer.distiller.teachers[0], cfg, trainer.device)  # in fp32
    before = trainer.evaluate()
    after = trainer.fit()
    table = result_table(cfg, teacher, before, after)
    print_table(table)
    if trainer.is_main:
        write_table(table, Path(cfg.trainer.out_dir) / "results.md")
    return after


@dataclass
class ResultTable:
    """The demo's result: a title, the column names, the rows (a model's name, then its figures) and a closing
    sentence; printed on the console and written as Markdown."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str


def result_table(cfg: TrainConfig, teacher: dict, before: dict, after: dict) -> ResultTable:
    """The three k-NN figures (fastreg.eval.knn_accuracy's keys) of the teacher and the student before and after."""
    from fastreg.eval import knn_label

    k = cfg.eval.knn_k
    keys = (knn_label(k, "majority"), knn_label(k, "weighted"), "nn1")
    weighted = keys[1]
    closed = 100 * (after[weighted] - before[weighted]) / max(1e-9, teacher[weighted] - before[weighted])
    models = [
        (f"teacher {cfg.teachers[0].arch}", teacher),
        (f"student {cfg.student.arch}, untrained", before),
        (f"student {cfg.student.arch}, distilled", after),
    ]
    return ResultTable(
        title=f"fastreg demo: SimReg {cfg.teachers[0].arch} -> {cfg.student.arch} (val top-1 %)",
        columns=["model", *keys],
        rows=[[name, *(f"{r[key]:.1f}" for key in keys)] for name, r in models],
        note=f"the distilled student closes {closed:.0f}% of the {weighted} gap between the untrained student "
        f"and the teacher (loss.center_teacher={cfg.loss.center_teacher}, head={cfg.head.kind})",
    )


def print_table(table: ResultTable) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = Table(title=table.title)
    for i, name in enumerate(table.columns):
        shown.add_column(name, justify="right" if i else "left")
    for row in table.rows:
        shown.add_row(*row)
    console = Console()
    console.print(shown)
    console.print(table.note)


def table_markdown(table: ResultTable) -> str:
    """The table as Markdown: its title as a heading, the rows, the closing sentence."""
    lines = [f"# {table.title}", "", f"| {' | '.join(table.columns)} |", f"|---{'|---:' * (len(table.columns) - 1)}|"]
    lines += [f"| {' | '.join(row)} |" for row in table.rows]
    return "\n".join([*lines, "", table.note, ""])


def write_table(table: ResultTable, path: Path) -> None:
    """table_markdown in `path`, atomically (fastreg.files)."""
    files.atomic_write(path, lambda f: f.write(table_markdown(table).encode()))
