"""k-NN and linear-probe evaluation of a frozen student backbone.

    python -m fastreg.eval runs/r18/ckpt_epoch0130.pt --linear
    python -m fastreg.eval resnet18_simreg.pt --arch resnet18 --train-root train/ --val-root val/

k-NN follows DINO / InstDisc: cosine similarity between L2-normalized features; the k nearest bank
features vote for their class with weight exp(sim / t). 1-NN (what SimReg reports) is the label of
the nearest one. The linear probe follows CompRess: on frozen center-crop features,
L2-normalize -> BatchNorm1d(affine=False) -> Linear, SGD for 40 epochs.

The CLI caches features in a cache dir per (weights, data folder, crop size), so the linear probe
and later runs reuse what k-NN extracted. `knn_eval`, which the trainer calls, never caches: its
model changes between calls.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from fastreg.checkpoint import atomic_save
from fastreg.export import check_keys, checkpoint_arch, read_checkpoint
from fastreg.pipelines import eval_batches, resolve_loader
from fastreg.students import STUDENTS, Student

SIM_ELEMENTS = 2**26  # entries of one chunk's (queries, bank) similarity matrix: 256 MiB in fp32
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fastreg" / "features"


# ----------------------------------------------------------------------------------------- features


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def extract_features(
    model: nn.Module, loader: Iterable, device: str | torch.device, amp_dtype: Optional[torch.dtype] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every batch of `loader`: (feats (N, D) float32 L2-normalized, labels (N,)), on the CPU.

    `model` runs in eval mode (its mode is restored afterwards) under inference_mode, with autocast to
    `amp_dtype` when given. Conv models get channels_last inputs, which makes cuDNN run channels_last
    without converting the model's own parameters (the trainer's student keeps its layout).
    """
    device = torch.device(device)
    channels_last = _has_conv(model)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            for images, y in loader:
                images = images.to(device, non_blocking=True)  # (B, 3, H, W)
                if amp_dtype is None:
                    images = images.float()  # DALI's GPU batches are float16; without autocast the model is fp32
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                f = model(images).float()  # (B, D)
                feats.append(F.normalize(f, dim=1).cpu())
                labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------------------------- k-NN


def _neighbours(
    bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: Optional[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per chunk of queries, the k most similar bank rows, nearest first: (sim (q, k), index (q, k)).

    The default chunk keeps the (q, N) similarity matrix under SIM_ELEMENTS entries.
    """
    step = chunk_size or max(1, SIM_ELEMENTS // bank.shape[0])
    for q in queries.split(step):
        sim = q.to(bank.device) @ bank.T  # (q, D) @ (D, N) -> (q, N)
        yield sim.topk(min(k, bank.shape[0]), dim=1)


def _vote(sim: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, t: float) -> torch.Tensor:
    """Class scores (q, C): each neighbour adds exp(sim / t) to its class's score.

    The row's largest similarity is subtracted first (a common factor per row, so the argmax is the
    same) to keep exp finite at small t.
    """
    weights = ((sim - sim[:, :1]) / t).exp()  # (q, k); sim is sorted, column 0 is the row max
    scores = torch.zeros(sim.shape[0], num_classes, device=sim.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    t: float = 0.07,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted k-NN class (Q,), 1-NN class (Q,)) of each query, on bank's device, from one pass.

    bank (N, D) and queries (Q, D) are L2-normalized; k is clipped to N. `chunk_size` queries are
    compared at a time (default: as many as keep the similarity matrix under SIM_ELEMENTS).
    """
    bank_labels = bank_labels.to(bank.device)
    knn, nn1 = [], []
    for sim, idx in _neighbours(bank, queries, k, chunk_size):
        neighbour_labels = bank_labels[idx]  # (q, k), nearest first
        knn.append(_vote(sim, neighbour_labels, num_classes, t).argmax(1))
        nn1.append(neighbour_labels[:, 0])
    return torch.cat(knn), torch.cat(nn1)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, **options) -> dict[str, float]:
    """{"knn": weighted k-NN top-1 %, "nn1": 1-NN top-1 %}; options (k, t, chunk_size) as knn_predict's."""
    knn, nn1 = knn_predict(bank, bank_labels, queries, num_classes, **options)
    y = query_labels.to(knn.device)
    return {"knn": 100.0 * (knn == y).double().mean().item(), "nn1": 100.0 * (nn1 == y).double().mean().item()}


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
    amp_dtype: Optional[torch.dtype] = None,
    loader: str = "auto",
    **index_options,
) -> dict[str, float]:
    """knn_accuracy of `model` with train_root's images as the bank and val_root's as the queries;
    `loader` is the data.loader that decodes them (auto: DALI when it can be imported), index_options
    (max_bad_fraction, progress) go to the dataset index.

    Nothing is cached: during training the model changes between calls.
    """
    def features(root: str) -> tuple[torch.Tensor, torch.Tensor]:
        batches = eval_batches(loader, root, crop_size, batch_size, workers, torch.device(device), **index_options)
        return extract_features(model, batches, device, amp_dtype)

    bank, bank_labels = features(train_root)
    queries, query_labels = features(val_root)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return knn_accuracy(bank.to(device), bank_labels, queries, query_labels, num_classes, k=k, t=t)


