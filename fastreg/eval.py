"""Evaluation of a frozen student backbone, by the protocols of the papers it reproduces.

    python -m fastreg.eval runs/r18/ckpt_epoch0130.pt --linear simreg
    python -m fastreg.eval resnet18_simreg.pt --arch resnet18 --train-root train/ --val-root val/

k-NN (train images as the bank, val images as the queries, center crops), three figures:
  knn<k>_majority  SimReg's (eval_knn.py faiss_knn): the k nearest bank features by L2 distance between
                   L2-normalized features (the same order as cosine similarity), one vote each; the most
                   votes win, a tie goes to a random one of the tied classes (here drawn from a fixed seed:
                   see _majority_vote).
  knn<k>_weighted  DINO / InstDisc: each of the k nearest adds exp(cos / t) to its class.
  nn1              the label of the nearest one (SimReg's 1-NN: its majority vote at k=1).
Linear evaluation (--linear, one or more of):
  simreg  SimReg's eval_linear.py: a fresh RandomResizedCrop + flip of every training image each epoch
          through the frozen backbone, L2-normalized, standardized by the train set's fixed mean and
          variance, then a Linear; SGD lr 0.01, 40 epochs, lr x0.1 at 15 and 30.
  moco    SEED's main_lincls.py (MoCo's): the same fresh crops, the raw feature into a Linear; SGD lr 30
          x batch/256, weight decay 0, 100 epochs, lr x0.1 at 60 and 80.
  cached  the fast variant: CompRess's L2Norm -> BatchNorm1d -> Linear on cached center-crop features,
          40 epochs. No augmentation, so a little lower than simreg on ImageNet (SimReg's README says so
          of its own cached variant, --use_cache), but no pass through the backbone per epoch.
The linear figures are top-1 on the val set's center crops.

The CLI caches the raw center-crop features in --cache-dir (default: fastreg.files.cache_dir("features"),
$FASTREG_CACHE/features) per (weights, data folder, crop size, precision), so later runs and the linear
protocols reuse what k-NN extracted. `knn_eval`, which the trainer calls, never caches: its model changes
between calls.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from fastreg import checkpoint, files
from fastreg.config import DataConfig, HeadConfig, TrainConfig
from fastreg.export import WRONG_ARCH, check_keys, checkpoint_arch, read_checkpoint
from fastreg.heads import L2Norm, build_head
from fastreg.index import load_index
from fastreg.messages import listing
from fastreg.pipelines import Loader, build_loader, eval_batches, resolve_loader
from fastreg.placement import AMP_DTYPES, pick_device
from fastreg.seeding import mix_seed
from fastreg.students import STUDENTS, Student

log = logging.getLogger(__name__)
SIM_ELEMENTS = 2**26  # entries of one chunk's (queries, bank) similarity matrix: 256 MiB in fp32
TIE_SEED = 0  # the majority vote's tie-break when no --seed is given (the trainer's k-NN)


# ----------------------------------------------------------------------------------------- features


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


# --------------------------------------------------------------------------------------------- k-NN


def knn_label(k: int, vote: str) -> str:
    """Result key of a k-NN figure: knn20_majority, knn20_weighted (the 1-NN figure is "nn1")."""
    return f"knn{k}_{vote}"


def _neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int | None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per chunk of queries, (index of its first query, sim (q, k), index (q, k)) of the k most similar bank
    rows, nearest first. On L2-normalized rows ||a - b||^2 = 2 - 2 a.b, so this is also SimReg's k nearest
    by L2 distance (eval_knn.py faiss_knn, IndexFlatL2).

    The default chunk keeps the (q, N) similarity matrix under SIM_ELEMENTS entries.
    """
    step = chunk_size or max(1, SIM_ELEMENTS // bank.shape[0])
    for start in range(0, queries.shape[0], step):
        sim = queries[start : start + step].to(bank.device) @ bank.T  # (q, D) @ (D, N) -> (q, N)
        yield start, *sim.topk(min(k, bank.shape[0]), dim=1)


def _weighted_vote(sim: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Class scores (q, C): each neighbour adds exp(sim / t) to its class's score.

    The row's largest similarity is subtracted first (a common factor per row, so the argmax is the
    same) to keep exp finite at small t.
    """
    weights = ((sim - sim[:, :1]) / t).exp()  # (q, k); sim is sorted, column 0 is the row max
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def tie_order(query: int, num_classes: int, seed: int) -> torch.Tensor:
    """The majority vote's tie keys of global query index `query`: a random permutation of the classes (C,).

    Its generator's seed is mix_seed("tie", seed, query, bits=32): a hash keeps (seed, query) pairs from sharing
    one, and torch's CPU generator reads only the low 32 bits of a seed.
    """
    generator = torch.Generator().manual_seed(mix_seed("tie", seed, query, bits=32))
    return torch.randperm(num_classes, generator=generator)


def _majority_vote(neighbour_labels: torch.Tensor, num_classes: int, first_query: int, seed: int) -> torch.Tensor:
    """SimReg's majority vote (eval_knn.py faiss_knn): the class (q,) with the most of the k neighbours.

    SimReg breaks a tie by shuffling the (class, count) pairs with python's global RNG and taking the first
    maximum: a uniformly random one of the tied classes, different in every run. Here query i's score of
    class c is count[i, c] * C + tie_order(i)[c]. The keys are distinct and below C, so more votes always
    win, and among tied classes the one with the larger key wins: still uniform among the tied classes,
    but a function of (seed, i) alone, whatever the chunking or device. Keys are drawn only for rows whose
    top count is shared; elsewhere they cannot change the winner.
    """
    counts = torch.zeros(neighbour_labels.shape[0], num_classes, dtype=torch.long, device=neighbour_labels.device)
    counts.scatter_add_(1, neighbour_labels, torch.ones_like(neighbour_labels))  # (q, C) votes
    tied = ((counts == counts.max(1, keepdim=True).values).sum(1) > 1).nonzero().flatten().tolist()
    keys = torch.zeros_like(counts)
    if tied:
        keys[tied] = torch.stack([tie_order(first_query + r, num_classes, seed) for r in tied]).to(keys.device)
    return (counts * num_classes + keys).argmax(1)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    chunk_size: int | None = None,
    seed: int = TIE_SEED,
) -> dict[str, torch.Tensor]:
    """{"majority", "weighted", "nn1"}: each query's class (Q,) by the three votes, on bank's device, from one pass.

    bank (N, D) and queries (Q, D) are L2-normalized; k is clipped to N. `chunk_size` queries are
    compared at a time (default: as many as keep the similarity matrix under SIM_ELEMENTS); `seed` draws
    the majority vote's tie keys.
    """
    bank_labels = bank_labels.to(bank.device)
    votes: dict[str, list[torch.Tensor]] = {"majority": [], "weighted": [], "nn1": []}
    for start, sim, idx in _neighbours(bank, queries, k, chunk_size):
        neighbour_labels = bank_labels[idx]  # (q, k), nearest first
        votes["majority"].append(_majority_vote(neighbour_labels, num_classes, start, seed))
        votes["weighted"].append(_weighted_vote(sim, neighbour_labels, num_classes, t).argmax(1))
        votes["nn1"].append(neighbour_labels[:, 0])
    return {name: torch.cat(v) for name, v in votes.items()}


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    **options,
) -> dict[str, float]:
    """Top-1 % as {knn<k>_majority, knn<k>_weighted, nn1}; options (t, chunk_size, seed) as knn_predict's."""
    preds = knn_predict(bank, bank_labels, queries, num_classes, k=k, **options)
    y = query_labels.to(bank.device)
    names = {knn_label(k, "majority"): "majority", knn_label(k, "weighted"): "weighted", "nn1": "nn1"}
    return {key: 100.0 * (preds[vote] == y).double().mean().item() for key, vote in names.items()}


def knn_eval(
    model: nn.Module,
    train_root: str,
    val_root: str,
    crop_size: int,
    batch_size: int,
    workers: int,
    device: str | torch.device,
    k: int,
    t: float,
    amp_dtype: torch.dtype | None = None,
    loader: str = "auto",
    root_keys: tuple[str, str] = ("data.knn_train_root", "data.val_root"),
    **index_options,
) -> dict[str, float]:
    """knn_accuracy's three figures for `model`, with train_root's images as the bank and val_root's as the
    queries; `loader` is the data.loader that decodes them (auto: DALI when it can be imported), root_keys the
    keys that gave the two roots (for the messages), index_options (max_bad_fraction, progress) go to the
    dataset index.

    Nothing is cached: during training the model changes between calls.
    """

    def features(root: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        batches = eval_batches(
            loader, root, crop_size, batch_size, workers, torch.device(device), key=key, **index_options
        )
        return extract_features(model, batches, device, amp_dtype)

    bank, bank_labels = features(train_root, root_keys[0])
    queries, query_labels = features(val_root, root_keys[1])
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return knn_accuracy(bank.to(device), bank_labels, queries, query_labels, num_classes, k=k, t=t)


def knn_eval_run(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """knn_eval with a training run's settings: data.knn_train_root (else data.root) as the bank, data.val_root as
    the queries, the run's crop size, loader and eval.* settings (eval.precision: python -m fastreg.eval's)."""
    d, e = cfg.data, cfg.eval
    bank = d.knn_train_root or d.root
    log.info("k-NN: features in %s (eval.precision)", e.precision)
    return knn_eval(
        model,
        bank,
        d.val_root,
        d.crop_size,
        e.batch_size,
        e.workers,
        device,
        e.knn_k,
        e.knn_t,
        amp_dtype=AMP_DTYPES[e.precision],
        loader=d.loader,
        root_keys=("data.knn_train_root" if d.knn_train_root else "data.root", "data.val_root"),
        max_bad_fraction=d.max_bad_fraction,
        progress=False,
    )


# ------------------------------------------------------------------------------------ feature cache


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes, bytes): the identity of its weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def cached_features(
    model: nn.Module,
    root: str,
    crop_size: int,
    cache_dir: str | Path,
    tag: str,
    batch_size: int,
    workers: int,
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    loader: str = "auto",
    key: str = "data.root",
) -> dict:
    """Raw (not normalized) center-crop features of the ImageFolder `root` (given by `key`, which messages name),
    extracted once and then read from `cache_dir`.

    The file is `<slot>-<name>.pt`:
      slot = hash(tag, root, crop size): which features these are (`tag` names the model, the CLI
             passes the checkpoint's absolute path). Writing a new name for a slot deletes the old one,
             so a checkpoint overwritten at the same path does not pile up files.
      name = hash(digest of the model's weights, content digest of root's index, amp dtype, loader, "raw"): new
             weights, an image added, removed, relabelled or rewritten (the index checksums every file's
             bytes), another precision or decoder give a new name, never a stale file ("raw" keeps out the
             L2-normalized features that earlier versions cached).
    Returns {"feats": (N, D) float32 raw, "labels": (N,), "classes": class names or None,
    "cached": whether it was read from the cache}.
    """
    root = os.path.abspath(root)
    cache_dir = Path(cache_dir)
    slot = _hash(tag, root, crop_size)
    content = load_index(root, key=key).content  # rechecks the files written since their last check
    name = _hash(weights_digest(model), content, str(amp_dtype), resolve_loader(loader), "raw")
    path = cache_dir / f"{slot}-{name}.pt"
    if path.is_file():
        cached = checkpoint.read(path, "cached features", fix="delete it: the next run extracts them again")
        return {**cached, "cached": True}
    batches = eval_batches(loader, root, crop_size, batch_size, workers, torch.device(device), key=key)
    feats, labels = extract_features(model, batches, device, amp_dtype, normalize=False)
    entry = {"feats": feats, "labels": labels, "classes": batches.classes}
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"{slot}-*.pt"):
        stale.unlink(missing_ok=True)
    checkpoint.atomic_save(entry, path)
    return {**entry, "cached": False}


# ------------------------------------------------------------------------------------- linear probe


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


# ---------------------------------------------------------------------------------------------- CLI


def load_student(ckpt: dict, path: str | Path, arch: str | None = None) -> tuple[nn.Module, str, dict]:
    """(backbone, arch, config) from `ckpt`, the contents of `path`: a trainer checkpoint or an exported student
    state_dict.

    A trainer checkpoint gives its config, and its arch unless `arch` overrides it. An exported
    state_dict has no config ({}), so `arch` is required. The weights must fit the arch exactly.
    """
    given = arch is not None
    if "student" in ckpt:
        fix = "Evaluate the checkpoint that fastreg.train wrote, or the student that fastreg.export wrote with --arch"
        config = checkpoint.check_entries(ckpt, Path(path), ("student", "config"), fix)["config"]
        arch = arch or checkpoint_arch(ckpt, path)
        state_dict = ckpt["student"]
    elif checkpoint.is_state_dict(ckpt):
        if arch is None:
            raise ValueError(
                f"{path} is an exported student state_dict, which has no config: pass --arch (one of {', '.join(STUDENTS)})"
            )
        config, state_dict = {}, ckpt
    else:
        raise ValueError(
            f"{path} is neither a trainer checkpoint (no 'student' entry) nor a state_dict of tensors "
            f"(keys: {listing(map(str, ckpt))})"
        )
    if arch not in STUDENTS:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(STUDENTS)}")
    check_keys(state_dict, arch, path, "pass the --arch it was trained as" if given else WRONG_ARCH)
    backbone = Student(arch).backbone
    backbone.load_state_dict(state_dict, strict=False)  # check_keys allowed only the classifier to be missing
    return backbone, arch, config


