"""The linear protocols on a frozen backbone: CompRess's probe on cached features (linear_probe), and SimReg's and
SEED's classifiers trained on fresh augmented crops (LinearRecipe, RECIPES, simreg_head, moco_head,
augmented_views, train_on_views), and run_protocol, which runs one by name. See fastreg.eval for what each protocol is."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastreg.config import DataConfig
from fastreg.eval.features import _forward, _frozen, _has_conv
from fastreg.heads import L2Norm
from fastreg.pipelines import Loader, build_loader


def _normal_linear(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """Linear(dim, C) with N(0, 0.01) weights drawn from `seed` and zero bias (MoCo's and SEED's main_lincls.py
    main_worker init of the fc)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(linear.bias)
    return linear


def make_probe(
    dim: int,
    num_classes: int,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] = (15, 30),
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[nn.Sequential, torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """CompRess's probe L2Norm -> BatchNorm1d(affine=False) -> Linear(dim, C), its SGD and its schedule.

    The schedule multiplies lr by 0.1 at each milestone; step it once per epoch. The Linear starts
    from N(0, 0.01) weights and zero bias, drawn from `seed`.
    """
    linear = _normal_linear(dim, num_classes, seed)
    probe = nn.Sequential(L2Norm(), nn.BatchNorm1d(dim, affine=False), linear).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return probe, optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=0.1)