# ------------------------------------------------------------------------------------ feature cache


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state_dict (names, dtypes, shapes, bytes): the identity of its weights."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def folder_stamp(root: str | Path) -> list[tuple[str, int]]:
    """mtimes of an ImageFolder and its class folders: they change when images are added, removed or renamed."""
    root = Path(root)
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    return [(p.name, p.stat().st_mtime_ns) for p in folders]


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
    amp_dtype: Optional[torch.dtype] = None,
    loader: str = "auto",
) -> dict:
    """Center-crop features of the ImageFolder `root`, extracted once and then read from `cache_dir`.

    The file is `<slot>-<key>.pt`:
      slot = hash(tag, root, crop size): which features these are (`tag` names the model, the CLI
             passes the checkpoint's absolute path). Writing a new key for a slot deletes the old one,
             so a checkpoint overwritten at the same path does not pile up files.
      key  = hash(digest of the model's weights, mtimes of root and its class folders, amp dtype, loader):
             new weights, an edited folder, another precision or decoder give a new key, never a stale file.
    Returns {"feats": (N, D) float32 L2-normalized, "labels": (N,), "classes": class names or None,
    "cached": whether it was read from the cache}.
    """
    root = os.path.abspath(root)
    cache_dir = Path(cache_dir)
    slot = _hash(tag, root, crop_size)
    path = cache_dir / f"{slot}-{_hash(weights_digest(model), folder_stamp(root), str(amp_dtype), resolve_loader(loader))}.pt"
    if path.is_file():
        return {**torch.load(path, map_location="cpu", weights_only=True), "cached": True}
    batches = eval_batches(loader, root, crop_size, batch_size, workers, torch.device(device))
    feats, labels = extract_features(model, batches, device, amp_dtype)
    entry = {"feats": feats, "labels": labels, "classes": batches.classes}
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"{slot}-*.pt"):
        stale.unlink(missing_ok=True)
    atomic_save(entry, path)
    return {**entry, "cached": False}


# ------------------------------------------------------------------------------------- linear probe


class L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


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
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(linear.bias)
    probe = nn.Sequential(L2Norm(), nn.BatchNorm1d(dim, affine=False), linear).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return probe, optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=0.1)