def load_head(ckpt: dict, path: str | Path, index: int, dim: int) -> nn.Module:
    """Head `index` of a trainer checkpoint `ckpt`, the contents of `path` (the head of teachers[index]), in eval
    mode, for SimReg's --use_pred: its output, rather than the backbone's feature, is what the k-NN and the linear
    probes see. `dim`: the student's feature width. Exported students have no heads (fastreg.export drops them)."""
    heads = ckpt.get("heads")
    teachers = (ckpt.get("config") or {}).get("teachers") or []
    if heads is None or not teachers:
        raise ValueError(
            f"--through-head needs a trainer checkpoint: {path} holds no heads (an exported student "
            "keeps the backbone only); evaluate the checkpoint that fastreg.train wrote"
        )
    if not 0 <= index < len(teachers):
        names = ", ".join(f"{i}: {t.get('name') or t.get('arch')}" for i, t in enumerate(teachers))
        raise ValueError(f"--through-head {index}: {path} has {len(teachers)} head(s), one per teacher ({names})")
    prefix = f"{index}."
    state = {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)}
    out_dim = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1].shape[0]  # the last Linear
    head = build_head(HeadConfig(**{**teachers[index]["head"], "impl": "eager"}), dim, out_dim)
    head.load_state_dict(state)
    return head.eval()


