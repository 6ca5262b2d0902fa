"""Small generated ImageFolders and configs for fast CPU training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes: int = 2, per_class: int = 16, size: int = 36, seed: int = 0) -> Path:
    """JPEGs whose colour and stripe direction depend on the class, with noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
            img[..., c % 3] += 120
            if c % 2:
                img[::4] = 255
            else:
                img[:, ::4] = 255
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def tiny_overrides(data_root: Path, out_dir: Path) -> list[str]:
    """A tiny CNN teacher (random weights) and student, fp32, deterministic."""
    return [
        "experiment=none", "teacher=cnn_small", "teacher.checkpoint=random", "student=cnn_tiny",
        f"data.root={data_root}", "data.crop_size=32", "data.batch_size=8", "data.workers=0", "eval.workers=0",
        "optim.base_lr=2.0", "trainer.precision=fp32", "trainer.log_every=1", "trainer.progress=false",
        "trainer.deterministic=true", "trainer.device=cpu", f"trainer.out_dir={out_dir}",
    ]
