"""A frozen backbone's features of every image a loader gives (eval mode, inference mode, optional autocast), and
of every image of an ImageFolder."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastreg.pipelines import eval_batches


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (BatchNorm uses and keeps its running statistics), its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward(
    model: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """model(images) as (B, D) float32, under autocast to `amp_dtype` when given; call it without autograd.

    Conv models get channels_last inputs, which makes cuDNN run channels_last without converting the
    model's own parameters (the trainer's student keeps its layout).
    """
    images = images.to(device, non_blocking=True)  # (B, 3, H, W)
    if amp_dtype is None:
        images = images.float()  # DALI's GPU batches may be float16; without autocast the model is fp32
    if _has_conv(model):
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(images).float()


def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every batch of `loader`: (feats (N, D) float32, labels (N,)), on the CPU.

    The features are L2-normalized unless `normalize` is False (SEED's linear protocol reads the raw ones).
    `model` runs in eval mode (its mode is restored afterwards) under inference_mode.
    """
    device = torch.device(device)
    feats, labels = [], []
    with _frozen(model), torch.inference_mode():
        for images, y in loader:
            f = _forward(model, images, device, amp_dtype)  # (B, D)
            feats.append((F.normalize(f, dim=1) if normalize else f).cpu())
            labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def folder_features(
    model: nn.Module,
    root: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    loader: str = "auto",
    key: str = "data.root",
    **index_options,
) -> dict:
    """Raw (not normalized) center-crop features of the ImageFolder `root`, which the setting `key` gave (messages
    name it): {"feats": (N, D) float32, "labels": (N,), "classes": class names, or None from a decoder that has
    none}. `loader` decodes (auto: DALI when it can be imported); index_options (max_bad_fraction, progress) go to
    the dataset index."""
    batches = eval_batches(loader, root, crop_size, batch_size, workers, torch.device(device), key=key, **index_options)
    feats, labels = extract_features(model, batches, device, amp_dtype, normalize=False)
    return {"feats": feats, "labels": labels, "classes": batches.classes}


def count_classes(train: dict, val: dict, train_root: str, val_root: str) -> int:
    """C of two folder_features entries: the class folders' count, which must be the same folders in both roots
    (else a label would name another class in each), or the largest label + 1 where the decoder gave no names."""
    if train["classes"] and val["classes"]:
        if train["classes"] != val["classes"]:
            raise ValueError(f"{train_root} and {val_root} have different class folders: labels would not match")
        return len(train["classes"])
    return int(max(train["labels"].max(), val["labels"].max())) + 1