def _settings(args: argparse.Namespace, config: dict) -> argparse.Namespace:
    """Flags over the checkpoint config's data/eval values over defaults; checks the data folders."""
    data, ev = config.get("data") or {}, config.get("eval") or {}
    s = argparse.Namespace(
        train_root=args.train_root or data.get("knn_train_root") or data.get("root"),
        val_root=args.val_root or data.get("val_root"),
        crop_size=args.crop_size or data.get("crop_size") or 224,
        k=args.k or ev.get("knn_k") or 20,
        t=args.t or ev.get("knn_t") or 0.07,
        batch_size=args.batch_size or ev.get("batch_size") or 256,
        workers=args.workers if args.workers is not None else ev.get("workers", min(8, os.cpu_count() or 1)),
        loader=args.loader or data.get("loader") or "auto",
    )
    for flag, root in (("--train-root", s.train_root), ("--val-root", s.val_root)):
        if root is None:
            where = "the checkpoint's config does not name one" if config else "an exported student carries no config"
            raise ValueError(f"no {flag}: {where}; pass {flag} DIR (an ImageFolder)")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{flag} {root} is not a folder")
    return s


def _recipe(name: str, args: argparse.Namespace) -> LinearRecipe:
    """RECIPES[name] with the --linear-epochs, --linear-batch-size and --linear-lr that were given."""
    given = {"epochs": args.linear_epochs, "batch_size": args.linear_batch_size, "lr": args.linear_lr}
    for key, value in given.items():
        if value is not None and value <= 0:
            raise ValueError(f"--linear-{key.replace('_', '-')} must be positive, got {value}")
    return dataclasses.replace(RECIPES[name], **{k: v for k, v in given.items() if v is not None})