def _train_epoch(
    probe: nn.Module,
    optimizer: torch.optim.Optimizer,
    feats: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    probe.train()
    for idx in torch.randperm(len(feats), generator=gen).to(feats.device).split(batch_size):
        if len(idx) < 2:  # BatchNorm cannot train on a batch of one
            continue
        loss = F.cross_entropy(probe(feats[idx]), labels[idx])  # (b, D) -> (b, C)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.inference_mode()
def _top1(probe: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    probe.eval()
    correct = sum(
        (probe(x).argmax(1) == y).sum().item() for x, y in zip(feats.split(batch_size), labels.split(batch_size))
    )
    return 100.0 * correct / len(labels)


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] = (15, 30),
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> float:
    """Top-1 % on (val_feats, val_labels) of a make_probe probe trained on frozen (N, D) train_feats."""
    probe, optimizer, schedule = make_probe(
        train_feats.shape[1], num_classes, lr, momentum, weight_decay, milestones, device, seed
    )
    feats, labels = train_feats.to(device), train_labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        _train_epoch(probe, optimizer, feats, labels, batch_size, gen)
        schedule.step()
    return _top1(probe, val_feats.to(device), val_labels.to(device), batch_size)


# ------------------------------------------------------------------- linear protocols on fresh crops


@dataclasses.dataclass(frozen=True)
class LinearRecipe:
    """The optimisation of one linear protocol: SGD on the Linear alone, its lr set at each epoch's start."""

    epochs: int
    batch_size: int
    lr: float  # simreg, cached: the lr; moco: the lr at batch 256 (`scale_lr`)
    momentum: float
    weight_decay: float
    milestones: tuple[int, ...]  # lr x 0.1 from each of these epochs on
    warmup_epochs: int = 0
    scale_lr: bool = False  # the lr after warmup is lr x batch_size / 256

    def lr_at(self, epoch: int) -> float:
        """lr of epoch `epoch` (0-based), in closed form.

        SEED's main_lincls.py adjust_learning_rate: target = lr x batch/256; during warmup
        lr + (target - lr) x epoch / warmup_epochs (flat at batch 256), then target; x 0.1 per milestone
        passed. With no warmup and no scaling it is SimReg's MultiStepLR stepped once per epoch.
        """
        target = self.lr * self.batch_size / 256 if self.scale_lr else self.lr
        lr = self.lr + (target - self.lr) * epoch / self.warmup_epochs if epoch < self.warmup_epochs else target
        return lr * 0.1 ** sum(epoch >= m for m in self.milestones)


RECIPES = {
    # SimReg eval_linear.py's argparse defaults: lr 0.01, momentum 0.9, wd 1e-4, batch 256, 40 epochs,
    # --lr_schedule 15,30,40 (the drop at 40 only matters with more epochs).
    "simreg": LinearRecipe(40, 256, 0.01, 0.9, 1e-4, (15, 30, 40)),
    # SEED main_lincls.py: lr 30 x batch/256, momentum 0.9, wd 0, 100 epochs, --schedule 60 80, 5 warmup epochs.
    "moco": LinearRecipe(100, 256, 30.0, 0.9, 0.0, (60, 80), warmup_epochs=5, scale_lr=True),
    # CompRess's probe, as SimReg's schedule, on cached features (linear_probe).
    "cached": LinearRecipe(40, 256, 0.01, 0.9, 1e-4, (15, 30)),
}


class FullBatchNorm(nn.Module):
    """(x - mean) / sqrt(var + 1e-5) with fixed (D,) statistics: SimReg eval_linear.py FullBatchNorm."""

    def __init__(self, var: torch.Tensor, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", (var + 1e-5).rsqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


def simreg_head(train_feats: torch.Tensor, num_classes: int, seed: int = 0) -> nn.Sequential:
    """SimReg eval_linear.py main_worker's classifier: Normalize -> FullBatchNorm -> Linear(D, C).

    The statistics are torch.var_mean (unbiased var) over the L2-normalized center-crop train features
    (N, D), computed once: the augmented crops it then trains on are standardized by these, never by their
    own batch. The Linear keeps PyTorch's default init, as SimReg's, drawn from `seed`.
    """
    var, mean = torch.var_mean(F.normalize(train_feats.float(), dim=1), dim=0)  # (D,), (D,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(train_feats.shape[1], num_classes)
    return nn.Sequential(L2Norm(), FullBatchNorm(var, mean), linear)


def moco_head(dim: int, num_classes: int, seed: int = 0) -> nn.Linear:
    """SEED main_lincls.py's classifier: the raw feature into a Linear(D, C), N(0, 0.01) weights, zero bias."""
    return _normal_linear(dim, num_classes, seed)


def augmented_views(
    root: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    loader: str,
    device: torch.device,
    seed: int,
    channels_last: bool,
    half: bool,
) -> Loader:
    """The training views of both augmented protocols, a fresh draw every epoch: RandomResizedCrop(crop_size)
    at torchvision's default scale (0.08, 1) and ratio (3/4, 4/3), then a horizontal flip (SimReg
    eval_linear.py and SEED main_lincls.py train_transform), labelled, from the training loader of `loader`.

    That loader drops the last partial batch (floor(N / batch) batches an epoch) where the papers'
    DataLoader keeps it: at ImageNet's 1.28M images and batch 256, 255 of 1.28M images are left out per epoch.
    """
    if loader == "synthetic":
        raise ValueError("data.loader=synthetic makes random images: pass --loader auto, dali or torchvision")
    cfg = DataConfig(
        root=root,
        crop_size=crop_size,
        scale=[0.08, 1.0],
        augment="weak",
        batch_size=batch_size,
        workers=workers,
        loader=loader,
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return build_loader(cfg, rank=0, world_size=1, seed=seed, device=device, memory_format=memory_format, half=half)


def train_on_views(
    backbone: nn.Module,
    head: nn.Module,
    recipe: LinearRecipe,
    views: Loader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> None:
    """Train `head` on the frozen `backbone`'s features of `views.epoch(e)` for recipe.epochs epochs.

    The backbone stays in eval mode (its BatchNorm statistics are part of the features: main_lincls.py
    train()); SGD updates the head alone, its lr set to recipe.lr_at(epoch) at each epoch's start.
    """
    optimizer = torch.optim.SGD(
        head.parameters(), lr=recipe.lr_at(0), momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    head.train()
    with _frozen(backbone):
        for epoch in range(recipe.epochs):
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr_at(epoch)
            for batch in views.epoch(epoch):
                with torch.no_grad():
                    feats = _forward(backbone, batch.images, device, amp_dtype)  # (B, D)
                loss = F.cross_entropy(head(feats), batch.labels.to(device))  # (B, C)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def tuned_recipe(name: str, given: dict[str, float | None], key_of: Callable[[str], str]) -> LinearRecipe:
    """RECIPES[name] with the epochs, batch_size and lr of `given` that are not None; key_of(key) is the setting that
    gave each, for the messages."""
    for key, value in given.items():
        if value is not None and value <= 0:
            raise ValueError(f"{key_of(key)} must be positive, got {value}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in given.items() if v is not None})


def run_protocol(
    name: str,
    recipe: LinearRecipe,
    backbone: nn.Module,
    train: dict,
    val: dict,
    num_classes: int,
    train_root: str,
    crop_size: int,
    workers: int,
    loader: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    seed: int,
    batch_key: str = "--linear-batch-size",
) -> float:
    """Top-1 % on val's center crops of the linear protocol `name` (simreg, moco, cached) trained on train_root.

    train and val are folder_features entries (raw center-crop features); the heads normalize what they need. The
    augmented protocols draw fresh crops of train_root (crop_size, `workers` decoding with `loader`) each epoch;
    batch_key is the setting that gave recipe.batch_size, for the messages.
    """
    if name == "cached":
        r = recipe
        return linear_probe(
            train["feats"],
            train["labels"],
            val["feats"],
            val["labels"],
            num_classes,
            r.epochs,
            r.batch_size,
            r.lr,
            r.momentum,
            r.weight_decay,
            r.milestones,
            device,
            seed,
        )
    n_train = len(train["labels"])
    if recipe.batch_size > n_train:
        raise ValueError(
            f"linear protocol {name}: a batch of {recipe.batch_size} is more than the {n_train} images of "
            f"{train_root}, and the augmented protocols train on full batches only: {batch_key} must be {n_train} "
            "or less"
        )
    dim = train["feats"].shape[1]
    head = simreg_head(train["feats"], num_classes, seed) if name == "simreg" else moco_head(dim, num_classes, seed)
    half = amp_dtype is not None
    views = augmented_views(
        train_root, crop_size, recipe.batch_size, workers, loader, device, seed, _has_conv(backbone), half
    )
    train_on_views(backbone, head.to(device), recipe, views, device, amp_dtype)
    return _top1(head, val["feats"].to(device), val["labels"].to(device), recipe.batch_size)