def _train_epoch(
    probe: nn.Module, optimizer: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator
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
    correct = sum((probe(x).argmax(1) == y).sum().item() for x, y in zip(feats.split(batch_size), labels.split(batch_size)))
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
    probe, optimizer, schedule = make_probe(train_feats.shape[1], num_classes, lr, momentum, weight_decay, milestones, device, seed)
    feats, labels = train_feats.to(device), train_labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        _train_epoch(probe, optimizer, feats, labels, batch_size, gen)
        schedule.step()
    return _top1(probe, val_feats.to(device), val_labels.to(device), batch_size)


# ---------------------------------------------------------------------------------------------- CLI


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_student(path: str | Path, arch: Optional[str] = None) -> tuple[nn.Module, str, dict]:
    """(backbone, arch, config) from a trainer checkpoint or an exported student state_dict.

    A trainer checkpoint gives its config, and its arch unless `arch` overrides it. An exported
    state_dict has no config ({}), so `arch` is required. The weights must fit the arch exactly.
    """
    ckpt = read_checkpoint(path)
    if "student" in ckpt:
        config = ckpt.get("config") or {}
        arch = arch or checkpoint_arch(ckpt, path)
        state_dict = ckpt["student"]
    elif _is_state_dict(ckpt):
        if arch is None:
            raise ValueError(f"{path} is an exported student state_dict, which has no config: pass --arch (one of {', '.join(STUDENTS)})")
        config, state_dict = {}, ckpt
    else:
        raise ValueError(
            f"{path} is neither a trainer checkpoint (no 'student' entry) nor a state_dict of tensors "
            f"(keys: {', '.join(map(str, list(ckpt)[:8]))})"
        )
    if arch not in STUDENTS:
        raise ValueError(f"--arch {arch!r} is not one of {', '.join(STUDENTS)}")
    check_keys(state_dict, arch)
    backbone = Student(arch).backbone
    backbone.load_state_dict(state_dict, strict=False)  # check_keys allowed only the classifier to be missing
    return backbone, arch, config


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


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


def evaluate(args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    """Run the CLI's evaluation: (results, facts about what ran, for the table)."""
    backbone, arch, config = load_student(args.checkpoint, args.arch)
    s = _settings(args, config)
    device = _pick_device(args.device)
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    backbone.to(device)
    tag = str(Path(args.checkpoint).resolve())
    train, val = (
        cached_features(backbone, root, s.crop_size, args.cache_dir, tag, s.batch_size, s.workers, device, amp_dtype,
                        s.loader)
        for root in (s.train_root, s.val_root)
    )
    if train["classes"] and val["classes"] and train["classes"] != val["classes"]:
        raise ValueError(f"{s.train_root} and {s.val_root} have different class folders: labels would not match")
    num_classes = len(train["classes"]) if train["classes"] else int(max(train["labels"].max(), val["labels"].max())) + 1
    results = knn_accuracy(train["feats"].to(device), train["labels"], val["feats"], val["labels"], num_classes,
                           k=s.k, t=s.t)
    if args.linear:
        results["linear"] = linear_probe(
            train["feats"], train["labels"], val["feats"], val["labels"], num_classes, epochs=args.linear_epochs, device=device
        )
    facts = {"arch": arch, "settings": s, "device": device, "n_train": len(train["labels"]), "n_val": len(val["labels"]),
             "cached": train["cached"] and val["cached"]}
    return results, facts


def _report(args: argparse.Namespace, results: dict[str, float], facts: dict) -> None:
    s = facts["settings"]
    table = Table(title=f"{Path(args.checkpoint).name} ({facts['arch']}, crop {s.crop_size})")
    table.add_column("metric")
    table.add_column("top-1 %", justify="right")
    table.add_row(f"k-NN (k={s.k}, t={s.t})", f"{results['knn']:.2f}")
    table.add_row("1-NN", f"{results['nn1']:.2f}")
    if "linear" in results:
        table.add_row(f"linear probe ({args.linear_epochs} epochs)", f"{results['linear']:.2f}")
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    console.print(f"bank:     {facts['n_train']} images in {s.train_root}")
    console.print(f"queries:  {facts['n_val']} images in {s.val_root}")
    source = "read from the cache" if facts["cached"] else "extracted and cached"
    console.print(f"features: {source} in {args.cache_dir}, on {facts['device']}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastreg.eval", description="k-NN, 1-NN and linear-probe top-1 of a student.")
    p.add_argument("checkpoint", help="trainer checkpoint, or a student exported by fastreg.export (then --arch and roots are required)")
    p.add_argument("--arch", choices=list(STUDENTS), help="student arch (default: the checkpoint's config)")
    p.add_argument("--train-root", help="ImageFolder of the k-NN bank / probe training set (default: data.knn_train_root or data.root)")
    p.add_argument("--val-root", help="ImageFolder of the queries / probe test set (default: data.val_root)")
    p.add_argument("--crop-size", type=int, help="center crop (default: data.crop_size, else 224)")
    p.add_argument("--linear", action="store_true", help="also train CompRess's linear probe on the cached features")
    p.add_argument("--linear-epochs", type=int, default=40)
    p.add_argument("--k", type=int, help="k-NN neighbours (default: eval.knn_k, else 20)")
    p.add_argument("--t", type=float, help="k-NN temperature (default: eval.knn_t, else 0.07)")
    p.add_argument("--batch-size", type=int, help="default: eval.batch_size, else 256")
    p.add_argument("--workers", type=int, help="DataLoader workers or DALI threads (default: eval.workers, else min(8, CPUs))")
    p.add_argument("--loader", choices=("auto", "dali", "torchvision"),
                   help="decoder of the center crops (default: data.loader, else auto: DALI when installed)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"feature cache (default: {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    try:
        results, facts = evaluate(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    _report(args, results, facts)


if __name__ == "__main__":
    sys.exit(main())