def linear_eval(
    name: str,
    recipe: LinearRecipe,
    backbone: nn.Module,
    train: dict,
    val: dict,
    num_classes: int,
    s: argparse.Namespace,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    seed: int,
) -> float:
    """Top-1 % on val's center crops of the linear protocol `name` (simreg, moco, cached) trained on train.

    train and val are cached_features entries (raw center-crop features); the heads normalize what they need.
    """
    if name == "cached":
        return linear_probe(
            train["feats"],
            train["labels"],
            val["feats"],
            val["labels"],
            num_classes,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            milestones=recipe.milestones,
            device=device,
            seed=seed,
        )
    n_train = len(train["labels"])
    if recipe.batch_size > n_train:
        raise ValueError(
            f"--linear {name}: a batch of {recipe.batch_size} is more than the {n_train} images of "
            f"{s.train_root}, and the augmented protocols train on full batches only; pass "
            f"--linear-batch-size {n_train} or less"
        )
    if name == "simreg":
        head = simreg_head(train["feats"], num_classes, seed)
    else:
        head = moco_head(train["feats"].shape[1], num_classes, seed)
    head.to(device)
    views = augmented_views(
        s.train_root,
        s.crop_size,
        recipe.batch_size,
        s.workers,
        s.loader,
        device,
        seed,
        channels_last=_has_conv(backbone),
        half=amp_dtype is not None,
    )
    train_on_views(backbone, head, recipe, views, device, amp_dtype)
    return _top1(head, val["feats"].to(device), val["labels"].to(device), recipe.batch_size)


