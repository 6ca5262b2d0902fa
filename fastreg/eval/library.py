"""The evaluation of any backbone, an nn.Module, on an ImageFolder pair: SimReg's k-NN (knn) and the linear
protocols by name (linear_eval), with the figures python -m fastreg.eval gives a student with the same settings.

`model` maps (B, 3, crop, crop) images, normalized by ImageNet's mean and std, to (B, D) features. It runs in eval
mode (its mode is restored afterwards), moved to `device`. train_root holds the bank's (or the linear classifier's
training) images, val_root the queries' (test) images, one subfolder per class, the same class folders in both.
Nothing is cached: each call extracts the features again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastreg.eval.features import count_classes, folder_features
from fastreg.eval.linear import RECIPES, run_protocol, tuned_recipe
from fastreg.eval.neighbours import TIE_SEED, knn_accuracy
from fastreg.placement import AMP_DTYPES, pick_device

ROOTS = ("train_root", "val_root")  # the arguments that give the folders, which messages name


def _placement(
    model: nn.Module, device: str | torch.device | None, precision: str, workers: int | None
) -> tuple[torch.device, torch.dtype | None, int]:
    """(device, autocast dtype, workers) of a library call, `model` moved to the device. device None: CUDA where one
    is visible, else the CPU (the CLI's --device auto); workers None: min(8, CPUs) (the CLI's default)."""
    if precision not in AMP_DTYPES:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(AMP_DTYPES)}")
    device = pick_device("auto", key="device") if device is None else torch.device(device)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    model.to(device)
    return device, AMP_DTYPES[precision], workers


def _features(model, train_root, val_root, crop_size, batch_size, workers, device, amp_dtype, loader):
    """folder_features of both folders, and their number of classes."""
    train, val = (
        folder_features(model, str(root), crop_size, batch_size, workers, device, amp_dtype, loader, key)
        for root, key in zip((train_root, val_root), ROOTS)
    )
    return train, val, count_classes(train, val, str(train_root), str(val_root))


def knn(
    model: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    *,
    crop_size: int = 224,
    k: int = 20,
    t: float = 0.07,
    seed: int = TIE_SEED,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 256,
    workers: int | None = None,
    loader: str = "auto",
) -> dict[str, float]:
    """SimReg's k-NN evaluation of `model`: top-1 % as {knn<k>_majority, knn<k>_weighted, nn1}, train_root's center
    crops as the bank and val_root's as the queries (see fastreg.eval for the three votes).

    k neighbours; t: the weighted vote's temperature; seed: the majority vote's tie-break (the CLI's --seed);
    precision: the forward's autocast (fp32, bf16 or fp16); batch_size and workers: the extraction's; loader: the
    decoder (auto: DALI where it can be imported, else torchvision).

        from fastreg.eval import knn
        figures = knn(timm.create_model("resnet18", num_classes=0), "data/train", "data/val")
        figures["knn20_majority"]
    """
    device, amp_dtype, workers = _placement(model, device, precision, workers)
    train, val, num_classes = _features(
        model, train_root, val_root, crop_size, batch_size, workers, device, amp_dtype, loader
    )
    bank, queries = (F.normalize(x["feats"], dim=1) for x in (train, val))  # (N, D), (Q, D)
    return knn_accuracy(bank.to(device), train["labels"], queries, val["labels"], num_classes, k=k, t=t, seed=seed)


def linear_eval(
    model: nn.Module,
    train_root: str | Path,
    val_root: str | Path,
    protocol: str = "simreg",
    *,
    crop_size: int = 224,
    epochs: int | None = None,
    linear_batch_size: int | None = None,
    lr: float | None = None,
    seed: int = TIE_SEED,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    batch_size: int = 256,
    workers: int | None = None,
    loader: str = "auto",
) -> float:
    """Top-1 % on val_root's center crops of a linear classifier on the frozen `model`, trained on train_root by the
    protocol named (see fastreg.eval): simreg (SimReg's eval_linear.py), moco (SEED's main_lincls.py) or cached
    (CompRess's probe on center-crop features, fast).

    epochs, linear_batch_size, lr: the protocol's own (fastreg.eval.RECIPES) where None; seed draws the classifier's
    init and the crops; the other settings are knn's.

        from fastreg.eval import linear_eval
        top1 = linear_eval(model, "data/train", "data/val", "simreg", epochs=10)
    """
    if protocol not in RECIPES:
        raise ValueError(f"protocol={protocol!r} is not one of {', '.join(RECIPES)}")
    given = {"epochs": epochs, "batch_size": linear_batch_size, "lr": lr}
    recipe = tuned_recipe(protocol, given, lambda key: {"batch_size": "linear_batch_size"}.get(key, key))
    device, amp_dtype, workers = _placement(model, device, precision, workers)
    train, val, num_classes = _features(
        model, train_root, val_root, crop_size, batch_size, workers, device, amp_dtype, loader
    )
    return run_protocol(
        protocol,
        recipe,
        model,
        train,
        val,
        num_classes,
        str(train_root),
        crop_size,
        workers,
        loader,
        device,
        amp_dtype,
        seed,
        batch_key="linear_batch_size",
    )
