"""Raw center-crop features kept on disk per (weights, data folder, crop size, precision, decoder), so that the
CLI's later runs and its linear protocols reuse what its k-NN extracted."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from fastreg import checkpoint
from fastreg.eval.features import folder_features
from fastreg.index import load_index
from fastreg.pipelines import resolve_loader


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
    entry = folder_features(model, root, crop_size, batch_size, workers, device, amp_dtype, loader, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f"{slot}-*.pt"):
        stale.unlink(missing_ok=True)
    checkpoint.atomic_save(entry, path)
    return {**entry, "cached": False}