def evaluate(args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    """Run the CLI's evaluation: (results, facts about what ran, for the table)."""
    args.cache_dir = files.cache_folder("features", args.cache_dir)  # writable: before any feature is extracted
    ckpt = read_checkpoint(args.checkpoint)
    backbone, arch, config = load_student(ckpt, args.checkpoint, args.arch)
    if args.through_head is not None:  # the features are the head's output (SimReg's eval --use_pred)
        head = load_head(ckpt, args.checkpoint, args.through_head, STUDENTS[arch].dim)
        backbone = nn.Sequential(backbone, head)
    del ckpt  # the optimizer state and the rest: not needed from here on
    s = _settings(args, config)
    device = pick_device(args.device, key="--device")
    amp_dtype = AMP_DTYPES[args.precision]
    backbone.to(device)
    head = "" if args.through_head is None else f", through head {args.through_head}"
    tag = str(Path(args.checkpoint).resolve()) + head  # the head's features get their own cache slot
    train, val = (
        cached_features(
            backbone, root, s.crop_size, args.cache_dir, tag, s.batch_size, s.workers, device, amp_dtype, s.loader, key
        )
        for root, key in ((s.train_root, "--train-root"), (s.val_root, "--val-root"))
    )
    if train["classes"] and val["classes"] and train["classes"] != val["classes"]:
        raise ValueError(f"{s.train_root} and {s.val_root} have different class folders: labels would not match")
    num_classes = (
        len(train["classes"]) if train["classes"] else int(max(train["labels"].max(), val["labels"].max())) + 1
    )
    bank, queries = (F.normalize(x["feats"], dim=1) for x in (train, val))
    results = knn_accuracy(
        bank.to(device), train["labels"], queries, val["labels"], num_classes, k=s.k, t=s.t, seed=args.seed
    )
    recipes = {name: _recipe(name, args) for name in args.linear}
    for name, recipe in recipes.items():
        results[f"linear_{name}"] = linear_eval(
            name, recipe, backbone, train, val, num_classes, s, device, amp_dtype, args.seed
        )
    facts = {
        "arch": arch + head,
        "settings": s,
        "device": device,
        "n_train": len(train["labels"]),
        "n_val": len(val["labels"]),
        "cached": train["cached"] and val["cached"],
        "recipes": recipes,
    }
    return results, facts


def _protocols(args: argparse.Namespace, facts: dict) -> dict[str, str]:
    """What each result key measured, for the table."""
    s = facts["settings"]
    rows = {
        knn_label(s.k, "majority"): f"SimReg eval_knn.py: most of the {s.k} nearest, ties by seed {args.seed}",
        knn_label(s.k, "weighted"): f"{s.k} nearest, each adds exp(cos / {s.t})",
        "nn1": "label of the nearest",
    }
    sources = {
        "simreg": "SimReg eval_linear.py: fresh crops, standardized",
        "moco": "SEED main_lincls.py: fresh crops, raw feature",
        "cached": "cached center crops (a little lower)",
    }
    for name, r in facts["recipes"].items():
        lr = f"lr {r.lr:g} x {r.batch_size}/256" if r.scale_lr else f"lr {r.lr:g}"
        rows[f"linear_{name}"] = f"{sources[name]}, {r.epochs} epochs, batch {r.batch_size}, {lr}"
    return rows


def _report(args: argparse.Namespace, results: dict[str, float], facts: dict) -> None:
    s = facts["settings"]
    table = Table(title=f"{Path(args.checkpoint).name} ({facts['arch']}, crop {s.crop_size})")
    table.add_column("figure")
    table.add_column("top-1 %", justify="right")
    protocols = _protocols(args, facts)
    for key in protocols:
        table.add_row(key, f"{results[key]:.2f}")
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    width = max(map(len, protocols))
    for key, protocol in protocols.items():  # below the table, which would wrap them at the terminal's width
        console.print(f"{key:<{width}}  {protocol}")
    console.print(f"bank:     {facts['n_train']} images in {s.train_root}")
    console.print(f"queries:  {facts['n_val']} images in {s.val_root}")
    source = "read from the cache" if facts["cached"] else "extracted and cached"
    console.print(f"features: {source} in {args.cache_dir}, on {facts['device']}, {args.precision}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m fastreg.eval", description="k-NN (majority, weighted), 1-NN and linear top-1 of a student."
    )
    p.add_argument(
        "checkpoint",
        help="trainer checkpoint, or a student exported by fastreg.export (then --arch and roots are required)",
    )
    p.add_argument("--arch", choices=list(STUDENTS), help="student arch (default: the checkpoint's config)")
    p.add_argument(
        "--through-head",
        type=int,
        nargs="?",
        const=0,
        metavar="N",
        help="evaluate the output of the student's head N (default 0: the first teacher's) instead of its backbone "
        "feature, as SimReg's --use_pred (trainer checkpoints only: exports drop the heads)",
    )
    p.add_argument(
        "--train-root",
        help="ImageFolder of the k-NN bank / linear training set (default: data.knn_train_root or data.root)",
    )
    p.add_argument("--val-root", help="ImageFolder of the queries / linear test set (default: data.val_root)")
    p.add_argument("--crop-size", type=int, help="center and random-resized crop (default: data.crop_size, else 224)")
    p.add_argument(
        "--linear",
        nargs="+",
        choices=list(RECIPES),
        default=[],
        metavar="PROTOCOL",
        help="also train linear classifiers by these protocols: simreg (SimReg's), moco (SEED's), cached "
        "(fast, on cached center-crop features)",
    )
    p.add_argument("--linear-epochs", type=int, help="default: the protocol's (simreg 40, moco 100, cached 40)")
    p.add_argument("--linear-batch-size", type=int, help="default: 256")
    p.add_argument(
        "--linear-lr",
        type=float,
        help="default: the protocol's (simreg 0.01, cached 0.01, moco 30 at batch 256, scaled by batch/256)",
    )
    p.add_argument("--k", type=int, help="k-NN neighbours (default: eval.knn_k, else 20)")
    p.add_argument("--t", type=float, help="weighted k-NN temperature (default: eval.knn_t, else 0.07)")
    p.add_argument(
        "--seed",
        type=int,
        default=TIE_SEED,
        help="seed of the majority vote's tie-break, the linear heads' init and the random crops",
    )
    p.add_argument(
        "--precision",
        choices=list(AMP_DTYPES),
        default="fp32",
        help="autocast dtype of the backbone's forward (default fp32)",
    )
    p.add_argument("--batch-size", type=int, help="feature extraction batch (default: eval.batch_size, else 256)")
    p.add_argument(
        "--workers", type=int, help="DataLoader workers or DALI threads (default: eval.workers, else min(8, CPUs))"
    )
    p.add_argument(
        "--loader",
        choices=("auto", "dali", "torchvision"),
        help="decoder of the images (default: data.loader, else auto: DALI when installed)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cache-dir", type=Path, help=f"feature cache (default: {files.cache_dir('features')})")
    args = p.parse_args(argv)
    try:
        results, facts = evaluate(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    _report(args, results, facts)


if __name__ == "__main__":
    sys.exit(main())
