"""Generate an ImageNet-like ImageFolder of JPEGs from real photographs, for data-loader benchmarks.

Decode and resize cost depend on image content (entropy-coded size, detail), so the images are random
crops, rescales and flips of the photographs bundled with scikit-learn (china.jpg, flower.jpg), never noise
or flat colour. Sizes vary around ImageNet's typical 500x375, about a quarter of them portrait, and they are
saved at quality 90 with 4:2:0 chroma subsampling, as most ImageNet JPEGs are. The output is a function of
the arguments alone.

    python -m benchmarks.make_jpegs /tmp/jpegs --images 400 --classes 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

LANDSCAPE_WIDTH = (450, 520)  # the longer side, pixels (inclusive)
LANDSCAPE_HEIGHT = (340, 400)
PORTRAIT_SHARE = 0.25
MIN_CROP_SHARE = 0.55  # the crop's side is 55-100% of the largest crop the photo allows


def sample_photos() -> list[Image.Image]:
    # Imported here: scikit-learn is only needed for its bundled photos.
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def output_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) around 500x375, transposed for a portrait image."""
    width = int(rng.integers(LANDSCAPE_WIDTH[0], LANDSCAPE_WIDTH[1] + 1))
    height = int(rng.integers(LANDSCAPE_HEIGHT[0], LANDSCAPE_HEIGHT[1] + 1))
    return (height, width) if rng.random() < PORTRAIT_SHARE else (width, height)


def random_view(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of `photo` with the aspect ratio of `size`, rescaled to `size`, flipped half the time."""
    width, height = size
    # The largest crop of this aspect ratio that fits, then a random share of it: the rescale ranges
    # from a mild downscale to an upscale of about 1.5x for portrait crops of the landscape photos.
    fit = min(photo.width / width, photo.height / height)
    share = rng.uniform(MIN_CROP_SHARE, 1.0)
    crop_w, crop_h = max(1, round(width * fit * share)), max(1, round(height * fit * share))
    left = int(rng.integers(0, photo.width - crop_w + 1))
    top = int(rng.integers(0, photo.height - crop_h + 1))
    view = photo.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
    return view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def make_image_folder(out: Path, images: int, classes: int, seed: int, quality: int = 90) -> list[Path]:
    """Write `images` JPEGs into `classes` subfolders (class_000, ...) of `out`, round robin; returns the paths."""
    if images < 1 or classes < 1:
        raise ValueError(f"need at least one image and one class, got images={images} classes={classes}")
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    paths = []
    for i in range(images):
        folder = out / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo = photos[int(rng.integers(len(photos)))]
        path = folder / f"img_{i:05d}.jpg"
        random_view(photo, output_size(rng), rng).save(path, quality=quality, subsampling="4:2:0")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder (created; existing files of the same name are replaced)")
    parser.add_argument("--images", type=int, default=400, help="number of JPEGs (default 400)")
    parser.add_argument("--classes", type=int, default=4, help="number of class subfolders (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    args = parser.parse_args()
    paths = make_image_folder(args.out, args.images, args.classes, args.seed, args.quality)
    sizes = [p.stat().st_size for p in paths]
    print(
        f"wrote {len(paths)} JPEGs in {args.classes} classes to {args.out}: mean {np.mean(sizes) / 1024:.1f} KB "
        f"(min {min(sizes) / 1024:.1f}, max {max(sizes) / 1024:.1f})"
    )


if __name__ == "__main__":
    main()
